"""Cog's container API on a real server on loopback (mounted at the root, as a Cog image serves it),
driven with httpx: sync and async creates, idempotent PUT, cancel, the health check, webhooks
with an events filter, validation errors in Cog's shape, and requests queued instead of Cog's 409."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from tests.helpers import Receiver
from tests.server.cog.conftest import quick, slow, until

KEYS = {"input", "output", "id", "version", "created_at", "started_at", "completed_at", "logs", "error", "status",
        "metrics"}


def new_id() -> str:
    """A prediction id as Cog's docs make one: a UUID4, base32, lower case, unpadded."""
    return base64.b32encode(uuid.uuid4().bytes).decode().lower().rstrip("=")


def picture(data_url: str) -> Image.Image:
    head, _, data = data_url.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_sync_create_answers_the_finished_prediction(cog_server):
    sent = quick(1)
    r = httpx.post(f"{cog_server.url}/predictions", json={"input": sent}, timeout=60)
    assert r.status_code == 200
    p = r.json()
    assert set(p) == KEYS
    assert p["status"] == "succeeded" and p["error"] is None and p["input"] == sent
    assert picture(p["output"][0]).size == (64, 64)
    assert p["metrics"]["predict_time"] > 0 and p["version"] is None
    assert p["created_at"] <= p["started_at"] <= p["completed_at"] and p["completed_at"].endswith("+00:00")
    assert "Using seed: 1" in p["logs"]
    assert r.headers["x-request-id"] == p["id"]
    # The same prediction through Replicate's API: one queue, one store.
    replicate = httpx.get(f"{cog_server.url}/v1/predictions/{p['id']}").json()
    assert replicate["status"] == "succeeded" and replicate["input"] == sent


def test_a_failed_prediction_is_200_with_its_error(cog_server):
    sent = quick(2)
    del sent["mask"]  # the noise picture has no transparent area to repaint
    r = httpx.post(f"{cog_server.url}/predictions", json={"input": sent}, timeout=60)
    assert r.status_code == 200
    p = r.json()
    assert p["status"] == "failed" and "mask is required" in p["error"] and p["output"] is None


def test_async_create_then_polling(cog_server):
    r = httpx.post(f"{cog_server.url}/predictions", json={"input": quick(3)},
                   headers={"Prefer": "respond-async"}, timeout=10)
    assert r.status_code == 202
    p = r.json()
    assert p["status"] in ("starting", "processing") and p["output"] is None and p["metrics"] is None
    done = until(cog_server, p["id"], lambda q: q["status"] == "succeeded")
    assert done["status"] == "succeeded" and picture(done["output"][0]).size == (64, 64)
    # Polling as Cog's clients retry: the same PUT again answers the prediction, never a second one.
    again = httpx.put(f"{cog_server.url}/predictions/{p['id']}", json={"input": quick(3)},
                      headers={"Prefer": "respond-async"}, timeout=10)
    assert again.status_code == 202 and again.json()["status"] == "succeeded" and again.json()["id"] == p["id"]


def test_idempotent_put_makes_one_prediction(cog_server):
    pid = new_id()
    before = len(httpx.get(f"{cog_server.url}/v1/predictions").json()["results"])
    first = httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": quick(4)},
                      headers={"Prefer": "respond-async"}, timeout=10)
    assert first.status_code == 202 and first.json()["id"] == pid
    # Retried at once, and then as a sync request: the same prediction, whatever the body says now.
    retry = httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": quick(99)},
                      headers={"Prefer": "respond-async"}, timeout=10)
    assert retry.status_code == 202 and retry.json()["id"] == pid and retry.json()["input"] == quick(4)
    final = httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": quick(4)}, timeout=60)
    assert final.status_code == 200 and final.json()["status"] == "succeeded"
    assert "Using seed: 4" in final.json()["logs"]
    listed = httpx.get(f"{cog_server.url}/v1/predictions").json()["results"]
    assert len(listed) == before + 1 and [x["id"] for x in listed].count(pid) == 1
    # A body id is the same idempotent create; a different one than the path's is Cog's 422.
    same = httpx.post(f"{cog_server.url}/predictions", json={"id": pid, "input": quick(4)}, timeout=60)
    assert same.status_code == 200 and same.json()["id"] == pid
    clash = httpx.put(f"{cog_server.url}/predictions/{pid}", json={"id": "other", "input": quick(4)})
    assert clash.status_code == 422
    assert clash.json() == {"detail": [{"loc": ["body", "id"], "type": "value_error",
                                        "msg": "prediction ID must match the ID supplied in the URL"}]}


def test_concurrent_puts_of_one_id_make_one_prediction(cog_server):
    pid = new_id()
    with ThreadPoolExecutor(4) as pool:  # at once
        answers = list(pool.map(lambda _: httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": quick(5)}, timeout=60), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["id"] for a in answers} == {pid} and {a.json()["status"] for a in answers} == {"succeeded"}
    assert {a.json()["completed_at"] for a in answers} == {answers[0].json()["completed_at"]}


def test_two_concurrent_sync_requests_are_queued_not_refused(cog_server):
    answers = []

    def post(seed):
        answers.append(httpx.post(f"{cog_server.url}/predictions", json={"input": quick(seed, num_inference_steps=8)},
                                  timeout=120))

    threads = [threading.Thread(target=post, args=(seed,)) for seed in (6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200, 200]  # Cog's one slot would answer the second 409
    first, second = sorted((a.json() for a in answers), key=lambda p: p["started_at"])
    assert first["status"] == second["status"] == "succeeded" and first["id"] != second["id"]
    assert second["started_at"] >= first["completed_at"]  # one worker: the second waited in the queue


def test_cancel(cog_server):
    pid = new_id()
    r = httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": slow(8)},
                  headers={"Prefer": "respond-async"}, timeout=10)
    assert r.status_code == 202
    canceled = httpx.post(f"{cog_server.url}/predictions/{pid}/cancel", timeout=10)
    assert canceled.status_code == 200 and canceled.json() == {}
    p = until(cog_server, pid, lambda q: q["status"] == "canceled")
    assert p["status"] == "canceled" and p["output"] is None
    unknown = httpx.post(f"{cog_server.url}/predictions/{new_id()}/cancel", timeout=10)
    assert unknown.status_code == 404 and unknown.json() == {}


def test_sync_request_waits_while_others_run_and_answers_when_canceled(cog_server):
    pid = new_id()
    answer = []
    waiting = threading.Thread(target=lambda: answer.append(
        httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": slow(9)}, timeout=60)))
    waiting.start()
    until(cog_server, pid, lambda q: q.get("status") in ("starting", "processing"), timeout=20)
    assert httpx.post(f"{cog_server.url}/predictions/{pid}/cancel", timeout=10).status_code == 200
    waiting.join(60)
    assert answer[0].status_code == 200 and answer[0].json()["status"] == "canceled"


def test_health_check(cog_server):
    h = httpx.get(f"{cog_server.url}/health-check").json()
    assert h["status"] in ("READY", "BUSY")
    assert h["setup"]["status"] == "succeeded" and h["setup"]["logs"] == ""
    assert h["setup"]["started_at"] <= h["setup"]["completed_at"]
    pid = new_id()
    httpx.put(f"{cog_server.url}/predictions/{pid}", json={"input": slow(10)}, headers={"Prefer": "respond-async"})
    until(cog_server, pid, lambda q: q["status"] == "processing")
    assert httpx.get(f"{cog_server.url}/health-check").json()["status"] == "BUSY"
    httpx.post(f"{cog_server.url}/predictions/{pid}/cancel")
    until(cog_server, pid, lambda q: q["status"] == "canceled")
    assert httpx.get(f"{cog_server.url}/health-check").json()["status"] == "READY"


def test_webhooks_follow_the_events_filter(cog_server):
    receiver = Receiver()
    try:
        only_ends = httpx.post(f"{cog_server.url}/predictions", headers={"Prefer": "respond-async"}, json={
            "input": quick(11), "webhook": receiver.url, "webhook_events_filter": ["start", "completed"]})
        assert only_ends.status_code == 202
        pid = only_ends.json()["id"]
        receiver.wait(2)
        bodies = [json.loads(body) for _, body in receiver.posts]
        assert [b["status"] for b in bodies] == ["processing", "succeeded"]
        assert all(set(b) == KEYS and b["id"] == pid for b in bodies)
        assert picture(bodies[-1]["output"][0]).size == (64, 64)  # Cog's webhooks carry data URLs too
        assert bodies[-1]["metrics"]["predict_time"] > 0

        receiver.posts.clear()
        every = httpx.post(f"{cog_server.url}/predictions", json={"input": quick(12, num_inference_steps=6),
                                                                   "webhook": receiver.url}, timeout=60)
        assert every.json()["status"] == "succeeded"
        deadline = time.monotonic() + 60  # the log webhooks come first, in order, however many there are
        while not any(json.loads(body)["status"] == "succeeded" for _, body in receiver.posts) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        statuses = [json.loads(body)["status"] for _, body in receiver.posts]
        assert statuses[0] == "processing" and statuses[-1] == "succeeded" and len(statuses) >= 3  # logs between

        for events, check in ((["output"], lambda bodies: len(bodies) == 1 and bodies[0]["output"]),
                              (["logs"], lambda bodies: bodies and all(b["logs"] for b in bodies))):
            receiver.posts.clear()
            done = httpx.post(f"{cog_server.url}/predictions", timeout=60, json={
                "input": quick(13, num_inference_steps=6), "webhook": receiver.url, "webhook_events_filter": events})
            assert done.json()["status"] == "succeeded"
            receiver.wait(1)
            time.sleep(1)  # any webhook the filter should have held back would have come by now
            posts = [json.loads(body) for _, body in receiver.posts]
            # the receiver is the earlier predictions' too: a late final webhook of theirs is theirs
            mine = [b for b in posts if b["id"] == done.json()["id"]]
            assert check(mine), (events, [(b["id"], b["status"], bool(b["output"]), len(b["logs"] or "")) for b in posts])
    finally:
        receiver.close()


def test_validation_errors_in_cogs_shape(cog_server):
    r = httpx.post(f"{cog_server.url}/predictions", json={"input": {"prompt": 1, "num_outputs": 9}})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert {tuple(d["loc"]) for d in detail} == {("body", "input", "prompt"), ("body", "input", "image"),
                                                  ("body", "input", "num_outputs")}
    assert all(set(d) == {"loc", "msg", "type"} for d in detail)
    # Admission's checks (the same as Replicate's creates), in Cog's shape.
    bad_url = httpx.post(f"{cog_server.url}/predictions", json={"input": quick(13), "webhook": "ftp://x"})
    assert bad_url.status_code == 422 and bad_url.json()["detail"][0]["loc"] == ["body", "webhook"]
    no_body = httpx.post(f"{cog_server.url}/predictions")
    assert no_body.status_code == 422 and ["body", "input", "prompt"] in [d["loc"] for d in no_body.json()["detail"]]
    bad_id = httpx.put(f"{cog_server.url}/predictions/..%2Fetc", json={"input": quick(13)})
    assert bad_id.status_code in (404, 422) and "detail" in bad_id.json()
    assert httpx.put(f"{cog_server.url}/predictions/a.b", json={"input": quick(13)}).json()["detail"][0]["loc"] == \
        ["path", "prediction_id"]


def test_other_answers_in_cogs_shape(cog_server):
    stream = httpx.post(f"{cog_server.url}/predictions", json={"input": quick(14)},
                        headers={"Accept": "text/event-stream"})
    assert stream.status_code == 406 and "does not support streaming" in stream.json()["error"]
    wrong_method = httpx.delete(f"{cog_server.url}/predictions/abc")
    assert wrong_method.status_code == 405 and wrong_method.json() == {"detail": "Method Not Allowed"}
    unknown = httpx.get(f"{cog_server.url}/predictions/{new_id()}")
    assert unknown.status_code == 404 and set(unknown.json()) == {"detail"}
    # The rest of the server keeps its own shapes and pages.
    assert httpx.get(f"{cog_server.url}/v1/predictions/nope").headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{cog_server.url}/").headers["content-type"].startswith("text/html")
    assert httpx.get(f"{cog_server.url}/openapi.json").json()["info"]["title"] == "flux-fill-server"
