"""A running prediction's previews: kept in the store (SQLite and PostgreSQL) under the run's lease,
published as ``preview`` events here and to other nodes, dropped when it ends; served by
``GET /v1/predictions/{id}/preview`` and, on request only, by the stream."""

from __future__ import annotations

import io
import time

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
    run = store.claim_next("lease-a")
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
    store.claim_next("lease")
    assert store.put_preview(pid, "lease", 2, 10, "image/webp", b"x", 3.0)
    assert store.drop_stale_previews() == 0  # it still runs
    # Its node died after the move and before it dropped the preview.
    store.move(pid, Status.FAILED, only_from=(Status.PROCESSING,), held_by="lease", completed_at=4.0)
    assert store.get_preview(pid) is not None
    service.expire()
    assert store.get_preview(pid) is None


def test_watchers_of_previews_are_kept_until_their_time_and_dropped_with_the_prediction(service):
    store = service.store
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    assert not store.previews_watched(pid, 100.0)
    store.watch_previews(pid, 130.0)  # a stream opened while it was queued
    store.watch_previews(pid, 110.0)  # a shorter wish does not cut a longer one
    assert store.previews_watched(pid, 125.0) and not store.previews_watched(pid, 131.0)
    assert store.drop_stale_previews() == 0 and store.previews_watched(pid, 125.0)  # queued: kept
    store.drop_preview(pid)
    assert not store.previews_watched(pid, 100.0)
    store.watch_previews(pid, 130.0)
    service.cancel(pid)
    assert not store.previews_watched(pid, 100.0)  # it ended


def test_previews_are_wanted_only_while_someone_watches(service, monkeypatch):
    import server.lifecycle as lifecycle_module
    from server.previews import PreviewSender

    monkeypatch.setattr(lifecycle_module, "PREVIEW_CHECK_S", 0.0)
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    run = service.lifecycle.claim()
    wanted = PreviewSender(service.lifecycle, Settings(data_dir=service.settings.data_dir)).for_run(run)["preview_wanted"]
    assert not wanted()  # nobody asked: no preview is made, encoded or written
    there = Lifecycle(service.settings, service.store, service.files, RecordingHub())
    there.watch_previews(pid)  # a stream on another node asks for them
    assert wanted()
    assert service.preview(pid) is None  # a reader of the preview is a watcher too
    assert service.store.previews_watched(pid, time.time() + 5)


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


def test_a_run_put_back_in_the_queue_leaves_no_preview_and_keeps_its_watchers(service):
    lifecycle = service.lifecycle
    pid = service.create(REQUEST, QUEUE, NOBODY).id
    run = lifecycle.claim()
    lifecycle.watch_previews(pid)
    assert lifecycle.preview(run, 3, 28, "image/webp", b"x")
    assert lifecycle.requeue(run, "", 0.1) == Status.STARTING  # the server is stopping
    assert service.store.get_preview(pid) is None
    assert service.store.previews_watched(pid, time.time())


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
    service.lifecycle.watch_previews(pid)
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


# -- on a live server, through the official client and plain HTTP ------------------------------

import base64  # noqa: E402
import json  # noqa: E402

import httpx  # noqa: E402
import replicate  # noqa: E402
from replicate.stream import EventSource, ServerSentEvent  # noqa: E402

from tests.helpers import box_mask, fast_input, noise_image  # noqa: E402

MODEL = "black-forest-labs/flux-fill-dev"
SLOW = dict(num_inference_steps=40, seed=7)  # a second or more on the tiny model: previews have time to form


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory, tiny_dir):
    from tests.helpers import LiveServer

    server = LiveServer(tmp_path_factory.mktemp("previews") / "data",
                        args=["--weights", str(tiny_dir), "--preview-interval-s", "0.01"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big_picture():
    return noise_image(128, 128, seed=4), box_mask(128, 128, (16, 16, 96, 96))


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            if name and not line.startswith(":"):
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "event" in fields:
            events.append({"event": fields["event"][0], "id": fields["id"][0], "data": "\n".join(fields.get("data", []))})
    return events


def test_a_stream_asked_for_previews_carries_them_before_the_output(preview_server, big_picture):
    client = replicate.Client(base_url=preview_server.url, api_token="none")
    prediction = client.predictions.create(model=MODEL, input=fast_input(*big_picture, **SLOW), stream=True)
    text = httpx.get(prediction.urls["stream"] + "?previews=true", timeout=120).text
    events = sse_events(text)
    names = [e["event"] for e in events]
    assert names[-2:] == ["output", "done"] and "preview" in names
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    previews = [json.loads(e["data"]) for e in events if e["event"] == "preview"]
    assert len(previews) <= 8
    steps = [p["step"] for p in previews]
    assert steps == sorted(set(steps)) and all(p["total"] == 40 and 0 < p["step"] < 40 for p in previews)
    head, _, payload = previews[-1]["image"].partition(",")
    assert head == "data:image/webp;base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert image.format == "WEBP" and image.size == (128, 128)
    # The official client's own parser knows no such event: that is why previews are asked for.
    decoder = EventSource.Decoder()
    with pytest.raises(ValueError):
        for line in text.replace("\r\n", "\n").split("\n"):
            decoder.decode(line)


def test_the_official_clients_stream_is_unchanged_while_previews_form(preview_server, big_picture):
    client = replicate.Client(base_url=preview_server.url, api_token="none")
    events = list(client.stream(MODEL, input=fast_input(*big_picture, **SLOW)))
    kinds = {e.event for e in events}
    assert kinds <= set(ServerSentEvent.EventType) and ServerSentEvent.EventType.OUTPUT in kinds
    prediction = client.predictions.create(model=MODEL, input=fast_input(*big_picture, **SLOW), stream=True)
    text = httpx.get(prediction.urls["stream"], timeout=120).text
    assert {e["event"] for e in sse_events(text)} <= {"output", "logs", "done"}
    assert "preview" not in text


def test_get_preview_answers_the_forming_picture_then_404_once_it_ends(preview_server, big_picture):
    client = replicate.Client(base_url=preview_server.url, api_token="none")
    # Polled between other tests' work on shared cores, where one pass of the loop has taken over a
    # second: four outputs make the run outlast that (a few seconds on the tiny model).
    prediction = client.predictions.create(model=MODEL, input=fast_input(*big_picture, **SLOW, num_outputs=4))
    url = f"{preview_server.url}/v1/predictions/{prediction.id}/preview"
    seen = None
    deadline = time.monotonic() + 120
    while seen is None and time.monotonic() < deadline:
        answer = httpx.get(url, timeout=10)
        if answer.status_code == 200:
            seen = answer
        else:
            assert answer.status_code == 404 and answer.headers["content-type"] == "application/problem+json"
            prediction.reload()
            assert prediction.status in ("starting", "processing"), "it ended before a preview was seen"
            time.sleep(0.02)
    assert seen is not None
    assert seen.headers["content-type"] == "image/webp" and seen.headers["cache-control"] == "no-store"
    assert 0 < int(seen.headers["preview-step"]) < int(seen.headers["preview-total"]) == 40
    assert Image.open(io.BytesIO(seen.content)).size == (128, 128)
    prediction.wait()
    assert prediction.status == "succeeded"
    gone = httpx.get(url, timeout=10)
    assert gone.status_code == 404 and "no preview" in gone.json()["detail"]
    assert httpx.get(f"{preview_server.url}/v1/predictions/{'0' * 26}/preview", timeout=10).status_code == 404


def test_no_previews_turns_them_off(server_factory, big_picture):
    server = server_factory("--no-previews", "--preview-interval-s", "0.01")
    client = replicate.Client(base_url=server.url, api_token="none")
    prediction = client.predictions.create(model=MODEL, input=fast_input(*big_picture, **SLOW), stream=True)
    text = httpx.get(prediction.urls["stream"] + "?previews=true", timeout=120).text
    assert [e["event"] for e in sse_events(text)][-2:] == ["output", "done"] and "preview" not in text


def test_previews_made_on_a_worker_node_reach_an_api_node_s_stream(server_factory, postgres_url, tmp_path,
                                                                   big_picture):
    """PostgreSQL: the worker keeps each preview in the shared database and tells the other nodes;
    the API node's stream (and its GET preview) serve it."""
    blobs = str(tmp_path / "blobs")
    api = server_factory("--database", postgres_url, "--blob-dir", blobs, "--no-workers")
    server_factory("--database", postgres_url, "--blob-dir", blobs, "--preview-interval-s", "0.01", command="worker")
    client = replicate.Client(base_url=api.url, api_token="none")
    prediction = client.predictions.create(model=MODEL, input=fast_input(*big_picture, **SLOW), stream=True)
    text = httpx.get(prediction.urls["stream"] + "?previews=true", timeout=120).text
    events = sse_events(text)
    assert [e["event"] for e in events][-2:] == ["output", "done"]
    previews = [json.loads(e["data"]) for e in events if e["event"] == "preview"]
    assert previews and previews[0]["image"].startswith("data:image/webp;base64,")
    assert httpx.get(f"{api.url}/v1/predictions/{prediction.id}/preview", timeout=10).status_code == 404  # it ended
