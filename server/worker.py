"""The worker: the one thread that owns a GPU. It takes queued predictions, runs them, records them.

One worker per device; each has its own Engine. The HTTP side never waits on the GPU: a create is
queued by the lifecycle, which wakes a worker; the worker claims it, runs it, and hands the outcome
back to the lifecycle, which records it. A failure in one prediction fails that prediction with a
clear error and the worker goes on.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

from tqdm import tqdm

from inference.engine import Engine
from inference.errors import Cancelled, FetchError, InvalidInput, NonFiniteOutput, SafetyError
from inference.images import read_file_string
from inference.inputs import parse_input

from .fetching import OwnFetches, came_back
from .lifecycle import Lifecycle
from .predictions import PredictionService
from .previews import PreviewSender
from .quotas import outputs_exceeded
from .records import PredictionRecord
from .store import DatabaseUnavailable, QuotaExceeded

log = logging.getLogger(__name__)
LOG_FLUSH_S = 0.5  # persist logs (and tell listeners) at most this often while running


class Requeued(Exception):
    """The server is stopping: the running prediction goes back to the queue."""


class LeaseLost(Exception):
    """The run's lease ran out and the prediction was settled without it: stop, record nothing."""


class OutputsRefused(Exception):
    """The outputs would take the prediction's owner past its storage quota: none is written."""


def run_folder(run: PredictionRecord) -> str:
    """The folder of this run's outputs under the prediction's (outputs/<id>/<run>/): named by its
    claim, so a run that lost its claim never writes where the recorded run's outputs are."""
    return run.lease.rsplit("/", 1)[-1][:12].lower()


class LogBuffer:
    """A run's logs: appended by the engine, persisted and published at most every 0.5 s."""

    def __init__(self, lifecycle: Lifecycle, run: PredictionRecord):
        self.lifecycle, self.run = lifecycle, run
        self.text = run.logs
        self.step: tuple[int, int] | None = None  # steps done, steps in all: recorded as the record's fields
        self.last_flush = 0.0
        self.started = time.monotonic()

    def line(self, message: str) -> None:
        self.text += message.rstrip("\n") + "\n"
        self.flush(force=False)

    def progress(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.started
        self.text += tqdm.format_meter(done, total, elapsed, ncols=80) + "\n"
        self.step = (done, total)
        self.flush(force=done == total)  # the last step is told at once: then come the outputs

    def flush(self, force: bool = True) -> None:
        t = time.monotonic()
        if force or t - self.last_flush >= LOG_FLUSH_S:
            self.last_flush = t
            self.lifecycle.logs(self.run, self.text, self.step)


class Worker(threading.Thread):
    """``own_fetches`` and ``fetch_mark``: the mark this worker's fetches carry, to tell a fetch that
    came back to this server from any other failed fetch (see :mod:`server.fetching`)."""

    def __init__(self, engine: Engine, service: PredictionService, device: str, *,
                 own_fetches: OwnFetches | None = None, fetch_mark: str | None = None):
        super().__init__(name=f"worker-{device}", daemon=True)
        self.engine = engine
        self.service = service
        self.lifecycle = service.lifecycle
        self.device = device
        self.own_fetches, self.fetch_mark = own_fetches, fetch_mark
        self.stopping = threading.Event()
        self.current: str | None = None
        self.run_held: PredictionRecord | None = None  # the claim the heartbeat keeps alive
        self.lost: str | None = None  # the prediction whose lease the heartbeat found gone
        self.heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{device}", daemon=True)
        self.previews = PreviewSender(self.lifecycle, service.settings, name=f"previews-{device}")

    def start(self) -> None:
        super().start()
        self.heartbeat.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.lifecycle.work_available:
            self.lifecycle.work_available.notify_all()

    def _beat(self) -> None:
        """Renew the running prediction's lease every third of --lease-s, whatever the GPU is doing;
        after stop(), until the last run ends."""
        every = self.service.settings.lease_s / 3
        while True:
            if self.stopping.is_set():
                if self.run_held is None:
                    return
                time.sleep(every)
            else:
                self.stopping.wait(every)
            run = self.run_held
            if run is None:
                continue
            try:
                if not self.lifecycle.renew(run) and self.run_held is run:
                    self.lost = run.id
            except Exception:  # the database is away: the lease may run out, and the run then stops
                log.warning("could not renew the lease of prediction %s", run.id, exc_info=True)

    def run(self) -> None:
        cond = self.lifecycle.work_available
        while not self.stopping.is_set():
            # Looking for work and going to sleep happen under the condition's lock, which a create
            # takes to notify after writing its row: a create is either found now or wakes the wait,
            # never lost in between.
            with cond:
                if self.stopping.is_set():
                    break
                try:
                    run = self.lifecycle.claim()
                except DatabaseUnavailable:  # said once by the store; looked at again until it is back
                    cond.wait(timeout=1.0)
                    continue
                except Exception:  # e.g. the database is locked or its disk is gone: keep the worker alive
                    log.exception("could not take the next prediction; trying again")
                    cond.wait(timeout=1.0)
                    continue
                if run is None:
                    cond.wait(timeout=5.0)  # the timeout only re-checks; creates and stop() notify
                    continue
            try:
                self.process(run)
            except Exception:  # recording the outcome failed; the prediction is re-queued at the next start
                log.exception("could not record the outcome of prediction %s", run.id)
        self.previews.close()

    def process(self, run: PredictionRecord) -> None:
        """Run one claimed prediction to its outcome, recorded by the lifecycle under the claim's lease."""
        pid, service, lifecycle = run.id, self.service, self.lifecycle
        self.current, self.run_held, self.lost = pid, run, None
        logs = LogBuffer(lifecycle, run)
        started = time.monotonic()

        def cancelled() -> bool:
            if self.lost == pid:
                raise LeaseLost()
            if lifecycle.stop_wanted(pid):  # a cancel wins over going back to the queue
                return True
            if pid in lifecycle.requeue_requested:
                raise Requeued()
            return False

        self.refused_fetch()  # forget a refusal left over from an earlier prediction
        try:
            if service.files.free_bytes() < service.settings.min_free_disk_mb * 1024 * 1024:
                raise OSError("the server's disk is full")
            # Its inputs are read across a restart of the database, as its outcome is written: a
            # run that starts while the database is away waits for it, and keeps its attempt.
            resolve = service.resolver_for(run)

            def resolver(value: str) -> bytes | None:
                return lifecycle.outlasting(lambda: resolve(value))

            # another API's adapter prepares here
            job = lifecycle.outlasting(lambda: service.job(run, self.reader(cancelled, resolver), logs.line))
            masks: list = []  # the mask a mask_prompt made, kept beside the outputs
            outputs = self.engine.predict(
                parse_input(job.input),
                resolver=job.resolver(resolver),
                on_step=logs.progress,
                cancelled=cancelled,
                log=logs.line,
                on_mask=masks.append,
                **self.previews.for_run(run),
            )
            facts = job.facts_of(outputs)
            lifecycle.outlasting(lambda: service.keep_facts(run, facts))
            self.save(run, job.finished(outputs), logs, started, cancelled, beside=masks)
        except Requeued:
            lifecycle.requeue(run, logs.text, time.monotonic() - started)
        except LeaseLost:
            log.warning("prediction %s: this worker's lease ran out and it was settled elsewhere; "
                        "this run stops and records nothing", pid)
        except OutputsRefused as refused:
            self.lifecycle.fail(run, str(refused), logs.text + f"Error: {refused}\n", time.monotonic() - started)
        except Cancelled:
            self.canceled(run, logs, started)
        except Exception as exc:  # one prediction's failure never stops the worker
            if _database_away(exc):
                # Its inputs could not be read (or its outcome written) while the database is away:
                # not the prediction's failure. Nothing is recorded; its lease is no longer renewed,
                # so it runs again, here or on another worker, once the lease runs out.
                log.warning("prediction %s: the database went away during its run; it runs again "
                            "when its lease runs out", pid, exc_info=True)
                return
            if lifecycle.stop_wanted(pid):  # e.g. a fetch that stalled past the cancel, then timed out
                self.canceled(run, logs, started)
            else:
                self.failed(run, exc, logs, started)
        finally:
            self.current = self.run_held = None
            lifecycle.forget(pid)

    def save(self, run: PredictionRecord, outputs: list, logs: LogBuffer, started: float, cancelled,
             beside: list = ()) -> None:
        """Count the outputs against their owner's storage quota, write them into this run's own
        folder, and record them under the run's claim. A cancel is honoured until they are
        recorded; a run that lost its claim leaves nothing (its folder is removed). ``beside``:
        files kept in the folder that are not outputs (a mask_prompt's mask), counted too."""
        service, lifecycle, pid = self.service, self.lifecycle, run.id
        folder = run_folder(run)
        size = sum(len(out.data) for out in [*outputs, *beside])
        if cancelled():
            raise Cancelled()
        quotas = service.quotas
        limits = quotas.limits_of_owner(run.owner, adds_bytes=size)
        try:
            held = lifecycle.outlasting(lambda: service.store.reserve_output_bytes(pid, run.lease, size, limits))
        except QuotaExceeded as exc:
            raise OutputsRefused(outputs_exceeded(exc.used, exc.limit, size)) from None
        if not held:
            raise LeaseLost()
        try:
            written = lifecycle.outlasting(lambda: service.files.write_outputs(pid, [*outputs, *beside], folder,
                                                                               cancelled))
            names = written[:len(outputs)]
            recorded = lifecycle.succeed(run, names, logs.text, time.monotonic() - started, output_run=folder,
                                         output_bytes=size, seed=outputs[0].seed if outputs else None,
                                         progress=logs.step)
        except BaseException:
            self.discard(pid, folder)
            raise
        if not recorded:
            self.discard(pid, folder)

    def discard(self, prediction_id: str, folder: str) -> None:
        """Remove the files of a run whose outputs are not the prediction's (retention removes them
        otherwise, with the prediction's)."""
        try:
            self.service.files.remove_outputs(prediction_id, folder)
        except Exception as exc:
            log.warning("could not remove the unrecorded outputs of prediction %s: %s", prediction_id, exc)

    def reader(self, cancelled, resolver):
        """Reads a file string of the run's input as the engine reads it: its fetch limits, this
        server's own files resolved where they lie (by ``resolver``), a cancel between two reads."""
        settings = self.engine.settings

        def read(value: str, field: str) -> bytes:
            return read_file_string(value, field, policy=settings.fetch_policy, resolver=resolver,
                                    allow_paths=settings.allow_paths, cancelled=cancelled)

        return read

    def canceled(self, run: PredictionRecord, logs: LogBuffer, started: float) -> None:
        text = logs.text + self.lifecycle.cancel_reason(run.id) + "\n"
        self.lifecycle.end_canceled(run, text, time.monotonic() - started)

    def failed(self, run: PredictionRecord, exc: Exception, logs: LogBuffer, started: float) -> None:
        if isinstance(exc, FetchError) and (path := self.refused_fetch()):
            exc = came_back(exc, path)
        error = describe_failure(exc)
        if not isinstance(exc, (InvalidInput, SafetyError)):
            log.error("prediction %s failed:\n%s", run.id, "".join(traceback.format_exception(exc)))
        self.lifecycle.fail(run, error, logs.text + f"Error: {error}\n", time.monotonic() - started)
        free_gpu_memory()

    def refused_fetch(self) -> str | None:
        """The path of this server that this worker's last fetch was refused on, if any."""
        if self.own_fetches is None or self.fetch_mark is None:
            return None
        return self.own_fetches.take(self.fetch_mark)


def describe_failure(exc: BaseException) -> str:
    """One clear sentence for the prediction's ``error``; the traceback stays in the server log."""
    if isinstance(exc, InvalidInput):
        return "; ".join(f"{e.field}: {e.description}" if not e.description.startswith(e.field) else e.description
                         for e in exc.errors)
    if isinstance(exc, (SafetyError, NonFiniteOutput)):
        return str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "The GPU ran out of memory for this prediction. Try fewer outputs or fewer megapixels."
    if isinstance(exc, OSError) and "disk is full" in str(exc):
        return "The server's disk is full; this prediction could not be saved."
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return "The server's disk is full; this prediction could not be saved."
    return f"Internal error while generating ({name}). The server log has the details."


def free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _database_away(exc: BaseException | None) -> bool:
    """Whether an exception is, or was raised from, the store's DatabaseUnavailable."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DatabaseUnavailable):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
