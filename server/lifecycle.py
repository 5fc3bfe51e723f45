"""The prediction lifecycle: the one module that moves a status.

    create -> starting --claim--> processing --> succeeded | failed | canceled
                 |                    |
                 +--cancel/deadline---+--> canceled      processing --requeue--> starting

Every move is written to the store first (a conditional update: it happens only from the states
it may come from, and a run's outcome only while its claim still holds the prediction), then
published: to the event hub (streams, ``Prefer: wait``), and from there to the webhook sender and
the metrics. Routes, the worker and the deadline watcher ask; this module moves.

A worker's claim carries a lease token, ``<holder>/<random>``, held for ``--lease-s`` and renewed
by the worker's heartbeat. The holder names the node (its host and the id kept in its data folder,
see server.datadir.node_id), so a node that restarts settles the runs it held at once, without
waiting for their leases to run out: no other process can hold its data folder. An outcome, a log write or a requeue names the lease it was claimed under, and the store
refuses it once the prediction has moved on without that claim: every prediction ends once, with
one set of outputs. A lease that runs out (its worker was killed, lost power or the network) puts
the prediction back in the queue for any worker, up to ``--max-attempts`` runs.

On a database shared by several nodes (PostgreSQL), each move is also told to the other nodes
(``Store.notify``), whose streams and waiting requests wake as if it were their own; the webhook
of a move is sent by the node that made it, so each event is sent once, and an owed final webhook
is held in the database by one node at a time (:mod:`server.outbox`). A cancel is recorded in the
database, where the worker running the prediction, on any node, looks at each step. Leases run by
the database's clock, and a database that restarted gives every lease a fresh ``--lease-s`` and
``RECONNECT_S`` more (no worker could renew one while it was away).

While the database is away, a run goes on: its logs and previews wait, a cancel is looked for
again at the next step, and its outcome is written once the database is back (tried again for
``OUTCOME_RETRY_S``); what asks from a route gets :class:`~server.store.DatabaseUnavailable` (503).

Its length is on purpose: it is the one module that moves a status (claims, leases, cancels,
deadlines, restarts, owed webhooks), so every transition and its fencing are read in one place.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .events import COMPLETED, LOGS, OUTPUT, PREVIEW, START, Hub
from .outbox import Outbox
from .protocol import Status
from .records import PredictionRecord
from .settings import Settings
from .store import DatabaseUnavailable, OwnerLimits, Store

if TYPE_CHECKING:
    from .files import FileStore
    from .metrics import ServerMetrics
    from .webhooks import WebhookSender, WebhookStyle

log = logging.getLogger(__name__)
DEADLINE_POLL_S = 30.0  # the longest the deadline watcher sleeps without looking
DEADLINE_BATCH = 200  # deadlines looked at in one go
QUEUED = "queued"  # told to other nodes only: their workers look at the queue
WEBHOOK_TIMEOUT_S = 10.0  # one webhook POST, connect to answer
OUTCOME_RETRY_S = 120.0  # a run's outcome is tried again this long while the database is away
RECONNECT_S = 15.0  # after the database restarts, leases run on this long beyond --lease-s: workers reconnect
CANCEL_CHECK_S = 0.1  # a running prediction's worker looks for a cancel in the database this often
PREVIEW_WATCH_S = 30.0  # a stream's (or a preview reader's) wish for previews holds this long unless renewed
PREVIEW_WATCH_RENEW_S = 5.0  # a node writes one watcher's wish at most this often
PREVIEW_CHECK_S = 0.2  # a running prediction's worker looks for watchers in the database at most this often
LOG_BATCH_S = 0.05  # on a shared database, the logs of a node's runs are written together, this long after the first
NOTIFY_IDS = 200  # prediction ids in one notification (PostgreSQL's payloads hold 8000 bytes)


def interrupted_too_often(attempts: int) -> str:
    return (f"This prediction was interrupted {attempts} times while it ran (the server stopped or was killed "
            "each time), so it is not run again.")


class Lifecycle:
    def __init__(self, settings: Settings, store: Store, files: FileStore, hub: Hub,
                 metrics: ServerMetrics | None = None, holder: str | None = None):
        self.settings = settings
        self.store = store
        self.files = files
        self.hub = hub
        self.metrics = metrics
        self.work_available = threading.Condition()  # notified on each create (and to stop workers)
        self.cancel_requested: set[str] = set()  # running predictions asked to stop
        self.cancel_reasons: dict[str, str] = {}  # why a running prediction is being canceled, for its logs
        self.requeue_requested: set[str] = set()  # running predictions a stopping server puts back
        self.deadline_added = asyncio.Event()  # a create with Cancel-After: look at the deadlines again
        self.node = secrets.token_hex(6)  # this process, in the events it tells other nodes
        # This node in its leases: the same after a restart on the same data folder (see recover).
        self.holder = holder or f"{socket.gethostname()}-{self.node}"
        self._cancel_checked: dict[str, float] = {}  # when each running prediction's cancel was last read
        self._watch_written: dict[str, float] = {}  # when this node last wrote a wish for previews, per prediction
        self._watch_read: dict[str, tuple[float, bool]] = {}  # a running prediction's watchers, last read
        # The cancels and watchers of every run on this node are read together, in one statement per
        # CANCEL_CHECK_S (PREVIEW_CHECK_S), by whichever worker asks first once it is due: the reads
        # grow with the nodes, not with the GPUs.
        self._cancels_read_at = float("-inf")
        self._watches_read_at = float("-inf")
        self._watched: set[str] = set()
        self._cancels_reading = threading.Lock()
        self._logs_pending: dict[str, tuple] = {}  # run id -> (run, logs, progress) to write
        self._logs_lock = threading.Lock()
        self._logs_due = threading.Event()
        self._logs_writer: threading.Thread | None = None
        self._watches_reading = threading.Lock()
        self.outbox = Outbox(store, settings, self.holder)  # the owed final webhooks this node sends
        self.webhooks: WebhookSender | None = None
        self._snapshot: Callable[[PredictionRecord], dict] | None = None
        self._secret_for: Callable[[str | None], str] | None = None
        self._styles: dict[str, WebhookStyle] = {}
        hub.listeners.append(self._delivered)

    def send_webhooks(self, sender: WebhookSender, snapshot: Callable[[PredictionRecord], dict],
                      secret_for: Callable[[str | None], str], styles: dict[str, WebhookStyle] | None = None) -> None:
        """Hand each event of a prediction with a webhook to ``sender``: its body is ``snapshot`` of
        the record at send time, signed with its tenant's secret; a prediction made through another
        API (its ``api``) is sent in that API's style from ``styles``."""
        self.webhooks, self._snapshot, self._secret_for = sender, snapshot, secret_for
        self._styles = dict(styles or {})

    # -- create and claim ---------------------------------------------------------------------

    def create(self, limits: OwnerLimits | None = None, **fields: Any) -> PredictionRecord:
        """Queue a new prediction (``starting``), durably, and wake a worker. With ``limits``, it is
        written only if its owner stays within them (QuotaExceeded: nothing written)."""
        if limits is None:
            self.store.insert_prediction(**fields)
        else:
            self.store.insert_prediction_guarded(limits, **fields)
        self._queued(fields["id"])
        if fields.get("cancel_at") is not None:
            loop = self.hub.loop  # the watcher's event lives on the loop; a create may run beside it
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.deadline_added.set)
        return self.store.get_prediction(fields["id"])

    def claim(self) -> PredictionRecord | None:
        """The oldest queued prediction, now ``processing`` under a fresh lease; None if none waits."""
        record = self.store.claim_next(f"{self.holder}/{secrets.token_hex(16)}", self.settings.lease_s)
        if record is not None:
            self._publish(record, START)
        return record

    @property
    def lease_grace_s(self) -> float:
        """How long after the database restarted a lease is held whatever its time said: nobody
        could renew it while the database was away, and its worker needs a moment to reconnect."""
        return self.settings.lease_s + RECONNECT_S

    def renew(self, run: PredictionRecord) -> bool:
        """The heartbeat of a run: its lease holds ``--lease-s`` more; False once the run lost it."""
        return self.store.renew(run.id, run.lease, self.settings.lease_s)

    def forget(self, prediction_id: str) -> None:
        """A run ended on this node (however it ended): drop what was kept for it."""
        self._cancel_checked.pop(prediction_id, None)
        self._watch_read.pop(prediction_id, None)

    # -- while it runs ------------------------------------------------------------------------

    def logs(self, run: PredictionRecord, text: str, progress: tuple[int, int] | None = None) -> None:
        """The run's logs so far, and its ``progress`` (steps done, steps in all) when known, written
        while its claim holds, then told to listeners. While the database is away they wait: the
        next write carries them all, the outcome's at the latest. On a shared database the logs of
        all the runs of this node are written together, in one statement and one notification
        every LOG_BATCH_S (see _write_logs)."""
        if self.store.shared:
            with self._logs_lock:
                earlier = self._logs_pending.get(run.id)
                if progress is None and earlier is not None:
                    progress = earlier[2]  # a later text carries the earlier one; its progress stays
                self._logs_pending[run.id] = (run, text, progress)
                if self._logs_writer is None:
                    self._logs_writer = threading.Thread(target=self._write_logs, name="logs-writer", daemon=True)
                    self._logs_writer.start()
            self._logs_due.set()
            return
        facts = {"step": progress[0], "steps": progress[1]} if progress else {}
        try:
            written = self.store.update_prediction(run.id, held_by=run.lease, durable=False, logs=text, **facts)
        except DatabaseUnavailable:
            return
        if written:
            self._publish(run, LOGS)

    def _write_logs(self) -> None:
        """The logs waiting to be written, a batch at a time: each written only while its run's
        lease holds (a run that ended or lost its claim writes nothing), then told here and, in one
        notification per NOTIFY_IDS runs, to the other nodes."""
        while True:
            self._logs_due.wait()
            time.sleep(LOG_BATCH_S)
            with self._logs_lock:
                batch = list(self._logs_pending.values())
                self._logs_pending.clear()
                self._logs_due.clear()
            if not batch:
                continue
            try:
                written = self.store.update_logs([(run.id, run.lease, text, *(progress or (None, None)))
                                                  for run, text, progress in batch])
            except DatabaseUnavailable:
                continue  # the next write of each run carries these logs, its outcome's at the latest
            except Exception:
                log.exception("could not write the logs of %d running predictions", len(batch))
                continue
            runs = {run.id: run for run, _, _ in batch}
            for pid in written:
                self.hub.publish(pid, LOGS, record=runs[pid])
            for start in range(0, len(written), NOTIFY_IDS):
                try:
                    self.store.notify(f"{self.node} {','.join(written[start:start + NOTIFY_IDS])} {LOGS}")
                except Exception as exc:  # the other nodes' streams then see it at their next look
                    log.warning("could not tell the other nodes of new logs: %s", exc)

    def preview(self, run: PredictionRecord, step: int, total: int, content_type: str, data: bytes) -> bool:
        """The run's latest preview (an encoded image after ``step`` of ``total`` steps), kept while
        its claim holds it, then told to streams here and on the other nodes (never to webhooks).
        False when the run no longer holds the prediction: nothing is kept."""
        if not self.store.put_preview(run.id, run.lease, step, total, content_type, data, self.store.now()):
            return False
        self._publish(run, PREVIEW)
        return True

    def watch_previews(self, prediction_id: str, seconds: float = PREVIEW_WATCH_S) -> None:
        """Someone here wants this prediction's previews for ``seconds`` (a stream asked for them, a
        page reads them): recorded in the database, where the worker running it, on any node, looks.
        Written at most every few seconds per prediction by this node."""
        at = time.monotonic()
        if at - self._watch_written.get(prediction_id, float("-inf")) < PREVIEW_WATCH_RENEW_S:
            return
        self._watch_written[prediction_id] = at
        if len(self._watch_written) > 10_000:  # old entries of ended predictions
            cutoff = at - PREVIEW_WATCH_S
            self._watch_written = {k: v for k, v in self._watch_written.items() if v > cutoff}
        self.store.watch_previews(prediction_id, self.store.now() + seconds)

    def watch_due(self, prediction_id: str) -> bool:
        """Whether this node's wish for the prediction's previews is due to be written again."""
        return time.monotonic() - self._watch_written.get(prediction_id, float("-inf")) >= PREVIEW_WATCH_RENEW_S

    def previews_watched(self, prediction_id: str) -> bool:
        """Whether anyone, on any node, wants this running prediction's previews now (read from the
        database at most every PREVIEW_CHECK_S)."""
        at = time.monotonic()
        self._watch_read.setdefault(prediction_id, (at, False))  # read with the others from now on
        if at - self._watches_read_at >= PREVIEW_CHECK_S and self._watches_reading.acquire(blocking=False):
            try:
                if at - self._watches_read_at >= PREVIEW_CHECK_S:
                    self._watched = self.store.previews_watched_of(list(self._watch_read), self.store.now())
                    self._watches_read_at = at
            finally:
                self._watches_reading.release()
        return prediction_id in self._watched

    def stop_wanted(self, prediction_id: str) -> bool:
        """A cancel (a user's, or a deadline's, asked of any node) waits for this running prediction."""
        if prediction_id in self.cancel_requested:
            return True
        at = time.monotonic()
        self._cancel_checked.setdefault(prediction_id, at)  # read with the others from now on
        if at - self._cancels_read_at >= CANCEL_CHECK_S and self._cancels_reading.acquire(blocking=False):
            try:
                if at - self._cancels_read_at >= CANCEL_CHECK_S:
                    self._cancels_read_at = at
                    found = self.store.cancel_requests(list(self._cancel_checked))
                    for pid, reason in found.items():
                        if reason:  # a deadline's words, set on whichever node saw it pass
                            self.cancel_reasons.setdefault(pid, reason)
                        self.cancel_requested.add(pid)
            except DatabaseUnavailable:
                pass  # looked for again at the next step
            finally:
                self._cancels_reading.release()
        return prediction_id in self.cancel_requested

    # -- outcomes of a run --------------------------------------------------------------------

    # A run's outcome is written even across a database outage (see outlasting): these are
    # called by the worker's thread, never by the event loop.

    def succeed(self, run: PredictionRecord, output: list[str], logs: str, predict_time: float,
                output_run: str | None = None, output_bytes: int | None = None, seed: int | None = None,
                progress: tuple[int, int] | None = None) -> bool:
        """The run made ``output`` (file names in its folder ``output_run``, ``output_bytes`` in all),
        the first from ``seed``, after ``progress`` (steps done, steps in all)."""
        if output_bytes is None:
            output_bytes = self.files.outputs_size(run.id, output, output_run)
        facts = {"step": progress[0], "steps": progress[1]} if progress else {}
        return self.outlasting(lambda: self._end(run, Status.SUCCEEDED, output=output, output_run=output_run,
                                                 logs=logs, predict_time=predict_time, output_bytes=output_bytes,
                                                 seed=seed, **facts))

    def fail(self, run: PredictionRecord, error: str, logs: str, predict_time: float) -> bool:
        return self.outlasting(lambda: self._end(run, Status.FAILED, error=error, logs=logs,
                                                 predict_time=predict_time, output_bytes=0))

    def end_canceled(self, run: PredictionRecord, logs: str, predict_time: float) -> bool:
        return self.outlasting(lambda: self._end(run, Status.CANCELED, logs=logs, predict_time=predict_time,
                                                 output_bytes=0))

    @staticmethod
    def outlasting(write: Callable[[], Any], for_s: float = OUTCOME_RETRY_S):
        """``write()``, tried again while the database is away, for up to ``for_s``: a run that
        ends during a restart of the database is recorded once it is back (its lease runs on: see
        Store.expired_leases), and one that reads its inputs then reads them once it is back.
        Raises DatabaseUnavailable past that."""
        ends, pause = time.monotonic() + for_s, 0.1
        while True:
            try:
                return write()
            except DatabaseUnavailable:
                if time.monotonic() >= ends:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def cancel_reason(self, prediction_id: str) -> str:
        return self.cancel_reasons.get(prediction_id) or "Prediction canceled."

    def requeue(self, run: PredictionRecord, logs: str, predict_time: float) -> Status | None:
        """A stopping server puts the run back in the queue, unless a cancel came meanwhile (it ends
        canceled) or this was its last attempt (it fails in words). The status it ends in; None
        when the run no longer holds the prediction (nothing is written)."""
        self.requeue_requested.discard(run.id)
        if self.stop_wanted(run.id):
            ended = self.end_canceled(run, logs + self.cancel_reason(run.id) + "\n", predict_time)
            return Status.CANCELED if ended else None
        if run.attempts >= self.settings.max_attempts:
            error = interrupted_too_often(run.attempts)
            return Status.FAILED if self.fail(run, error, logs + f"Error: {error}\n", predict_time) else None
        logs += "The server is stopping; this prediction goes back to the queue.\n"
        moved = self.outlasting(lambda: self.store.move(
            run.id, Status.STARTING, only_from=(Status.PROCESSING,), held_by=run.lease, started_at=None, lease=None,
            lease_expires_at=None, logs=logs), for_s=10.0)
        if moved is None:
            return None
        self.store.drop_preview(run.id, watchers=False)  # the next run makes its own
        self._queued(run.id)  # idle workers of the other nodes take it now, not at their next look
        return Status.STARTING

    def _end(self, run: PredictionRecord, status: Status, expired: bool = False, **fields: Any) -> bool:
        """Record a run's outcome under its claim (with ``expired``, only while its lease has run
        out); a final webhook it wants is owed from now, held by this node's outbox."""
        moved = self.store.end_run(
            run.id, status, held_by=run.lease, webhook_lease=self.outbox.lease if run.wants_completed_webhook else None,
            webhook_hold_s=self.outbox.hold_s, expired_grace_s=self.lease_grace_s if expired else None,
            completed_at=self.store.now(), **fields)
        if moved is None:
            log.warning("prediction %s: this run no longer holds it; its outcome (%s) is not recorded",
                        run.id, status.value)
            return False
        self._ended(moved)
        return True

    def _ended(self, record: PredictionRecord) -> None:
        try:
            self.store.drop_preview(record.id)  # a preview is of a running prediction only
        except Exception as exc:  # retention drops it later
            log.warning("could not drop the preview of prediction %s: %s", record.id, exc)
        self.cancel_requested.discard(record.id)
        self.cancel_reasons.pop(record.id, None)
        self.forget(record.id)
        if record.output:
            self._publish(record, OUTPUT)
        self._publish(record, COMPLETED)

    # -- cancel and deadlines -----------------------------------------------------------------

    def cancel(self, prediction_id: str, reason: str | None = None) -> PredictionRecord | None:
        """Cancel a queued prediction at once, a running one at its next denoising step. ``reason``
        goes in its logs (a user's cancel needs none). The record as it now is; None if unknown."""
        record = self.store.get_prediction(prediction_id)
        if record is None:
            return None
        if record.status == Status.STARTING:
            logs = record.logs + (f"{reason}\n" if reason else "")
            moved = self.store.cancel_queued(
                prediction_id, logs=logs, completed_at=self.store.now(), webhook_hold_s=self.outbox.hold_s,
                webhook_lease=self.outbox.lease if record.wants_completed_webhook else None)
            if moved is not None:
                self._ended(moved)
                return moved
            record = self.store.get_prediction(prediction_id)  # claimed meanwhile
        if record.status == Status.PROCESSING:
            if reason:
                self.cancel_reasons.setdefault(prediction_id, reason)
            self.cancel_requested.add(prediction_id)
            # Recorded with its reason: the node running it logs the same words; a restart ends it canceled.
            self.store.request_cancel(prediction_id, self.store.now(), reason)
            try:
                record = self.store.get_prediction(prediction_id) or record
            except DatabaseUnavailable:  # the cancel is recorded: answer with what was read before
                pass
        return record

    async def watch_deadlines(self) -> None:
        """Cancel each prediction whose Cancel-After deadline passes, queued or running. Runs on the
        event loop for the server's life; the database is the record of the deadlines."""
        while True:
            try:
                wait = await asyncio.get_running_loop().run_in_executor(None, self.enforce_deadlines)
            except DatabaseUnavailable:
                wait = 1.0  # looked at again once the database is back
            except Exception:
                log.exception("checking Cancel-After deadlines failed")
                wait = DEADLINE_POLL_S
            self.deadline_added.clear()
            try:
                await asyncio.wait_for(self.deadline_added.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def enforce_deadlines(self, at: float | None = None) -> float:
        """Cancel the predictions due at ``at`` (now, by the database's clock); return the seconds
        until the next deadline."""
        at = self.store.now() if at is None else at
        records = self.store.deadlines(limit=DEADLINE_BATCH)
        for record in records:
            if record.id in self.cancel_requested:
                continue  # already being stopped
            if record.cancel_at > at:
                return min(DEADLINE_POLL_S, max(0.01, record.cancel_at - at))
            after = f"{record.cancel_at - record.created_at:g} s"
            when = "before the prediction started" if record.status == Status.STARTING else "while the prediction was running"
            self.cancel(record.id, f"Canceled: the Cancel-After deadline ({after} after creation) passed {when}.")
        return 0.0 if len(records) == DEADLINE_BATCH else DEADLINE_POLL_S  # a full batch: more may be due

    # -- restarts -----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """At startup, what was running when the server stopped: it runs again, unless it was asked to
        stop (it ends canceled) or it has been interrupted ``--max-attempts`` times already (it fails:
        a prediction that takes its worker down with it must not do so after every restart). The
        ids queued again. On a shared database a running prediction may be another node's: those
        this node held before it restarted are settled now, the others once their lease runs out
        (see expire_leases)."""
        if self.store.shared:
            return self.settle_own_leases() + self.expire_leases()
        for record in self.store.interrupted():  # a database of one: every run in it was this server's
            self._settle_interrupted(record)
        ids = self.store.requeue_interrupted()
        for pid in ids:
            log.warning("prediction %s was interrupted by a restart; it runs again", pid)
        return ids

    def expire_leases(self) -> list[str]:
        """Settle the running predictions whose lease ran out (their worker is gone): canceled if a
        cancel was asked, failed after ``--max-attempts`` runs, else back in the queue. The ids
        queued again."""
        grace, queued = self.lease_grace_s, []
        for record in self.store.expired_leases(grace):
            if self._settle_interrupted(record, expired=True):
                continue
            logs = record.logs + "The worker running this prediction stopped answering (its lease ran out); it runs again.\n"
            moved = self.store.move(record.id, Status.STARTING, only_from=(Status.PROCESSING,), held_by=record.lease,
                                    expired_grace_s=grace, started_at=None, lease=None, lease_expires_at=None,
                                    logs=logs)
            if moved is not None:
                log.warning("prediction %s: its worker stopped answering; it runs again", record.id)
                self.store.drop_preview(record.id, watchers=False)  # the next run makes its own
                queued.append(record.id)
        for pid in queued:
            self._queued(pid)
        return queued

    def settle_own_leases(self) -> list[str]:
        """At startup on a shared database: the runs this node (its holder id) held when it stopped.
        No process of it runs them now (it holds its data folder alone), so they are settled at once,
        as after a restart on SQLite. The ids queued again."""
        queued = []
        for record in self.store.leases_held_by(self.holder):
            if self._settle_interrupted(record):
                continue
            logs = record.logs + "The node running this prediction restarted; it runs again.\n"
            moved = self.store.move(record.id, Status.STARTING, only_from=(Status.PROCESSING,), held_by=record.lease,
                                    started_at=None, lease=None, lease_expires_at=None, logs=logs)
            if moved is not None:
                log.warning("prediction %s was interrupted by this node's restart; it runs again", record.id)
                queued.append(record.id)
        for pid in queued:
            self._queued(pid)
        return queued

    def _settle_interrupted(self, record: PredictionRecord, expired: bool = False) -> bool:
        """End an interrupted run that must not run again (canceled, or out of attempts); True if it ended."""
        if record.cancel_requested_at is not None:
            logs = record.logs + (f"{record.cancel_reason}\n" if record.cancel_reason else "")
            logs += "The server restarted after this prediction was canceled; it does not run again.\n"
            self._end(record, Status.CANCELED, expired=expired, logs=logs)
            log.warning("prediction %s was canceled before its run was interrupted; it ends canceled", record.id)
            return True
        if record.attempts >= self.settings.max_attempts:
            error = interrupted_too_often(record.attempts)
            self._end(record, Status.FAILED, expired=expired, error=error, logs=record.logs + f"Error: {error}\n")
            log.warning("prediction %s was interrupted %d times; it fails", record.id, record.attempts)
            return True
        return False

    async def watch_leases(self) -> None:
        """Look for runs whose lease ran out, for the server's life (every node does; each run is
        settled by one)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.settings.lease_s / 3)))
            try:
                await loop.run_in_executor(None, self.expire_leases)
            except DatabaseUnavailable:
                pass  # looked at again once the database is back
            except Exception:
                log.exception("looking for runs whose worker stopped answering failed")

    # -- events, here and on the other nodes ---------------------------------------------------

    def _publish(self, record: PredictionRecord, event: str) -> None:
        """Tell this node's streams and listeners (with the record as it stands), then the other nodes."""
        self.hub.publish(record.id, event, record=record)
        if self.store.shared:
            try:
                self.store.notify(f"{self.node} {record.id} {event}")
            except Exception as exc:  # the other nodes' streams then see it at their next look
                log.warning("could not tell the other nodes of %s's %s: %s", record.id, event, exc)

    def _queued(self, prediction_id: str) -> None:
        """A prediction waits to run: wake a worker here, and tell the workers of other nodes."""
        with self.work_available:
            self.work_available.notify()
        if self.store.shared:
            try:
                self.store.notify(f"{self.node} {prediction_id} {QUEUED}", queue=True)
            except Exception as exc:  # the other nodes' workers then find it at their next look
                log.warning("could not tell the other nodes of queued prediction %s: %s", prediction_id, exc)

    def remote_event(self, payload: str) -> None:
        """Another node's move (its Store.notify payload): wake this node's streams and waiting
        requests, or, for a queued prediction, one of its workers."""
        node, _, rest = payload.partition(" ")
        prediction_id, _, event = rest.partition(" ")
        if node == self.node or not prediction_id or not event:
            return
        if event == QUEUED:
            with self.work_available:
                self.work_available.notify()
        else:
            for pid in prediction_id.split(","):  # the logs of many runs are told in one
                self.hub.publish(pid, event, remote=True)

    def look_again(self) -> None:
        """The database is back after it was away (or this node's notifications were cut): what
        was told meanwhile never arrived, so every stream and waiting request here reads again,
        and the workers look at the queue."""
        loop = self.hub.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.hub.wake_all, "look")
        with self.work_available:
            self.work_available.notify_all()

    # -- events to webhooks and metrics (on the event loop) ------------------------------------

    def _delivered(self, prediction_id: str, event: str, record: PredictionRecord | None) -> None:
        if event == PREVIEW or record is None:
            return  # previews are for streams; a webhook event list has no such event
        if self.webhooks is not None and record.webhook:
            self._send_webhook(record, event)
        if event == COMPLETED and self.metrics is not None and record.predict_time is not None:
            self.metrics.predict_time.observe(record.predict_time)

    def _send_webhook(self, record: PredictionRecord, event: str) -> None:
        """Hand one event to the sender; its body is read at send time (off the event loop). A
        final webhook this node owes (see server.outbox) is settled in the database."""
        pid = record.id
        final = self.outbox.delivery(record) if event == COMPLETED and self.outbox.owes(record) else None
        done = (lambda: self.store.webhook_sent(pid)) if event == COMPLETED and final is None and record.webhook_due \
            else None
        style = self._styles.get(record.api) if record.api else None
        if style is not None:
            self.webhooks.notify(pid, record.webhook, record.webhook_events, event,
                                 lambda: style.snapshot(self.store.get_prediction(pid) or record),
                                 done=done, signer=style.signer(record), final=final)
            return
        self.webhooks.notify(pid, record.webhook, record.webhook_events, event,
                             lambda: self._snapshot(self.store.get_prediction(pid) or record),
                             secret=self._secret_for(record.owner), done=done, final=final)

    async def watch_owed_webhooks(self) -> None:
        """Send the owed final webhooks that are due and that no node holds, for the server's life
        (see server.outbox)."""
        if self.webhooks is None:
            return
        await self.outbox.run(lambda record: self._send_webhook(record, COMPLETED))
