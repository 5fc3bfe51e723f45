"""The other APIs' own examples, replayed against a live server: the calls of the openai Python SDK's
own tests (tests/api_resources/test_images.py and test_models.py of openai-python, "with all
params", where they send a placeholder file this test sends a real picture) and the request and
answer examples of BFL's API reference (docs.bfl.ai: flux-pro-1.0-expand, flux-pro-1.0-fill,
get_result). Each answer must parse as the SDK's types, or have exactly the fields and types of
BFL's documented example.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time

import httpx
import openai
import pytest
from openai.types import ImagesResponse, Model
from PIL import Image

from tests.conftest import TOKEN
from tests.helpers import LiveServer, Receiver, box_mask, noise_image, png_bytes

KEY = {"x-key": TOKEN}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    live = LiveServer(tmp_path_factory.mktemp("examples") / "data",
                      args=["--weights", str(tiny_dir), "--api-token", TOKEN]).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=240)


def picture(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# -- openai-python's own test calls -------------------------------------------------------------------

IMAGE = png_bytes(noise_image(64, 64, seed=21))
MASK = png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))  # all transparent: all edited


def test_edit_with_all_params(client):
    """openai-python test_images.py: test_method_edit_with_all_params_overload_1."""
    image = client.images.edit(
        image=IMAGE,
        prompt="A cute baby sea otter wearing a beret",
        background="transparent",
        input_fidelity="high",
        mask=MASK,
        model="gpt-image-2",
        n=1,
        output_compression=100,
        output_format="png",
        partial_images=1,
        quality="high",
        response_format="url",
        size="256x256",
        stream=False,
        user="user-1234",
    )
    assert isinstance(image, ImagesResponse) and image.size == "256x256" and image.quality == "high"
    assert image.background == "opaque"  # what was made: FLUX paints no transparency
    assert picture(httpx.get(image.data[0].url).content).size == (256, 256)
    assert image.usage.total_tokens > 0


def test_edit_with_all_params_streamed(client):
    """openai-python test_images.py: test_method_edit_with_all_params_overload_2."""
    stream = client.images.edit(
        image=IMAGE,
        prompt="A cute baby sea otter wearing a beret",
        stream=True,
        background="transparent",
        input_fidelity="high",
        mask=MASK,
        model="gpt-image-2",
        n=1,
        output_compression=100,
        output_format="png",
        partial_images=1,
        quality="high",
        response_format="url",
        size="256x256",
        user="user-1234",
    )
    events = list(stream)
    assert events[-1].type == "image_edit.completed" and events[-1].usage.total_tokens > 0
    assert {e.type for e in events[:-1]} <= {"image_edit.partial_image"} and len(events) <= 2
    assert picture(base64.b64decode(events[-1].b64_json)).size == (256, 256)


def test_generate_with_all_params(client):
    """openai-python test_images.py: test_method_generate_with_all_params_overload_1, at 256x256
    rather than its "auto" (1024x1024: half a minute of the CPU test model; the size is all that
    changes)."""
    image = client.images.generate(
        prompt="A cute baby sea otter",
        background="transparent",
        model="gpt-image-2",
        moderation="low",
        n=1,
        output_compression=100,
        output_format="png",
        partial_images=1,
        quality="medium",
        response_format="url",
        size="256x256",
        stream=False,
        style="vivid",
        user="user-1234",
    )
    assert isinstance(image, ImagesResponse) and image.size == "256x256" and image.quality == "medium"
    assert picture(httpx.get(image.data[0].url).content).size == (256, 256)
    assert image.usage.output_tokens == 256 and image.usage.input_tokens_details.image_tokens == 0


def test_the_required_params_alone(client):
    """openai-python test_images.py: test_method_edit_overload_1, test_method_generate_overload_2 (a
    stream with nothing else; the test closes it at once: its predictions are canceled)."""
    edited = client.images.edit(image=IMAGE, prompt="A cute baby sea otter wearing a beret")
    assert picture(base64.b64decode(edited.data[0].b64_json)).size == (64, 64)
    image_stream = client.images.generate(prompt="A cute baby sea otter", stream=True)
    image_stream.response.close()


def test_models(client):
    """openai-python test_models.py: retrieve and list (its example name, "gpt-4o-mini", is no image
    model: OpenAI's 404)."""
    assert all(isinstance(m, Model) and m.object == "model" for m in client.models.list())
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o-mini")
    assert client.models.retrieve("gpt-image-2").id == "gpt-image-2"


# -- BFL's API reference --------------------------------------------------------------------------------


def poll(url: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(url, headers=KEY, timeout=10).json()
        if body["status"] != "Pending":
            return body
        assert time.monotonic() < deadline
        time.sleep(0.2)


def b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_bfls_expand_example(server):
    """The request example of POST /v1/flux-pro-1.0-expand (guidance 50.75, seed 123, 50 steps, a
    webhook with a secret), with a real image for its "<string>" and 16 px on every side for its
    1024 (a 2112 px canvas takes the CPU test model minutes): answered as the AsyncResponse example,
    then get_result's ResultResponse, the webhook signed with the secret."""
    receiver = Receiver()
    try:
        example = {"image": b64(noise_image(64, 48, seed=5), "JPEG"), "top": 16, "bottom": 16, "left": 16,
                   "right": 16, "prompt": "ein fantastisches bild", "steps": 50, "prompt_upsampling": True,
                   "seed": 123, "guidance": 50.75, "output_format": "jpeg", "safety_tolerance": 2,
                   "webhook_url": receiver.url, "webhook_secret": "<string>"}
        created = httpx.post(f"{server.url}/v1/flux-pro-1.0-expand", headers=KEY, json=example, timeout=60)
        assert created.status_code == 200, created.text
        task = created.json()
        assert set(task) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
        assert all(isinstance(task[k], str) for k in ("id", "polling_url"))
        assert (task["input_mp"], task["output_mp"]) == (0.0, 0.01)  # 64x48 in, 96x80 out
        done = poll(task["polling_url"])
        assert set(done) == {"id", "status", "result", "progress", "details", "preview"}
        assert done["status"] == "Ready" and done["result"]["seed"] == 123, done
        assert done["result"]["prompt"] == "ein fantastisches bild"
        sample = httpx.get(done["result"]["sample"], timeout=30)
        assert sample.headers["content-type"] == "image/jpeg" and picture(sample.content).size == (96, 80)
        receiver.wait(1)
        headers, body = receiver.posts[0]
        assert headers["x-bfl-signature"] == "sha256=" + hmac.new(b"<string>", body, hashlib.sha256).hexdigest()
        assert json.loads(body)["id"] == task["id"]
    finally:
        receiver.close()


def test_bfls_fill_example(server):
    """POST /v1/flux-pro-1.0-fill with the schema's example values and a mask "of the same
    dimensions as the image" (which the endpoint verifies)."""
    image, mask = noise_image(100, 60, seed=6), box_mask(100, 60, (10, 10, 50, 40))
    example = {"image": b64(image), "mask": b64(mask), "prompt": "ein fantastisches bild", "steps": 50,
               "guidance": 60, "output_format": "png", "safety_tolerance": 2}
    task = httpx.post(f"{server.url}/v1/flux-pro-1.0-fill", headers=KEY, json=example, timeout=60).json()
    done = poll(task["polling_url"])
    assert done["status"] == "Ready", done
    assert picture(httpx.get(done["result"]["sample"]).content).size == (100, 60)
    refused = httpx.post(f"{server.url}/v1/flux-pro-1.0-fill", headers=KEY, timeout=60,
                         json={**example, "mask": b64(box_mask(60, 100, (0, 0, 9, 9)))})
    assert refused.status_code == 422
    [detail] = refused.json()["detail"]  # the HTTPValidationError example: loc, msg, type
    assert set(detail) == {"loc", "msg", "type"} and detail["loc"] == ["body", "mask"]


def test_bfls_get_result_for_an_unknown_id(server):
    body = httpx.get(f"{server.url}/v1/get_result", params={"id": "no-such-task"}, headers=KEY).json()
    assert body == {"id": "no-such-task", "status": "Task not found", "result": None, "progress": None,
                    "details": None, "preview": None}
