"""The lifecycle without HTTP, on a real SQLite file: every move of a status, its events, its
webhook hand-off, leases that fence a run out, and Cancel-After deadlines."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from server.admission import Admission
from server.auth import NOBODY
from server.events import Hub
from server.files import FileStore
from server.lifecycle import DEADLINE_BATCH, Lifecycle
from server.metrics import ServerMetrics
from server.predictions import PredictionService
from server.protocol import PredictionRequest, Status
from server.settings import Settings
from server.store import SqliteStore, now

REQUEST = PredictionRequest(input={"prompt": "p", "image": "data:,x"})
QUEUE = Admission(version="hidden", wait=None, cancel_after_s=None)


class RecordingHub(Hub):
    """Events as the lifecycle publishes them, handed to the listeners at once (no event loop)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def publish(self, prediction_id: str, event: str, remote: bool = False, record=None) -> None:
        self.events.append((prediction_id, event) if not remote else (prediction_id, f"remote {event}"))
        self._dispatch(prediction_id, event, remote, record)


class RecordingSender:
    """Records each webhook as sent and settles a final one as delivered."""

    def __init__(self):
        self.sent: list[tuple[str, str, str, dict, str]] = []

    def notify(self, prediction_id, url, events, event, snapshot, secret=None, done=None, signer=None, final=None):
        self.sent.append((prediction_id, url, event, snapshot(), secret))
        if final is not None:
            asyncio.run(final.delivered())
        elif done is not None:
            done()


@pytest.fixture
def service(tmp_path):
    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    hub = RecordingHub()
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    files = FileStore(tmp_path, store, 24)
    service = PredictionService(settings, store, files, hub, Lifecycle(settings, store, files, hub, ServerMetrics()))
    yield service
    store.close()


def events_of(service, pid):
    return [e for p, e in service.hub.events if p == pid]


def test_a_run_moves_through_every_status_and_publishes_each_move_once(service):
    lifecycle = service.lifecycle
    created = service.create(REQUEST, QUEUE, NOBODY)
    assert created.status == Status.STARTING and created.lease is None and created.attempts == 0
    assert events_of(service, created.id) == []
    run = lifecycle.claim()
    assert run.id == created.id and run.status == Status.PROCESSING and run.attempts == 1 and run.lease
    lifecycle.logs(run, "Using seed: 1\n")
    (service.files.outputs / run.id).mkdir(parents=True)
    (service.files.outputs / run.id / "out-0.webp").write_bytes(b"x" * 10)
    assert lifecycle.succeed(run, ["out-0.webp"], "Using seed: 1\ndone\n", 1.5)
    done = service.store.get_prediction(run.id)
    assert (done.status, done.output, done.output_bytes, done.logs, done.predict_time) == (
        Status.SUCCEEDED, ["out-0.webp"], 10, "Using seed: 1\ndone\n", 1.5)
    assert done.completed_at >= done.started_at >= done.created_at
    assert events_of(service, run.id) == ["start", "logs", "output", "completed"]
    # A terminal prediction moves no more: a late outcome and a late cancel change nothing.
    assert not lifecycle.fail(run, "late", "", 1.0)
    assert service.cancel(run.id).status == Status.SUCCEEDED
    assert events_of(service, run.id) == ["start", "logs", "output", "completed"]
    assert lifecycle.claim() is None


def test_a_run_whose_lease_was_taken_over_records_nothing(service):
    """The prediction went back to the queue without this run (a restart, an expired lease) and
    another run claimed it: the first run's logs and outcome are refused, the second's recorded."""
    lifecycle = service.lifecycle
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    first = lifecycle.claim()
    assert service.store.requeue_interrupted() == [pid]
    second = lifecycle.claim()
    assert second.id == pid and second.lease != first.lease and second.attempts == 2
    lifecycle.logs(first, "from the first run\n")
    assert not lifecycle.succeed(first, [], "first", 1.0)
    assert not lifecycle.fail(first, "first failed", "first", 1.0)
    assert lifecycle.requeue(first, "", 1.0) is None
    record = service.store.get_prediction(pid)
    assert record.status == Status.PROCESSING and record.lease == second.lease and "first" not in record.logs
    assert lifecycle.fail(second, "second failed", "second\n", 1.0)
    record = service.store.get_prediction(pid)
    assert (record.status, record.error, record.logs) == (Status.FAILED, "second failed", "second\n")
    assert events_of(service, pid).count("completed") == 1


def test_cancel_ends_a_queued_prediction_at_once_and_asks_a_running_one_to_stop(service):
    lifecycle = service.lifecycle
    queued = service.create(REQUEST, QUEUE, NOBODY).id
    running = service.create(REQUEST, QUEUE, NOBODY).id
    run = lifecycle.claim()
    assert run.id == queued  # oldest first
    later = service.create(REQUEST, QUEUE, NOBODY).id
    assert service.cancel(later).status == Status.CANCELED
    assert events_of(service, later) == ["completed"]
    record = service.cancel(queued)
    assert record.status == Status.PROCESSING and record.cancel_requested_at is not None
    assert lifecycle.stop_wanted(queued) and not lifecycle.stop_wanted(running)
    assert lifecycle.end_canceled(run, run.logs + lifecycle.cancel_reason(queued) + "\n", 0.5)
    record = service.store.get_prediction(queued)
    assert record.status == Status.CANCELED and record.logs == "Prediction canceled.\n"
    assert not lifecycle.stop_wanted(queued)  # forgotten once it ended


def test_a_requeue_puts_the_run_back_unless_canceled_or_out_of_attempts(service):
    lifecycle = service.lifecycle
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    run = lifecycle.claim()
    assert lifecycle.requeue(run, "step 1\n", 1.0) == Status.STARTING
    record = service.store.get_prediction(pid)
    assert (record.status, record.lease, record.started_at) == (Status.STARTING, None, None)
    assert record.logs.endswith("goes back to the queue.\n")
    lifecycle.logs(run, "a stale write\n")  # the run gave the prediction back: it writes nothing more
    assert "stale" not in service.store.get_prediction(pid).logs
    again = lifecycle.claim()
    assert again.attempts == 2
    assert lifecycle.requeue(again, again.logs, 1.0) == Status.FAILED  # max_attempts=2
    assert "interrupted 2 times" in service.store.get_prediction(pid).error

    other = service.create(REQUEST, QUEUE, NOBODY).id
    run = lifecycle.claim()
    service.cancel(other)
    assert lifecycle.requeue(run, "", 1.0) == Status.CANCELED  # a cancel wins over the queue


def test_final_events_go_to_the_webhook_sender_signed_for_their_tenant_and_to_the_metrics(service):
    lifecycle = service.lifecycle
    sender = RecordingSender()
    lifecycle.send_webhooks(sender, lambda record: {"id": record.id, "status": record.status.value},
                            lambda owner: f"secret of {owner}")
    hooked = service.create(PredictionRequest(input=REQUEST.input, webhook="https://example.com/hook"), QUEUE, NOBODY)
    plain = service.create(REQUEST, QUEUE, NOBODY)
    run = lifecycle.claim()
    lifecycle.fail(run, "no", "", 2.0)
    run = lifecycle.claim()
    lifecycle.fail(run, "no", "", 3.0)
    assert [(p, e, body["status"]) for p, _, e, body, _ in sender.sent] == [
        (hooked.id, "start", "processing"), (hooked.id, "completed", "failed")]
    assert {secret for *_, secret in sender.sent} == {"secret of None"}
    assert plain.id not in {p for p, *_ in sender.sent}
    assert lifecycle.metrics.registry.get_sample_value("flux_fill_predict_seconds_sum") == 5.0


def test_the_store_moves_no_status_as_a_plain_field(service):
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    with pytest.raises(ValueError):
        service.store.update_prediction(pid, status="succeeded")


def test_only_the_lifecycle_moves_a_status():
    """The store's status writes are called from server/lifecycle.py and nowhere else in the server."""
    moves = re.compile(r"\.(move|end_run|cancel_queued|claim_next|requeue_interrupted|insert_prediction"
                       r"|insert_prediction_guarded)\(")
    server = Path(__file__).resolve().parents[2] / "server"
    callers = {path.name for path in server.rglob("*.py") if moves.search(path.read_text())}
    assert callers - {"store.py"} == {"lifecycle.py"}  # the store's own calls are its own


def test_every_due_deadline_is_enforced_even_past_one_batch(service):
    lifecycle = service.lifecycle
    admission = Admission(version="hidden", wait=None, cancel_after_s=5.0)
    ids = [service.create(REQUEST, admission, NOBODY).id for _ in range(DEADLINE_BATCH + 50)]
    far = service.create(REQUEST, Admission(version="hidden", wait=None, cancel_after_s=3600.0), NOBODY)
    at = now() + 10
    waits = [lifecycle.enforce_deadlines(at)]
    while waits[-1] == 0.0:
        waits.append(lifecycle.enforce_deadlines(at))
    assert len(waits) == 2 and 0 < waits[-1] <= 30
    for pid in ids:
        record = service.store.get_prediction(pid)
        assert record.status == Status.CANCELED and record.started_at is None
        assert "Cancel-After deadline (5 s after creation) passed before the prediction started" in record.logs
    assert service.store.get_prediction(far.id).status == Status.STARTING
    assert service.store.claim_next("lease").id == far.id


def test_a_running_prediction_past_its_deadline_is_asked_to_stop_once(service):
    lifecycle = service.lifecycle
    created = service.create(REQUEST, Admission(version="hidden", wait=None, cancel_after_s=5.0), NOBODY)
    assert lifecycle.claim().id == created.id
    assert lifecycle.enforce_deadlines(now() + 6) == 30.0
    assert lifecycle.enforce_deadlines(now() + 7) == 30.0  # already stopping: not asked again
    assert lifecycle.stop_wanted(created.id)
    assert "passed while the prediction was running" in lifecycle.cancel_reason(created.id)


def node_on(service, settings=None):
    """Another node's lifecycle on the same database (as a second process would hold)."""
    return Lifecycle(settings or service.settings, service.store, service.files, RecordingHub())


def test_a_run_whose_lease_ran_out_runs_again_ends_canceled_or_fails(tmp_path):
    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    settings = Settings(data_dir=tmp_path, max_attempts=2, lease_s=2)
    files = FileStore(tmp_path, store, 24)
    service = PredictionService(settings, store, files, RecordingHub(), Lifecycle(settings, store, files, RecordingHub()))
    lifecycle = service.lifecycle
    again, canceled, last, alive = (service.create(REQUEST, QUEUE, NOBODY).id for _ in range(4))
    runs = {lifecycle.claim().id: None for _ in range(3)}
    assert set(runs) == {again, canceled, last}
    service.cancel(canceled)
    store.update_prediction(last, attempts=2)
    time.sleep(1.2)
    alive_run = lifecycle.claim()  # claimed later: it holds when the three leases have run out
    assert alive_run.id == alive
    time.sleep(1.0)
    assert lifecycle.expire_leases() == [again]
    records = {pid: store.get_prediction(pid) for pid in (again, canceled, last, alive)}
    assert records[again].status == Status.STARTING and "its lease ran out" in records[again].logs
    assert records[canceled].status == Status.CANCELED
    assert records[last].status == Status.FAILED and "interrupted 2 times" in records[last].error
    assert records[alive].status == Status.PROCESSING
    assert lifecycle.renew(alive_run)  # its heartbeat holds it past the time it would have run out
    time.sleep(1.2)
    assert lifecycle.expire_leases() == [] and store.get_prediction(alive).status == Status.PROCESSING
    store.close()


def test_a_cancel_asked_of_another_node_reaches_the_running_prediction(service):
    here, there = service.lifecycle, node_on(service)
    service.create(REQUEST, QUEUE, NOBODY)
    run = here.claim()
    assert not here.stop_wanted(run.id)
    assert there.cancel(run.id).status == Status.PROCESSING  # asked of the other node
    deadline = now() + 2
    while not here.stop_wanted(run.id):  # the running node reads it from the database within 0.2 s
        assert now() < deadline
    assert here.end_canceled(run, "", 0.1)


def test_other_nodes_moves_wake_streams_here_but_send_no_webhook_from_here(service):
    lifecycle = service.lifecycle
    sender = RecordingSender()
    lifecycle.send_webhooks(sender, lambda record: {"id": record.id}, lambda owner: "s")
    pid = service.create(PredictionRequest(input=REQUEST.input, webhook="https://example.com/h"), QUEUE, NOBODY).id
    lifecycle.remote_event(f"another-node {pid} completed")
    lifecycle.remote_event(f"{lifecycle.node} {pid} logs")  # this node's own, heard back: ignored
    assert events_of(service, pid) == ["remote completed"]
    assert sender.sent == []  # the node that made the move sends its webhook


def test_a_final_webhook_its_node_could_not_settle_is_sent_by_another(service):
    here, there = service.lifecycle, node_on(service)

    class DyingSender(RecordingSender):  # the node dies before the delivery settles: it is never settled
        def notify(self, prediction_id, url, events, event, snapshot, secret=None, done=None, signer=None,
                   final=None):
            self.sent.append((prediction_id, url, event, snapshot(), secret))

    dying, other = DyingSender(), RecordingSender()
    here.send_webhooks(dying, lambda record: {"status": record.status.value}, lambda owner: "s")
    there.send_webhooks(other, lambda record: {"status": record.status.value}, lambda owner: "s")
    here.outbox.hold_s = 0.5
    pid = service.create(PredictionRequest(input=REQUEST.input, webhook="https://example.com/h",
                                           webhook_events_filter=["completed"]), QUEUE, NOBODY).id
    here.fail(here.claim(), "no", "", 1.0)
    assert [e for _, _, e, _, _ in dying.sent] == ["start", "completed"]
    assert there.outbox.take_due() == []  # held by the first node's outbox while it renews its hold
    here.outbox.renew()
    assert there.outbox.take_due() == []
    time.sleep(0.7)  # the first node stopped renewing: it died
    taken = there.outbox.take_due()
    assert [r.id for r in taken] == [pid]
    there._send_webhook(taken[0], "completed")
    assert [(p, e, body) for p, _, e, body, _ in other.sent] == [(pid, "completed", {"status": "failed"})]
    assert there.outbox.take_due() == [] and service.store.get_prediction(pid).webhook_due is None
    assert service.store.get_prediction(pid).webhook_lease is None
