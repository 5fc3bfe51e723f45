"""Black Forest Labs' API on a real server on loopback, called with plain httpx as BFL's own examples
call it: ``x-key``, POST a task, poll ``get_result`` until ``Ready``, download ``result.sample``;
errors in BFL's shape; webhooks signed with ``X-BFL-Signature``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time

import httpx
import pytest
from PIL import Image

from server.bfl.adapter import dev_guidance, file_input
from tests.conftest import TOKEN
from tests.helpers import LiveServer, Receiver, box_mask, noise_image, png_bytes

OTHER = "other-tenant-token-456"
KEY = {"x-key": TOKEN}


def b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def bfl_server(tmp_path_factory, tiny_dir):
    server = LiveServer(tmp_path_factory.mktemp("bfl") / "data",
                        args=["--weights", str(tiny_dir), "--api-token", TOKEN, "--api-token", OTHER]).start()
    yield server
    server.stop()


def post(server, endpoint: str, body, headers=KEY) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{server.url}/v1/{endpoint}", headers={**headers, "content-type": "application/json"},
                          content=body, timeout=30)
    return httpx.post(f"{server.url}/v1/{endpoint}", headers=headers, json=body, timeout=30)


def poll(polling_url: str, headers=KEY, until=("Ready", "Error", "Content Moderated"), timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    seen = set()
    while True:
        answer = httpx.get(polling_url, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen.add(body["status"])
        if body["status"] in until:
            body["seen"] = seen
            return body
        assert body["status"] == "Pending", body
        assert body["progress"] is None or 0 <= body["progress"] <= 1
        assert time.monotonic() < deadline, f"still {body} after {timeout} s"
        time.sleep(0.1)


def fill_body(**extra) -> dict:
    img = noise_image(64, 64, seed=3)
    return {"image": b64(img), "mask": b64(box_mask(64, 64, (16, 16, 48, 48))), "prompt": "a red door",
            "steps": 15, "seed": 1234, **extra}


def test_fill_polled_to_ready_gives_a_sample_to_download(bfl_server):
    created = post(bfl_server, "flux-pro-1.0-fill", fill_body(safety_tolerance=6, prompt_upsampling=True))
    assert created.status_code == 200, created.text
    task = created.json()
    assert set(task) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert task["polling_url"] == f"{bfl_server.url}/v1/get_result?id={task['id']}"
    assert created.headers["x-request-id"] == task["id"]

    done = poll(task["polling_url"])
    assert done["status"] == "Ready", done
    assert done["id"] == task["id"] and done["progress"] == 1.0
    result = done["result"]
    assert result["prompt"] == "a red door" and result["seed"] == 1234
    assert result["end_time"] >= result["start_time"] and result["duration"] >= 0
    sample = httpx.get(result["sample"], timeout=10)  # no key needed: the URL is the capability
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(sample.content)).size == (64, 64)

    # The same prediction in Replicate's API (and so in the web page's history), its input translated.
    listed = httpx.get(f"{bfl_server.url}/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    mine = next(p for p in listed.json()["results"] if p["id"] == task["id"])
    assert mine["status"] == "succeeded"
    assert mine["input"]["guidance"] == 30 and mine["input"]["num_inference_steps"] == 15
    assert mine["input"]["output_format"] == "jpg" and mine["input"]["megapixels"] == "match_input"
    assert "webhook_secret" not in json.dumps(mine)


def test_expand_gives_the_canvas_size_and_the_format_asked_for(bfl_server):
    body = {"image": b64(noise_image(64, 64, seed=5)), "top": 32, "right": 64, "steps": 15, "seed": 1,
            "output_format": "png", "guidance": 100}
    task = post(bfl_server, "flux-pro-1.0-expand", body).json()
    done = poll(task["polling_url"])
    assert done["status"] == "Ready", done
    sample = httpx.get(done["result"]["sample"], timeout=10)
    assert sample.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(sample.content)).size == (128, 96)
    shown = httpx.get(f"{bfl_server.url}/v1/predictions/{task['id']}", headers=KEY, timeout=10).json()
    assert {k: shown["input"].get(k) for k in ("expand_top", "expand_right", "guidance")} == \
        {"expand_top": 32, "expand_right": 64, "guidance": 50}


def test_the_images_alpha_is_the_mask_and_without_either_the_request_is_422(bfl_server):
    rgba = noise_image(64, 64, seed=6).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (8, 8, 40, 40))
    done = poll(post(bfl_server, "flux-pro-1.0-fill", {"image": b64(rgba), "steps": 15}).json()["polling_url"])
    assert done["status"] == "Ready", done

    before = count(bfl_server)
    opaque = {"image": b64(noise_image(64, 64, seed=6), "JPEG"), "steps": 15}
    refused = post(bfl_server, "flux-pro-1.0-fill", opaque)
    assert refused.status_code == 422, refused.text
    [detail] = refused.json()["detail"]
    assert detail["loc"] == ["body", "mask"] and "mask is required" in detail["msg"]
    assert count(bfl_server) == before


def upload(server, img: Image.Image) -> str:
    """This server's URL of an uploaded picture: a URL input the worker reads (not the API node)."""
    made = httpx.post(f"{server.url}/v1/files", headers={"Authorization": f"Bearer {TOKEN}"},
                      files={"content": ("p.png", png_bytes(img), "image/png")}, timeout=30)
    assert made.status_code == 201, made.text
    return made.json()["urls"]["get"]


def test_pictures_given_as_urls_are_checked_by_the_worker(bfl_server):
    """A URL's picture is first seen by the worker that fetches it: the task is accepted (no size
    known: no cost), then fails in words; with matching sizes it is Ready at the input's size."""
    image, small_mask = upload(bfl_server, noise_image(72, 40, seed=2)), upload(bfl_server, box_mask(36, 20, (0, 0, 9, 9)))
    task = post(bfl_server, "flux-pro-1.0-fill", {"image": image, "mask": small_mask, "steps": 15}).json()
    assert (task["cost"], task["input_mp"], task["output_mp"]) == (None, None, None)
    failed = poll(task["polling_url"])
    assert failed["status"] == "Error" and "the mask must have the image's size" in failed["details"]["error"]
    mask = upload(bfl_server, box_mask(72, 40, (0, 0, 30, 30)))
    done = poll(post(bfl_server, "flux-pro-1.0-fill", {"image": image, "mask": mask, "steps": 15}).json()["polling_url"])
    assert done["status"] == "Ready", done
    assert Image.open(io.BytesIO(httpx.get(done["result"]["sample"]).content)).size == (72, 40)


def sample_size(done: dict) -> tuple[int, int]:
    return Image.open(io.BytesIO(httpx.get(done["result"]["sample"], timeout=10).content)).size


def test_outputs_have_bfls_exact_sizes(bfl_server):
    """The engine works at multiples of 32; the answer is the input's size (Fill), or the input's
    plus the sides (Expand), exactly."""
    fill = post(bfl_server, "flux-pro-1.0-fill", {"image": b64(noise_image(250, 190, seed=1)),
                                                  "mask": b64(box_mask(250, 190, (20, 20, 120, 90))), "steps": 15})
    expand = post(bfl_server, "flux-pro-1.0-expand", {"image": b64(noise_image(256, 192, seed=2)), "left": 16,
                                                      "right": 64, "top": 32, "bottom": 0, "steps": 15,
                                                      "output_format": "png"})
    assert sample_size(poll(fill.json()["polling_url"])) == (250, 190)
    assert sample_size(poll(expand.json()["polling_url"])) == (336, 224)
    # The create's cost (megapixel-steps / 50, at the size the engine generates) and megapixels.
    assert fill.json() | {"id": None, "polling_url": None} == {"id": None, "polling_url": None, "cost": 0.01,
                                                                "input_mp": 0.05, "output_mp": 0.05}
    assert (expand.json()["input_mp"], expand.json()["output_mp"]) == (0.05, 0.08)
    assert expand.json()["cost"] == round(320 * 224 / 1e6 * 15 / 50, 2)


def test_a_mask_of_another_size_is_422_naming_it(bfl_server):
    before = count(bfl_server)
    answer = post(bfl_server, "flux-pro-1.0-fill", fill_body(mask=b64(box_mask(32, 64, (0, 0, 8, 8)))))
    assert answer.status_code == 422, answer.text
    [detail] = answer.json()["detail"]
    assert detail["loc"] == ["body", "mask"] and "mask is 32x64 and the image 64x64" in detail["msg"]
    assert count(bfl_server) == before


def test_a_pending_task_says_when_to_ask_again(bfl_server):
    big = {"image": b64(noise_image(512, 512, seed=1)), "mask": b64(box_mask(512, 512, (0, 0, 256, 256))),
           "steps": 50}
    task = post(bfl_server, "flux-pro-1.0-fill", big).json()
    pending = httpx.get(task["polling_url"], headers=KEY, timeout=10)
    assert pending.json()["status"] == "Pending" and 1 <= int(pending.headers["retry-after"]) <= 10
    assert pending.headers["x-request-id"] == task["id"]
    httpx.post(f"{bfl_server.url}/v1/predictions/{task['id']}/cancel", headers=KEY, timeout=10)
    done = poll(task["polling_url"])
    assert "retry-after" not in httpx.get(task["polling_url"], headers=KEY, timeout=10).headers, done


def test_an_image_url_and_a_data_uri_are_taken_as_they_are():
    assert file_input(" https://example.com/a.png ", "image") == "https://example.com/a.png"
    assert file_input("data:image/png;base64,AAAA", "mask") == "data:image/png;base64,AAAA"
    assert file_input(b64(noise_image(8, 8), "JPEG"), "image").startswith("data:image/jpeg;base64,/9j/")
    assert file_input(b64(noise_image(8, 8), "WEBP"), "image").startswith("data:image/webp;base64,")


@pytest.mark.parametrize("bfl, dev", [(60, 30), (1.5, 0.75), (100, 50), (37, 18.5)])
def test_guidance_is_halved_for_the_dev_model(bfl, dev):
    assert dev_guidance(bfl) == dev


def test_x_key_and_bearer_are_the_same_tokens_and_anything_else_is_bfls_403(bfl_server):
    url = f"{bfl_server.url}/v1/get_result?id=whatever"
    assert httpx.get(url, headers={"x-key": TOKEN}).json()["status"] == "Task not found"
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    bfls = {"detail": "Not authenticated - Invalid Authentication"}
    for headers in ({}, {"x-key": "wrong"}, {"x-key": ""}):
        answer = httpx.get(url, headers=headers)
        assert (answer.status_code, answer.json()) == (403, bfls)
    before = count(bfl_server)
    for endpoint in ("flux-pro-1.0-fill", "flux-pro-1.0-expand"):
        refused = post(bfl_server, endpoint, fill_body(), headers={"x-key": "wrong"})
        assert (refused.status_code, refused.json()) == (403, bfls)
    assert count(bfl_server) == before
    # x-key works on Replicate's routes too.
    assert httpx.get(f"{bfl_server.url}/v1/predictions", headers=KEY).status_code == 200


def count(server) -> int:
    return len(httpx.get(f"{server.url}/v1/predictions", headers=KEY, timeout=10).json()["results"])


@pytest.mark.parametrize("endpoint, change, loc", [
    ("flux-pro-1.0-fill", {"steps": 5}, ["body", "steps"]),
    ("flux-pro-1.0-fill", {"steps": 51}, ["body", "steps"]),
    ("flux-pro-1.0-fill", {"guidance": 1.0}, ["body", "guidance"]),
    ("flux-pro-1.0-fill", {"output_format": "webp"}, ["body", "output_format"]),
    ("flux-pro-1.0-fill", {"safety_tolerance": 7}, ["body", "safety_tolerance"]),
    ("flux-pro-1.0-fill", {"seed": -1}, ["body", "seed"]),
    ("flux-pro-1.0-fill", {"image": None}, ["body", "image"]),
    ("flux-pro-1.0-fill", {"image": "bm90IGFuIGltYWdl"}, ["body", "image"]),
    ("flux-pro-1.0-fill", {"mask": "ftp://example.com/m.png"}, ["body", "mask"]),
    ("flux-pro-1.0-fill", {"webhook_url": "ftp://example.com/hook"}, ["body", "webhook_url"]),
    ("flux-pro-1.0-expand", {"top": -1}, ["body", "top"]),
    ("flux-pro-1.0-expand", {"left": 2049}, ["body", "left"]),
])
def test_bad_values_are_422_in_bfls_shape_and_write_nothing(bfl_server, endpoint, change, loc):
    before = count(bfl_server)
    body = {k: v for k, v in {**fill_body(), **change}.items() if v is not None}
    answer = post(bfl_server, endpoint, body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/json"
    detail = answer.json()["detail"]
    assert [d["loc"] for d in detail] == [loc], detail
    assert all(d["msg"] and d["type"] for d in detail)
    assert "input" not in detail[0]  # the value sent (perhaps a whole image) is not echoed
    assert count(bfl_server) == before


def test_a_body_that_is_not_json_is_422_in_bfls_shape(bfl_server):
    answer = post(bfl_server, "flux-pro-1.0-fill", b"{not json")
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("field", ["webhook_secret", "prompt"])
def test_a_lone_surrogate_is_422_not_a_server_error(bfl_server, field):
    before = count(bfl_server)
    body = json.dumps(fill_body()).replace("}", f', "{field}": "a\\ud800b"}}').encode()
    answer = post(bfl_server, "flux-pro-1.0-fill", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", field], answer.text
    assert count(bfl_server) == before


def test_unknown_and_other_tenants_ids_are_task_not_found(bfl_server):
    task = post(bfl_server, "flux-pro-1.0-fill", fill_body()).json()
    for key, expected in ((OTHER, "Task not found"), (TOKEN, None)):
        body = httpx.get(task["polling_url"], headers={"x-key": key}).json()
        if expected:
            assert body == {"id": task["id"], "status": expected, "result": None, "progress": None,
                            "details": None, "preview": None}
        else:
            assert body["status"] != "Task not found"
    assert httpx.get(f"{bfl_server.url}/v1/get_result?id=nope", headers=KEY).json()["status"] == "Task not found"
    missing = httpx.get(f"{bfl_server.url}/v1/get_result", headers=KEY)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["query", "id"]
    poll(task["polling_url"])


def test_a_canceled_task_is_an_error_that_says_so(bfl_server):
    # A long task holds the one worker; the next one is canceled while it waits.
    big = {"image": b64(noise_image(256, 256, seed=1)), "mask": b64(box_mask(256, 256, (0, 0, 128, 128))),
           "steps": 50}
    first = post(bfl_server, "flux-pro-1.0-fill", big).json()
    second = post(bfl_server, "flux-pro-1.0-fill", fill_body()).json()
    for task in (second, first):
        canceled = httpx.post(f"{bfl_server.url}/v1/predictions/{task['id']}/cancel", headers=KEY, timeout=10)
        assert canceled.status_code == 200
    done = poll(second["polling_url"])
    assert done["status"] == "Error" and done["details"]["reason"] == "canceled"
    assert poll(first["polling_url"])["status"] in ("Error", "Ready")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_the_webhook_is_bfl_shaped_signed_with_the_secret_and_sent_once(bfl_server, receiver):
    secret = "my-webhook-secret"
    task = post(bfl_server, "flux-pro-1.0-fill", fill_body(webhook_url=receiver.url, webhook_secret=secret)).json()
    unsigned = post(bfl_server, "flux-pro-1.0-fill", fill_body(webhook_url=receiver.url + "?plain=1")).json()
    receiver.wait(2)
    time.sleep(1.0)  # nothing more comes: one POST per task, on completion only
    assert len(receiver.posts) == 2, receiver.posts
    by_id = {json.loads(body)["id"]: (headers, body) for headers, body in receiver.posts}

    headers, body = by_id[task["id"]]
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-bfl-signature"], expected)
    assert "webhook-signature" not in headers  # not Replicate's signature: BFL's receivers check BFL's
    payload = json.loads(body)
    assert payload["status"] == "Ready" and payload["timestamp"].endswith("Z")
    assert payload["result"] == poll(task["polling_url"])["result"]
    assert httpx.get(payload["result"]["sample"]).status_code == 200

    headers, body = by_id[unsigned["id"]]
    assert "x-bfl-signature" not in headers and json.loads(body)["status"] == "Ready"


def test_a_queued_task_survives_a_restart_and_its_webhook_is_sent_once(server_factory, tmp_path, receiver):
    data = tmp_path / "restart-data"
    api_only = server_factory("--api-token", TOKEN, "--no-workers", data_dir=data)
    task = post(api_only, "flux-pro-1.0-fill",
                fill_body(webhook_url=receiver.url, webhook_secret="s3cret")).json()
    assert httpx.get(task["polling_url"], headers=KEY).json()["status"] == "Pending"
    api_only.stop()

    server = server_factory("--api-token", TOKEN, data_dir=data)  # the same data, now with a worker
    polling_url = task["polling_url"].replace(api_only.url, server.url)
    assert poll(polling_url)["status"] == "Ready"
    receiver.wait(1)
    time.sleep(1.0)
    assert len(receiver.posts) == 1
    headers, body = receiver.posts[0]
    assert headers["x-bfl-signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert json.loads(body)["id"] == task["id"]
    server.stop()
    server_factory("--api-token", TOKEN, data_dir=data)  # a second restart owes nothing: nothing sent again
    time.sleep(2.0)
    assert len(receiver.posts) == 1


def test_progress_and_seed_are_the_records_facts_not_its_logs():
    """get_result's progress and seed are what the run recorded (Store fields), whatever the logs say."""
    from server.bfl.adapter import progress
    from server.protocol import Status
    from server.records import PredictionRecord

    base = dict(id="abc", version="v", input={}, created_at=0.0, output_token="t",
                logs="Using seed: 99\n 90%|#########  | 9/10 [00:01<00:00]\n")
    running = PredictionRecord(status=Status.PROCESSING, step=7, steps=28, **base)
    assert progress(running) == 0.25
    assert progress(PredictionRecord(status=Status.PROCESSING, **base)) == 0.0  # no step recorded yet
    assert progress(PredictionRecord(status=Status.STARTING, **base)) == 0.0
    assert progress(PredictionRecord(status=Status.FAILED, **base)) is None
