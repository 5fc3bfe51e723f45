"""OpenAI's image API, driven by the official JavaScript client (npm `openai` 6.49.0) against a live
server: an edit with a mask at an exact size, URLs from several predictions, streamed partial
images, errors, today's model names with usage and request ids, and the models list. Each test runs one scenario of tests/js/openai.mjs with Node and checks the JSON it
prints. Without `node` or the module (`npm ci` in tests/js) the tests are skipped, unless
FLUX_FILL_REQUIRE_JS is set (CI), where they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from PIL import Image

from tests.conftest import TOKEN
from tests.helpers import JS_DIR, NODE, LiveServer, js_client_mark, noise_image, png_bytes

pytestmark = js_client_mark("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    live = LiveServer(tmp_path_factory.mktemp("openai-js") / "data",
                      args=["--weights", str(tiny_dir), "--api-token", TOKEN, "--preview-interval-s", "0.02"]).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai-js-pictures")
    (folder / "image.png").write_bytes(png_bytes(noise_image(64, 64, seed=12)))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: edited
    (folder / "mask.png").write_bytes(png_bytes(mask))
    return folder


def scenario(name: str, server, pictures, timeout: float = 240) -> dict:
    env = {**os.environ, "FLUX_BASE_URL": f"{server.url}/v1", "FLUX_TOKEN": TOKEN,
           "FLUX_IMAGE": str(pictures / "image.png"), "FLUX_MASK": str(pictures / "mask.png")}
    done = subprocess.run([NODE, "openai.mjs", name], cwd=JS_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output from {name}:\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert done.returncode == 0 and "error" not in result, f"{name}: {result}\n{done.stderr[-3000:]}"
    return result


def test_an_edit_with_a_mask_at_an_exact_size(server, pictures):
    result = scenario("edit", server, pictures)
    assert result["count"] == 1 and result["size"] == "96x64" and result["created"] > 0
    assert result["images"] == [{"format": "png", "width": 96, "height": 64}]


def test_five_images_as_urls(server, pictures):
    result = scenario("urls", server, pictures)
    assert result["count"] == 5
    for item in result["images"]:
        assert item == {"status": 200, "type": "image/jpeg", "format": "jpeg", "width": 64, "height": 64, "b64": None}


def test_streamed_partial_images_then_the_image(server, pictures):
    events = scenario("stream", server, pictures)["events"]
    assert events[-1] == {"type": "image_edit.completed", "index": None, "format": "png", "width": 128, "height": 96}
    partials = events[:-1]
    assert 1 <= len(partials) <= 2, events
    assert partials == [{"type": "image_edit.partial_image", "index": i, "format": "png", "width": 128, "height": 96}
                        for i in range(len(partials))]


def test_errors_as_the_client_raises_them(server, pictures):
    seen = scenario("errors", server, pictures)
    assert seen["token"] == {"status": 401, "code": "invalid_api_key", "param": None, "type": "invalid_request_error",
                             "name": "AuthenticationError"}
    assert seen["n"]["status"] == 400 and seen["n"]["param"] == "n" and seen["n"]["name"] == "BadRequestError"
    assert seen["model"]["status"] == 400 and seen["model"]["param"] == "model" and seen["model"]["code"] == "invalid_value"


def test_todays_model_names_with_usage_and_request_ids(server, pictures):
    result = scenario("todays", server, pictures)
    edit, generation = result["edit"], result["generation"]
    assert edit["images"] == [{"format": "png", "width": 64, "height": 64}]
    assert edit["usage"]["input_tokens_details"]["image_tokens"] == 16 and edit["usage"]["output_tokens"] == 16
    assert edit["usage"]["total_tokens"] == edit["usage"]["input_tokens"] + 16 > 16
    assert generation["count"] == 2 and generation["usage"]["output_tokens"] == 2 * 24
    assert generation["usage"]["input_tokens_details"]["image_tokens"] == 0
    assert len(edit["requestId"]) == 26 and edit["requestId"] != generation["requestId"]  # the predictions' ids
    assert len(result["header"]) == 26


def test_models_list_and_retrieve(server, pictures):
    result = scenario("models", server, pictures)
    assert {"gpt-image-2", "gpt-image-1.5", "chatgpt-image-latest", "dall-e-3", "flux-fill-dev"} <= set(result["ids"])
    assert result["one"] == {"id": "gpt-image-2", "object": "model", "owned_by": "black-forest-labs",
                             "created": 1732147200}
    missing = result["missing"]
    assert (missing["status"], missing["code"], missing["name"]) == (404, "model_not_found", "NotFoundError")
    assert missing["requestId"].startswith("req_")
