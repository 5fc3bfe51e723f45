"""The prediction service without HTTP, on a real SQLite file: Cancel-After deadlines."""

from __future__ import annotations

from server.admission import Admission
from server.auth import NOBODY
from server.events import Hub
from server.files import FileStore
from server.predictions import DEADLINE_BATCH, PredictionService
from server.protocol import PredictionRequest
from server.settings import Settings
from server.store import Store, now


def service_on(tmp_path) -> PredictionService:
    store = Store(tmp_path / "flux-fill.sqlite3")
    return PredictionService(Settings(data_dir=tmp_path), store, FileStore(tmp_path, store, 24), Hub())


def test_every_due_deadline_is_enforced_even_past_one_batch(tmp_path):
    service = service_on(tmp_path)
    request = PredictionRequest(input={"prompt": "p", "image": "data:,x"})
    admission = Admission(version="hidden", wait=None, cancel_after_s=5.0)
    ids = [service.create(request, admission, NOBODY)["id"] for _ in range(DEADLINE_BATCH + 50)]
    far = service.create(request, Admission(version="hidden", wait=None, cancel_after_s=3600.0), NOBODY)
    at = now() + 10
    waits = [service.enforce_deadlines(at)]
    while waits[-1] == 0.0:
        waits.append(service.enforce_deadlines(at))
    assert len(waits) == 2 and 0 < waits[-1] <= 30
    for pid in ids:
        row = service.store.get_prediction(pid)
        assert row["status"] == "canceled" and row["started_at"] is None
        assert "Cancel-After deadline (5 s after creation) passed before the prediction started" in row["logs"]
    assert service.store.get_prediction(far["id"])["status"] == "starting"
    assert service.store.claim_next(at)["id"] == far["id"]  # a prediction past its deadline is never claimed
    service.store.close()


def test_a_running_prediction_past_its_deadline_is_asked_to_stop_once(tmp_path):
    service = service_on(tmp_path)
    request = PredictionRequest(input={"prompt": "p", "image": "data:,x"})
    created = service.create(request, Admission(version="hidden", wait=None, cancel_after_s=5.0), NOBODY)
    claimed = service.store.claim_next(now())
    assert claimed["id"] == created["id"]
    assert service.enforce_deadlines(now() + 6) == 30.0
    assert service.enforce_deadlines(now() + 7) == 30.0  # already stopping: not asked again
    assert created["id"] in service.cancel_requested
    assert "passed while the prediction was running" in service.cancel_reasons[created["id"]]
    service.store.close()
