"""One scenario through every API the server speaks, on one server: a create that ends with its
result in the API's own shape, its completion webhook in the API's style (once), a bad value
refused in the API's shape with nothing written, and, where the API has a cancel, a queued
prediction canceled. Each prediction, whichever API made it, is one of the server's own: it is in
Replicate's list with the API that made it."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest

from tests.helpers import LiveServer, Receiver, box_mask, fast_input, noise_image, png_bytes

MODEL = "/v1/models/black-forest-labs/flux-fill-dev/predictions"


def b64(img) -> str:
    return base64.b64encode(png_bytes(img)).decode()


def quick(seed: int) -> dict:
    return fast_input(noise_image(64, 64, seed), box_mask(64, 64, (8, 8, 40, 40)), seed=seed)


def slow(seed: int) -> dict:
    """Seconds of work on the CPU: what is created after it waits in the queue."""
    return quick(seed) | {"num_inference_steps": 50, "megapixels": "1", "num_outputs": 4}


@dataclass(frozen=True)
class Api:
    name: str
    create: Callable[[str, int, str | None], object]  # (server url, seed, webhook url) -> its id (OpenAI: its answer)
    done: Callable[[str, object], dict | None]  # the answer once the prediction ended, in the API's shape
    succeeded: Callable[[dict], bool]
    bad: Callable[[str], httpx.Response]  # a create with a bad value
    bad_shape: Callable[[httpx.Response], bool]
    hook: Callable[[dict, str], bool] | None = None  # is this webhook body the prediction's completion?
    cancel: Callable[[str, str], None] | None = None
    canceled: Callable[[dict], bool] | None = None


# -- Replicate's predictions ------------------------------------------------------------------------

def replicate_create(url: str, seed: int, hook: str | None) -> str:
    body = {"input": quick(seed)} | ({"webhook": hook, "webhook_events_filter": ["completed"]} if hook else {})
    r = httpx.post(url + MODEL, json=body, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def replicate_done(url: str, pid: str) -> dict | None:
    p = httpx.get(f"{url}/v1/predictions/{pid}", timeout=30).json()
    return p if p["status"] in ("succeeded", "failed", "canceled") else None


REPLICATE = Api(
    "replicate", replicate_create, replicate_done,
    succeeded=lambda p: p["status"] == "succeeded" and p["output"][0].startswith("data:image/"),
    bad=lambda url: httpx.post(url + MODEL, json={"input": quick(1) | {"num_inference_steps": 0}}),
    bad_shape=lambda r: r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    and r.json()["invalid_fields"][0]["field"] == "input.num_inference_steps",
    hook=lambda body, pid: body["id"] == pid and body["status"] == "succeeded",
    cancel=lambda url, pid: httpx.post(f"{url}/v1/predictions/{pid}/cancel").raise_for_status(),
    canceled=lambda p: p["status"] == "canceled",
)


# -- BFL's fill -------------------------------------------------------------------------------------

def bfl_create(url: str, seed: int, hook: str | None) -> str:
    body = {"image": b64(noise_image(64, 64, seed)), "mask": b64(box_mask(64, 64, (8, 8, 40, 40))),
            "prompt": "a door", "steps": 15, "seed": seed} | ({"webhook_url": hook} if hook else {})
    r = httpx.post(f"{url}/v1/flux-pro-1.0-fill", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def bfl_done(url: str, pid: str) -> dict | None:
    r = httpx.get(f"{url}/v1/get_result", params={"id": pid}, timeout=30).json()
    return None if r["status"] == "Pending" else r


BFL = Api(
    "bfl", bfl_create, bfl_done,
    succeeded=lambda r: r["status"] == "Ready" and r["result"]["sample"].startswith("http"),
    bad=lambda url: httpx.post(f"{url}/v1/flux-pro-1.0-fill", json={"image": b64(noise_image(64, 64, 1)),
                                                                  "steps": 5}),
    bad_shape=lambda r: r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"],
    hook=lambda body, pid: body["id"] == pid and body["status"] == "Ready",
)


# -- Cog's container API ----------------------------------------------------------------------------

def cog_create(url: str, seed: int, hook: str | None) -> str:
    body = {"input": quick(seed)} | ({"webhook": hook, "webhook_events_filter": ["completed"]} if hook else {})
    r = httpx.post(f"{url}/cog/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def cog_done(url: str, pid: str) -> dict | None:
    p = httpx.get(f"{url}/cog/predictions/{pid}", timeout=30).json()
    return p if p["status"] in ("succeeded", "failed", "canceled") else None


COG = Api(
    "cog", cog_create, cog_done,
    succeeded=lambda p: p["status"] == "succeeded" and p["output"][0].startswith("data:image/"),
    bad=lambda url: httpx.post(f"{url}/cog/predictions", json={"input": quick(1) | {"num_inference_steps": 0}}),
    bad_shape=lambda r: r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "num_inference_steps",
    hook=lambda body, pid: body["id"] == pid and body["status"] == "succeeded",
    cancel=lambda url, pid: httpx.post(f"{url}/cog/predictions/{pid}/cancel").raise_for_status(),
    canceled=lambda p: p["status"] == "canceled",
)


# -- OpenAI's images (answered when the images are made; no webhooks, no cancel) ----------------------

def openai_create(url: str, seed: int, hook: str | None) -> tuple[str, dict]:
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": f"a door {seed}", "size": "64x64"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"], r.json()


OPENAI = Api(
    "openai", openai_create, lambda url, made: made[1],
    succeeded=lambda answer: len(answer["data"]) == 1 and base64.b64decode(answer["data"][0]["b64_json"])[:4] == b"\x89PNG",
    bad=lambda url: httpx.post(f"{url}/v1/images/generations", json={"prompt": "a door", "size": "3x3"}),
    bad_shape=lambda r: r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"},
)

APIS = [REPLICATE, BFL, COG, OPENAI]
IDS = [api.name for api in APIS]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    server = LiveServer(tmp_path_factory.mktemp("every") / "data", args=["--weights", str(tiny_dir)]).start()
    yield server
    server.stop()


def until_done(api: Api, url: str, made, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while (answer := api.done(url, made)) is None:
        assert time.monotonic() < deadline, f"{api.name}: {made} did not end"
        time.sleep(0.1)
    return answer


def listed(url: str) -> dict[str, dict]:
    return {p["id"]: p for p in httpx.get(f"{url}/v1/predictions", timeout=30).json()["results"]}


@pytest.mark.parametrize("api", APIS, ids=IDS)
def test_a_create_ends_with_its_result_and_webhook_in_the_apis_shapes(server, api):
    receiver = Receiver()
    try:
        made = api.create(server.url, 7, receiver.url if api.hook else None)
        answer = until_done(api, server.url, made)
        assert api.succeeded(answer), answer
        if api.hook is not None:
            pid = made
            receiver.wait(1, timeout=30)
            time.sleep(0.5)  # a second webhook would be here by now
            bodies = [json.loads(body) for _, body in receiver.posts]
            assert len(bodies) == 1 and api.hook(bodies[0], pid), bodies
        else:
            pid = next(p for p, rec in listed(server.url).items() if rec["input"].get("prompt") == "a door 7")
        assert listed(server.url)[pid]["api"] == api.name  # one of the server's own predictions
    finally:
        receiver.close()


@pytest.mark.parametrize("api", APIS, ids=IDS)
def test_a_bad_value_is_refused_in_the_apis_shape_and_writes_nothing(server, api):
    before = set(listed(server.url))
    r = api.bad(server.url)
    assert api.bad_shape(r), (r.status_code, r.text)
    assert set(listed(server.url)) == before


@pytest.mark.parametrize("api", [a for a in APIS if a.cancel], ids=[a.name for a in APIS if a.cancel])
def test_a_queued_prediction_is_canceled_through_the_apis_cancel(server, api):
    blocker = httpx.post(server.url + MODEL, json={"input": slow(3)}, timeout=30).json()["id"]
    try:
        queued = api.create(server.url, 11, None)
        api.cancel(server.url, queued)
        answer = until_done(api, server.url, queued, timeout=30)
        assert api.canceled(answer), answer
    finally:
        httpx.post(f"{server.url}/v1/predictions/{blocker}/cancel")
