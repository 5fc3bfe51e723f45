"""A running prediction's previews: kept in the store (SQLite and PostgreSQL) under the run's lease,
published as ``preview`` events here and to other nodes, dropped when it ends; served by
``GET /v1/predictions/{id}/preview`` and, on request only, by the stream."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from server.admission import Admission
from server.auth import NOBODY
from server.events import PREVIEW
from server.files import FileStore
from server.lifecycle import Lifecycle
from server.predictions import PredictionService
from server.protocol import PredictionRequest, Status
from server.records import PreviewRecord
from server.settings import Settings
from server.store import open_store
from tests.server.test_lifecycle import RecordingHub, RecordingSender, events_of

REQUEST = PredictionRequest(input={"prompt": "p", "image": "data:,x"})
QUEUE = Admission(version="hidden", wait=None, cancel_after_s=None)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "flux-fill.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def service(location, tmp_path):
    store = open_store(location)
    hub = RecordingHub()
    settings = Settings(data_dir=tmp_path)
    files = FileStore(tmp_path, store, 24)
    service = PredictionService(settings, store, files, hub, Lifecycle(settings, store, files, hub))
    yield service
    store.close()


def test_the_store_keeps_one_latest_preview_per_running_prediction_under_its_lease(service):
    store = service.store
    a, b = (service.create(REQUEST, QUEUE, NOBODY).id for _ in range(2))
    assert not store.put_preview(a, "no-lease", 1, 10, "image/webp", b"x", 1.0)  # queued: nothing is kept
    run = store.claim_next(2.0, "lease-a")
    assert run.id == a
    assert store.put_preview(a, "lease-a", 2, 10, "image/webp", b"\x00first\xff", 3.0)
    assert store.put_preview(a, "lease-a", 5, 10, "image/webp", b"\x00second\xff" * 1000, 4.0)
    assert store.get_preview(a) == PreviewRecord(a, 5, 10, "image/webp", b"\x00second\xff" * 1000, 4.0)
    assert not store.put_preview(a, "another-lease", 7, 10, "image/webp", b"stale", 5.0)
    assert store.get_preview(a).step == 5
    assert store.get_preview(b) is None
    store.drop_preview(a)
    assert store.get_preview(a) is None
    store.drop_preview(a)  # dropping twice is fine


def test_retention_drops_the_previews_of_predictions_that_no_longer_run(service):
    store = service.store
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    store.claim_next(2.0, "lease")
    assert store.put_preview(pid, "lease", 2, 10, "image/webp", b"x", 3.0)
    assert store.drop_stale_previews() == 0  # it still runs
    # Its node died after the move and before it dropped the preview.
    store.move(pid, Status.FAILED, only_from=(Status.PROCESSING,), held_by="lease", completed_at=4.0)
    assert store.get_preview(pid) is not None
    service.expire()
    assert store.get_preview(pid) is None


def test_the_lifecycle_keeps_and_publishes_a_preview_only_while_the_run_holds_it(service):
    lifecycle = service.lifecycle
    sender = RecordingSender()
    lifecycle.send_webhooks(sender, lambda record: {"id": record.id}, lambda owner: "s")
    pid = service.create(PredictionRequest(input=REQUEST.input, webhook="https://example.com/h"), QUEUE, NOBODY).id
    run = lifecycle.claim()
    assert lifecycle.preview(run, 3, 28, "image/webp", b"webp")
    assert service.store.get_preview(pid).data == b"webp"
    assert events_of(service, pid) == ["start", PREVIEW]
    assert [event for _, _, event, _, _ in sender.sent] == ["start"]  # previews are never webhooks
    assert lifecycle.succeed(run, [], "done\n", 1.0)
    assert service.store.get_preview(pid) is None  # dropped as it ends
    assert not lifecycle.preview(run, 9, 28, "image/webp", b"late")  # an encode that finished after the end
    assert service.store.get_preview(pid) is None
    assert events_of(service, pid) == ["start", PREVIEW, "completed"]


def test_a_run_that_lost_its_lease_keeps_no_preview(service):
    lifecycle = service.lifecycle
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    old = lifecycle.claim()
    service.store.requeue_interrupted()
    new = lifecycle.claim()
    assert new.id == pid and new.lease != old.lease
    assert not lifecycle.preview(old, 3, 28, "image/webp", b"stale")
    assert lifecycle.preview(new, 1, 28, "image/webp", b"fresh")
    assert service.store.get_preview(pid).data == b"fresh"


def test_a_preview_reaches_the_streams_of_other_nodes(service):
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    run = service.lifecycle.claim()
    heard = []
    service.store.notify = heard.append
    service.store.shared = True
    service.lifecycle.preview(run, 1, 4, "image/webp", b"x")
    assert heard == [f"{service.lifecycle.node} {pid} {PREVIEW}"]
    there = Lifecycle(service.settings, service.store, service.files, RecordingHub())
    there.remote_event(heard[0])
    assert there.hub.events == [(pid, f"remote {PREVIEW}")]


def test_previews_are_encoded_as_webp_off_the_denoising_thread(service):
    import threading
    import time

    import torch

    from inference.previews import Preview
    from server.previews import PreviewSender

    pid = service.create(REQUEST, QUEUE, NOBODY).id
    run = service.lifecycle.claim()
    sender = PreviewSender(service.lifecycle, Settings(data_dir=service.settings.data_dir, preview_interval_s=30))
    hooks = sender.for_run(run)
    assert hooks["preview_wanted"]()
    rgb = torch.full((4, 4, 3), 128, dtype=torch.uint8)
    hooks["on_preview"](Preview(rgb, None, 2, 8, (32, 32), None))
    assert not hooks["preview_wanted"]()  # the interval has not passed
    deadline = time.monotonic() + 10
    while service.store.get_preview(pid) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    record = service.store.get_preview(pid)
    assert (record.step, record.total, record.content_type) == (2, 8, "image/webp")
    image = Image.open(io.BytesIO(record.data))
    assert image.format == "WEBP" and image.size == (32, 32)
    assert abs(image.convert("RGB").getpixel((16, 16))[0] - 128) <= 3
    assert threading.current_thread().name not in {t.name for t in threading.enumerate() if t.name.startswith("previews")}
    sender.close()
    off = PreviewSender(service.lifecycle, Settings(data_dir=service.settings.data_dir, previews=False))
    assert off.for_run(run) == {}
