"""The worker's loop, on the tiny engine and a real SQLite file, without HTTP."""

from __future__ import annotations

import threading
import time

from server.admission import Admission
from server.auth import NOBODY
from server.events import Hub
from server.files import FileStore
from server.predictions import PredictionService
from server.protocol import PredictionRequest
from server.settings import Settings
from server.store import SqliteStore
from server.worker import Worker
from tests.helpers import box_mask, fast_input, noise_image


def test_a_create_racing_the_workers_sleep_wakes_it(tmp_path, engine):
    """A prediction created just after the worker found the queue empty, before it went to sleep,
    still starts at once: the create's notification is not sent to nobody (which would leave it
    waiting for the worker's next 5 s re-check)."""
    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    service = PredictionService(Settings(data_dir=tmp_path), store, FileStore(tmp_path, store, 24), Hub())
    request = PredictionRequest(input=fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))))
    admission = Admission(version="hidden", wait=None, cancel_after_s=None)
    created: list[str] = []
    found_empty = store.claim_next

    def claim_next(lease, lease_s):
        record = found_empty(lease, lease_s)
        if record is None and not created:  # the create lands in the gap between looking and sleeping
            creator = threading.Thread(
                target=lambda: created.append(service.create(request, admission, NOBODY).id))
            creator.start()
            creator.join(0.5)
        return record

    store.claim_next = claim_next
    worker = Worker(engine, service, "cpu")
    started = time.monotonic()
    worker.start()
    try:
        while not (created and store.get_prediction(created[0]).status != "starting"):
            assert time.monotonic() - started < 4.0, "the worker slept through the create"
            time.sleep(0.02)
        while store.get_prediction(created[0]).status == "processing":  # let it finish before stopping
            time.sleep(0.05)
    finally:
        worker.stop()
        worker.join(10)
    assert not worker.is_alive()


def test_a_prediction_stopped_by_a_shutdown_goes_back_to_the_queue_until_its_last_attempt(tmp_path, engine):
    """The server stops while a prediction runs (here: while its picture drips in): it goes back to
    the queue, unless this run was its --max-attempts-th, when it fails in words instead."""
    from tests.server.test_red_team import Origin

    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    service = PredictionService(Settings(data_dir=tmp_path, max_attempts=2), store, FileStore(tmp_path, store, 24), Hub())
    admission = Admission(version="hidden", wait=None, cancel_after_s=None)
    with Origin(drip_s=0.05) as origin:
        inp = {**fast_input(noise_image(16, 16), box_mask(16, 16, (2, 2, 14, 14))), "image": origin.url("/drip")}
        pid = service.create(PredictionRequest(input=inp), admission, NOBODY).id
        outcomes = []
        for _ in range(2):
            worker = Worker(engine, service, "cpu")
            worker.start()
            try:
                deadline = time.monotonic() + 10
                while worker.current != pid:
                    assert time.monotonic() < deadline, "the worker did not take the prediction"
                    time.sleep(0.01)
                service.lifecycle.requeue_requested.add(pid)  # what a shutdown does after its grace time
                worker.stop()
                worker.join(10)
                assert not worker.is_alive()
            finally:
                worker.stop()
            record = store.get_prediction(pid)
            outcomes.append((record.status, record.attempts, record.error))
    store.close()
    assert outcomes[0] == ("starting", 1, None)
    assert outcomes[1] == ("failed", 2, "This prediction was interrupted 2 times while it ran (the server stopped "
                                        "or was killed each time), so it is not run again.")


def test_a_run_that_reads_its_inputs_while_the_database_is_away_waits_for_it_and_keeps_its_attempt(tmp_path, engine):
    """The database restarts as a run begins: reading its stored input (a long data URI) and
    resolving its uploaded mask (this server's file URL) fail twice each, as they do while the
    database is away. The run waits for it and succeeds as its first attempt, instead of leaving
    the prediction to run again once its lease runs out."""
    from server.store import DatabaseUnavailable
    from tests.helpers import data_uri, png_bytes

    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    files = FileStore(tmp_path, store, 24)
    service = PredictionService(Settings(data_dir=tmp_path), store, files, Hub())
    upload = tmp_path / "mask.png"
    upload.write_bytes(png_bytes(box_mask(64, 64, (8, 8, 40, 40))))
    mask = files.save_upload(upload, "mask.png", "image/png", {})
    image = data_uri(noise_image(64, 64))
    assert len(image) > 4096  # stored apart from the row, read by the worker
    request = PredictionRequest(input={"prompt": "a cat", "image": image,
                                       "mask": f"http://127.0.0.1:1/v1/files/{mask.id}", "num_inference_steps": 1})
    calls = {"read_input": 0, "get_file": 0}

    def away_twice(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            if calls[name] <= 2:
                raise DatabaseUnavailable("the database is restarting")
            return real(*args, **kwargs)
        return call

    created = service.create(request, Admission(version="hidden", wait=None, cancel_after_s=None), NOBODY)
    files.read_input = away_twice("read_input", files.read_input)
    store.get_file = away_twice("get_file", store.get_file)
    worker = Worker(engine, service, "cpu")
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while store.get_prediction(created.id).status in ("starting", "processing") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
        worker.join(10)
    done = store.get_prediction(created.id)
    assert done.status == "succeeded" and done.attempts == 1, (done.status, done.error, done.logs)
    assert calls["read_input"] >= 3 and calls["get_file"] >= 3, calls
