"""Replicate's answers made from stored predictions, without HTTP: a real SQLite file and service."""

from __future__ import annotations

import json

from server.admission import Admission
from server.auth import NOBODY
from server.events import Hub
from server.files import FileStore
from server.predictions import PredictionService
from server.protocol import PredictionRequest, Status
from server.replicate import answers
from server.settings import Settings
from server.store import SqliteStore
from tests.helpers import box_mask, fast_input, noise_image, response_bytes


def test_a_create_answered_after_a_worker_took_the_prediction_shows_it_queued(tmp_path):
    """A create reads its prediction back after waking the workers; one may have taken it by then
    (another node's, on a shared database). The answer is ``starting``, as Replicate's create is, and
    like a queued prediction it has no ``started_at`` (the official clients' types leave it out)."""
    store = SqliteStore(tmp_path / "flux-fill.sqlite3")
    service = PredictionService(Settings(data_dir=tmp_path), store, FileStore(tmp_path, store, 24), Hub())
    request = PredictionRequest(input=fast_input(noise_image(32, 32), box_mask(32, 32, (4, 4, 28, 28))))
    created = service.create(request, Admission(version="hidden", wait=None, cancel_after_s=None), NOBODY)
    assert store.claim_next("another-node/worker", 60).id == created.id
    taken = store.get_prediction(created.id)
    assert taken.status == Status.PROCESSING and taken.started_at is not None

    shown = json.loads(response_bytes(answers.respond(service, taken, "http://127.0.0.1:5000", 201, {},
                                                       Status.STARTING)))
    assert shown["status"] == "starting" and shown["id"] == created.id
    assert not {"started_at", "completed_at", "metrics"} & set(shown)
    # the same record, asked for by GET, is what it is
    got = json.loads(response_bytes(answers.respond(service, taken, "http://127.0.0.1:5000")))
    assert got["status"] == "processing" and got["started_at"]
