"""kill -9 during a queue of predictions, restart: every prediction accounted for with its output."""

import time

import httpx

from tests.helpers import box_mask, fast_input, noise_image

MODEL = "black-forest-labs/flux-fill-dev"


def test_kill_9_and_restart_loses_nothing(server_factory, tmp_path):
    data = tmp_path / "durable"
    server = server_factory(data_dir=data)
    img, mask = noise_image(64, 64, seed=1), box_mask(64, 64, (8, 8, 40, 40))
    ids = []
    for i in range(8):
        steps = 50 if i == 0 else 3  # the first one is still running when the server dies
        body = {"input": fast_input(img, mask, seed=i, num_inference_steps=steps, megapixels="1")}
        ids.append(httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"])
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v1/predictions/{ids[0]}").json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.kill()

    again = server_factory(data_dir=data)
    deadline = time.monotonic() + 240
    statuses = {}
    while time.monotonic() < deadline:
        statuses = {pid: httpx.get(f"{again.url}/v1/predictions/{pid}").json() for pid in ids}
        if all(p["status"] == "succeeded" for p in statuses.values()):
            break
        time.sleep(0.5)
    assert all(p["status"] == "succeeded" for p in statuses.values()), {k: v["status"] for k, v in statuses.items()}
    for pid in ids:
        assert statuses[pid]["output"] and statuses[pid]["output"][0].startswith("data:image/png;base64,")
    assert "Server restarted while this prediction was running" in statuses[ids[0]]["logs"]
    listed = httpx.get(f"{again.url}/v1/predictions").json()["results"]
    assert sorted(p["id"] for p in listed) == sorted(ids)


def test_sigterm_requeues_or_finishes_the_running_prediction(server_factory, tmp_path):
    data = tmp_path / "term"
    server = server_factory(data_dir=data)
    img, mask = noise_image(64, 64, seed=1), box_mask(64, 64, (8, 8, 40, 40))
    body = {"input": fast_input(img, mask, num_inference_steps=3)}
    ids = [httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"] for _ in range(3)]
    assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    again = server_factory(data_dir=data)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [httpx.get(f"{again.url}/v1/predictions/{pid}").json()["status"] for pid in ids]
        if states == ["succeeded"] * 3:
            break
        time.sleep(0.2)
    assert states == ["succeeded"] * 3


def test_retention_removes_outputs(server_factory, tmp_path):
    server = server_factory("--retention-hours", "0.0003")  # about one second
    img, mask = noise_image(64, 64, seed=1), box_mask(64, 64, (8, 8, 40, 40))
    p = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", headers={"Prefer": "wait=20"},
                   json={"input": fast_input(img, mask)}, timeout=30).json()
    assert p["output"] and not p["data_removed"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        p = httpx.get(f"{server.url}/v1/predictions/{p['id']}").json()
        if p["data_removed"]:
            break
        time.sleep(0.5)
    assert p["data_removed"] and p["output"] is None


def test_a_database_from_before_deadlines_opens_and_keeps_its_queue(tmp_path):
    """A database written before Cancel-After existed (no cancel_at column) gains the column when
    opened; its queued predictions are claimed as before."""
    import sqlite3

    from server.store import SCHEMA, SqliteStore

    path = tmp_path / "flux-fill.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.replace(",\n    cancel_at REAL", ""))
        assert "cancel_at" not in {r[1] for r in db.execute("PRAGMA table_info(predictions)")}
        db.execute("INSERT INTO predictions (id, status, version, input, created_at, output_token) "
                   "VALUES ('old', 'starting', 'hidden', '{}', 1.0, 't')")
    store = SqliteStore(path)
    try:
        claimed = store.claim_next("lease")
        assert claimed.id == "old" and claimed.status == "processing" and claimed.cancel_at is None
    finally:
        store.close()


def test_recovery_reruns_an_interrupted_prediction_until_its_last_attempt_and_honours_a_cancel(tmp_path):
    """What was running when the server died: it runs again, unless it has been interrupted
    --max-attempts times (it fails, in words) or it was asked to stop (it ends canceled)."""
    from server.events import Hub
    from server.files import FileStore
    from server.predictions import PredictionService
    from server.protocol import Status
    from server.settings import Settings
    from server.store import SqliteStore

    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    service = PredictionService(Settings(data_dir=tmp_path, max_attempts=3), store, FileStore(tmp_path, store, 24), Hub())
    for pid in ("again", "last", "stop", "queued"):
        store.insert_prediction(id=pid, status="starting", version="hidden", input={}, created_at=1.0, output_token="t")
    try:
        for pid, runs in (("again", 1), ("last", 3), ("stop", 1)):  # running when the server died
            store.move(pid, Status.PROCESSING, only_from=(Status.STARTING,), attempts=runs, lease=f"run of {pid}",
                       logs="Using seed: 1\n")
        assert service.cancel("stop").status == "processing"  # running: asked to stop, not yet stopped
        service.lifecycle.cancel_requested.clear()  # the server dies: what it held in memory is gone
        assert service.recover() == ["again"]
        records = {pid: store.get_prediction(pid) for pid in ("again", "last", "stop", "queued")}
        assert records["again"].status == "starting" and records["queued"].status == "starting"
        assert records["again"].lease is None
        assert records["last"].status == "failed" and records["last"].completed_at
        assert records["last"].error == ("This prediction was interrupted 3 times while it ran (the server stopped "
                                         "or was killed each time), so it is not run again.")
        assert records["last"].logs == "Using seed: 1\nError: " + records["last"].error + "\n"
        assert records["stop"].status == "canceled" and records["stop"].error is None
        assert "canceled; it does not run again" in records["stop"].logs
    finally:
        store.close()
