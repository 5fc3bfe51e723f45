"""Both store backends, on a real SQLite file and a real PostgreSQL database: the same calls give the
same records, pages, counts and claims; a claim is taken once however many connections race for it;
a run's lease fences its writes; one server per database."""

from __future__ import annotations

import threading
import time

import pytest

from server.protocol import Status
from server.records import FileRecord, PredictionRecord
from server.store import SqliteStore, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "flux-fill.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(location):
    store = open_store(location)
    yield store
    store.close()


def add(store, pid, created, **fields):
    store.insert_prediction(id=pid, version="hidden", input={"prompt": pid}, created_at=created,
                            output_token="t", **fields)


def test_records_pages_and_counts_read_the_same_on_both_backends(store):
    for n in range(5):
        add(store, f"p{n}", 100.0 + n, owner="alice" if n % 2 else None, webhook_events=["completed"],
            input_blobs=[["image", 0]], input_bytes=10 * n)
    record = store.get_prediction("p3")
    assert isinstance(record, PredictionRecord)
    assert (record.status, record.owner, record.input, record.webhook_events, record.input_blobs, record.logs) == (
        Status.STARTING, "alice", {"prompt": "p3"}, ["completed"], [["image", 0]], "")
    assert record.seq > store.get_prediction("p2").seq and record.data_removed is False
    newest = store.list_predictions(limit=2)
    assert [r.id for r in newest] == ["p4", "p3"]
    older = store.list_predictions(limit=10, before_seq=newest[-1].seq)
    assert [r.id for r in older] == ["p2", "p1", "p0"]
    newer = store.list_predictions(limit=1, after_seq=older[0].seq)
    assert [r.id for r in newer] == ["p3"]
    assert [r.id for r in store.list_predictions(limit=10, owner="alice")] == ["p3", "p1"]
    assert [r.id for r in store.list_predictions(limit=10, created_after=101.5, created_before=103.5)] == ["p3", "p2"]
    assert store.count_queued() == 5 and store.count_queued("alice") == 2 and store.count_predictions("alice") == 2
    assert store.stored_bytes("alice") == 40 and store.stored_bytes(None) == 60  # None is the implicit tenant
    assert store.count_by_status() == {"starting": 5}
    assert store.mean_predict_time() is None
    assert store.setting("k", lambda: "first") == "first" and store.setting("k", lambda: "second") == "first"


def test_a_run_moves_under_its_lease_and_a_taken_over_one_writes_nothing(store):
    add(store, "a", 1.0)
    run = store.claim_next("lease-1")
    assert (run.status, run.lease, run.attempts) == (Status.PROCESSING, "lease-1", 1)
    assert abs(run.started_at - time.time()) < 5
    assert store.claim_next("lease-2") is None
    assert store.update_prediction("a", held_by="lease-1", logs="step 1\n")
    assert store.requeue_interrupted() == ["a"]
    again = store.claim_next("lease-2")
    assert again.attempts == 2 and again.lease == "lease-2"
    assert not store.update_prediction("a", held_by="lease-1", logs="stale\n")
    assert store.move("a", Status.SUCCEEDED, only_from=(Status.PROCESSING,), held_by="lease-1") is None
    done = store.move("a", Status.SUCCEEDED, only_from=(Status.PROCESSING,), held_by="lease-2",
                      output=["out-0.webp"], predict_time=4.0, completed_at=5.0)
    assert (done.status, done.output, done.predict_time) == (Status.SUCCEEDED, ["out-0.webp"], 4.0)
    assert "it runs again" in done.logs and "stale" not in done.logs
    assert store.mean_predict_time() == 4.0
    with pytest.raises(ValueError):
        store.update_prediction("a", status="starting")


def test_deadlines_expiry_and_retention(store):
    add(store, "soon", 1.0, cancel_at=time.time() - 10)
    add(store, "late", 2.0, cancel_at=time.time() + 100)
    add(store, "none", 3.0)
    assert [r.id for r in store.deadlines()] == ["soon", "late"]
    assert store.claim_next("l").id == "late"  # past its deadline (the database's clock), "soon" is never claimed
    store.move("late", Status.SUCCEEDED, only_from=(Status.PROCESSING,), completed_at=16.0, output=["out-0.png"],
               output_bytes=7)
    assert store.expired_predictions(17.0) == ["late"] and store.expired_predictions(15.0) == []
    store.remove_data("late")
    gone = store.get_prediction("late")
    assert gone.data_removed and gone.output is None and gone.input == {} and gone.output_bytes == 0


def test_files_page_by_upload_order(store):
    for n in range(3):
        store.insert_file(id=f"f{n}", name=f"{n}.png", content_type="image/png", size=n + 1, sha256="s", md5="m",
                          metadata={"n": n}, created_at=float(n), expires_at=10.0 + n, path=f"/x/{n}",
                          owner="bob" if n else None)
    record = store.get_file("f1")
    assert isinstance(record, FileRecord) and (record.metadata, record.owner, record.size) == ({"n": 1}, "bob", 2)
    page = store.list_files(limit=2)
    assert [f.id for f in page] == ["f2", "f1"]
    assert [f.id for f in store.list_files(limit=5, before_seq=page[-1].seq)] == ["f0"]
    assert [f.id for f in store.list_files(limit=5, owner="bob")] == ["f2", "f1"]
    assert store.stored_bytes("bob") == 5
    assert [f.id for f in store.expired_files(11.5)] == ["f0", "f1"]
    assert store.delete_file("f0") and not store.delete_file("f0")


def test_racing_connections_claim_each_prediction_once(location):
    """Four connections (as four workers would hold) claim from one queue of 60: every prediction is
    claimed exactly once."""
    first = open_store(location)
    for n in range(60):
        add(first, f"q{n:02d}", float(n))
    stores = [first] + [open_store(location) for _ in range(3)]
    claimed: list[list[str]] = [[] for _ in stores]

    def claim_all(i):
        while (run := stores[i].claim_next(f"lease-{i}")) is not None:
            claimed[i].append(run.id)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        every = sorted(pid for ids in claimed for pid in ids)
        assert every == [f"q{n:02d}" for n in range(60)]
        assert first.count_by_status() == {"processing": 60}
    finally:
        for s in stores:
            s.close()


def test_leases_run_out_unless_renewed_by_the_database_clock(store):
    add(store, "a", 1.0)
    run = store.claim_next("lease-1", lease_s=1.0)
    assert abs(run.lease_expires_at - (store.now() + 1.0)) < 1.0
    assert store.expired_leases(grace_s=0) == []
    assert store.renew("a", "lease-1", 60.0) and not store.renew("a", "someone else's", 99.0)
    time.sleep(1.2)
    assert store.expired_leases(grace_s=0) == []  # renewed past it
    # Settling a lease that has not run out is refused (the run renewed it before it was settled).
    assert store.move("a", Status.STARTING, only_from=(Status.PROCESSING,), held_by="lease-1", expired_grace_s=0) is None
    assert store.renew("a", "lease-1", 0.2)
    time.sleep(0.4)
    assert [r.id for r in store.expired_leases(grace_s=0)] == ["a"]
    moved = store.move("a", Status.STARTING, only_from=(Status.PROCESSING,), held_by="lease-1", expired_grace_s=0,
                       lease=None, lease_expires_at=None)
    assert moved.status == Status.STARTING and moved.lease is None
    assert not store.renew("a", "lease-1", 30.0)  # the run lost it: its heartbeat now says so


def test_an_owed_final_webhook_is_held_by_one_sender_at_a_time(store):
    add(store, "a", 1.0, webhook="https://example.com/hook")
    run = store.claim_next("l")
    ended = store.end_run("a", Status.SUCCEEDED, held_by=run.lease, webhook_lease="node-a/1", webhook_hold_s=0.3,
                          completed_at=1.0)
    assert ended.webhook_lease == "node-a/1" and ended.webhook_due is not None
    assert store.claim_owed_webhooks("node-b/1", 60, grace_s=0) == []  # its own sender holds it
    assert store.renew_webhooks("node-a/1", 0.3) == 1
    time.sleep(0.5)  # node-a stopped renewing (it died): its hold runs out
    taken = store.claim_owed_webhooks("node-b/1", 60, grace_s=0)
    assert [r.id for r in taken] == ["a"] and taken[0].webhook_lease == "node-b/1"
    assert store.claim_owed_webhooks("node-c/1", 60, grace_s=0) == []  # held by the one who took it
    assert not store.webhook_sent("a", "node-a/1")  # the old holder settles nothing
    # A failure hands it back, due later, held by nobody; an attempt is counted.
    assert store.webhook_failed("a", "node-b/1", "HTTP 500") and store.webhook_later("a", "node-b/1", 0.3)
    later = store.get_prediction("a")
    assert (later.webhook_lease, later.webhook_attempts, later.webhook_error) == (None, 1, "HTTP 500")
    assert store.claim_owed_webhooks("node-c/1", 60, grace_s=0) == []  # not due yet
    time.sleep(0.5)
    assert [r.id for r in store.claim_owed_webhooks("node-c/1", 60, grace_s=0)] == ["a"]
    # A node restarted (same holder, new lease) takes back what it held before at once.
    assert [r.id for r in store.claim_owed_webhooks("node-c/2", 60, grace_s=0, holder="node-c")] == ["a"]
    assert store.webhook_sent("a", "node-c/2")
    assert store.claim_owed_webhooks("node-d/1", 60, grace_s=0) == []


def test_a_cancel_is_read_only_while_the_prediction_runs(store):
    add(store, "a", 1.0)
    store.claim_next("l")
    assert not store.cancel_requested("a")
    assert store.request_cancel("a", 2.0) and store.cancel_requested("a")
    store.move("a", Status.CANCELED, only_from=(Status.PROCESSING,), completed_at=3.0)
    assert not store.cancel_requested("a")


def test_every_node_on_a_postgresql_database_hears_the_others(postgres_url):
    hearing, speaking = open_store(postgres_url), open_store(postgres_url)
    heard: list[str] = []
    stop = threading.Event()
    listener = threading.Thread(target=hearing.listen, args=(heard.append, stop))
    listener.start()
    try:
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:  # LISTEN takes a moment to begin
            speaking.notify("node-b p1 completed")
            time.sleep(0.2)
        assert heard and set(heard) == {"node-b p1 completed"}
    finally:
        stop.set()
        listener.join(10)
        hearing.close()
        speaking.close()
    assert not listener.is_alive()


def test_a_sqlite_file_is_its_own_backend(tmp_path):
    store = open_store(tmp_path / "x.sqlite3")
    assert isinstance(store, SqliteStore)
    store.close()
