"""Masks without a brush through the server: mask_prompt on Replicate's, OpenAI's and BFL's creates
(the mask used kept beside the outputs), POST /v1/masks for tools and the page (authenticated,
tenant-bound, bounded), and a server without a segmenter saying which flag it lacks."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from inference.tiny_segmenter import ensure_tiny_segmenter
from tests.helpers import LiveServer, box_mask, data_uri, fast_input, noise_image, png_bytes

ALICE, BOB = "alice-token-1", "bob-token-2"
MODEL = "/v1/models/black-forest-labs/flux-fill-dev/predictions"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    live = LiveServer(tmp_path_factory.mktemp("masks") / "data", args=[
        "--weights", str(tiny_dir), "--segmenter", "tiny", "--api-token", f"alice:{ALICE}", "--api-token",
        f"bob:{BOB}", "--max-image-pixels", "300000"]).start()
    yield live
    live.stop()


def mask_of(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "L"
    return np.asarray(img)


def wait_for(server, pid: str, token: str) -> dict:
    r = httpx.get(f"{server.url}/v1/predictions/{pid}", headers=auth(token) | {"Prefer": "wait=60"}, timeout=90)
    p = r.json()
    for _ in range(60):
        if p["status"] in ("succeeded", "failed", "canceled"):
            return p
        p = httpx.get(f"{server.url}/v1/predictions/{pid}", headers=auth(token), timeout=30).json()
    return p


# -- mask_prompt on every API -----------------------------------------------------------------------

def test_a_replicate_create_with_mask_prompt_and_no_mask_succeeds_and_shows_the_mask_it_used(server):
    img = noise_image(96, 64, 1)
    r = httpx.post(server.url + MODEL, headers=auth(ALICE) | {"Prefer": "wait"}, timeout=120,
                   json={"input": fast_input(img, mask_prompt="the red car")})
    assert r.status_code == 201, r.text
    p = r.json() if r.json()["status"] == "succeeded" else wait_for(server, r.json()["id"], ALICE)
    assert p["status"] == "succeeded", p["error"]
    line = next(line for line in p["logs"].splitlines() if line.startswith("mask_prompt 'the red car'"))
    assert "of the image" in line
    assert p["input"]["mask_prompt"] == "the red car"
    mask = httpx.get(p["urls"]["mask"], timeout=30)  # a capability URL, as outputs are: no token
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    pixels = mask_of(mask.content)
    assert pixels.shape == (64, 96)
    # The coverage the logs name is the mask's own.
    assert f"{(pixels / 255).mean():.1%} of the image" in line
    # /v1/masks with the same sentence on the same picture selects the same mask.
    same = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE), timeout=60,
                      json={"image": data_uri(img), "text": "the red car"})
    assert np.array_equal(mask_of(same.content), pixels)
    # The mask is an input like an output: the next prediction repaints what this one selected.
    again = httpx.post(server.url + MODEL, headers=auth(ALICE) | {"Prefer": "wait"}, timeout=120,
                       json={"input": fast_input(img) | {"mask": p["urls"]["mask"]}})
    again = again.json() if again.json()["status"] == "succeeded" else wait_for(server, again.json()["id"], ALICE)
    assert again["status"] == "succeeded", again["error"]
    # Another prediction's mask name is not served by a token of this one, nor for a prediction without one.
    plain = httpx.post(server.url + MODEL, headers=auth(ALICE) | {"Prefer": "wait"}, timeout=120,
                       json={"input": fast_input(img, box_mask(96, 64, (0, 0, 40, 40)))}).json()
    plain = plain if plain["status"] == "succeeded" else wait_for(server, plain["id"], ALICE)
    assert "mask" not in plain["urls"]
    token = p["urls"]["mask"].split("/")[-2]
    assert httpx.get(f"{server.url}/outputs/{plain['id']}/{token}/mask.png").status_code == 404


def test_mask_prompt_through_openais_edit_with_the_official_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0, timeout=120)
    img = noise_image(64, 64, 2)  # no alpha, no mask: the sentence is the mask
    answer = client.images.edit(image=("cat.png", png_bytes(img), "image/png"), prompt="a cat",
                                extra_body={"mask_prompt": "the sky", "mask_mode": "replace"})
    out = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert out.size == (64, 64)
    assert mask_of(httpx.get(answer.model_extra["mask_url"], timeout=30).content).shape == (64, 64)
    listed = httpx.get(f"{server.url}/v1/predictions", headers=auth(ALICE)).json()["results"]
    made = next(p for p in listed if p.get("api") == "openai")
    assert made["input"]["mask_prompt"] == "the sky" and made["input"]["mask_mode"] == "replace"
    assert "mask" in httpx.get(f"{server.url}/v1/predictions/{made['id']}", headers=auth(ALICE)).json()["urls"]
    painted = client.images.edit(image=("cat.png", png_bytes(img), "image/png"), prompt="a cat",
                                 mask=("m.png", png_bytes(noise_image(64, 64, 3, mode="RGBA")), "image/png"))
    assert "mask_url" not in (painted.model_extra or {})  # an edit without mask_prompt answers OpenAI's keys only
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("cat.png", png_bytes(img), "image/png"), prompt="a cat",
                           extra_body={"mask_prompt": "sky", "mask_mode": "xor"})
    assert err.value.status_code == 400 and err.value.body["param"] == "mask_mode"
    with pytest.raises(openai.BadRequestError) as err:  # a generation has no picture to select in
        client.images.generate(prompt="a cat", extra_body={"mask_prompt": "sky"})
    assert err.value.body["param"] == "mask_prompt"


def test_mask_prompt_through_bfls_fill_shows_the_mask_in_the_result(server):
    img = base64.b64encode(png_bytes(noise_image(64, 48, 3))).decode()
    r = httpx.post(f"{server.url}/v1/flux-pro-1.0-fill", headers={"x-key": ALICE}, timeout=30,
                   json={"image": img, "prompt": "a door", "steps": 15, "mask_prompt": "the house"})
    assert r.status_code == 200, r.text
    for _ in range(240):
        got = httpx.get(f"{server.url}/v1/get_result", params={"id": r.json()["id"]}, headers={"x-key": ALICE}).json()
        if got["status"] != "Pending":
            break
        time.sleep(0.25)
    assert got["status"] == "Ready", got
    mask = httpx.get(got["result"]["mask"], timeout=30)
    assert mask_of(mask.content).shape == (48, 64)


def test_mask_prompt_through_cogs_container_api(server):
    r = httpx.post(f"{server.url}/cog/predictions", headers=auth(ALICE), timeout=120,
                   json={"input": fast_input(noise_image(64, 64, 7), mask_prompt="the tree")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["output"][0].startswith("data:image/png")
    assert "mask_prompt 'the tree':" in body["logs"]


# -- POST /v1/masks -------------------------------------------------------------------------------

def test_a_click_answers_a_png_mask_of_the_pictures_size_with_its_coverage(server):
    img = noise_image(120, 80, 4)
    r = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE), timeout=60,
                   json={"image": data_uri(img), "points": [[30, 20, 1]]})
    assert r.status_code == 200, r.text
    pixels = mask_of(r.content)
    assert pixels.shape == (80, 120)
    assert float(r.headers["x-mask-coverage"]) == pytest.approx((pixels / 255).mean(), abs=1e-5)
    as_json = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE) | {"Accept": "application/json"},
                         timeout=60, json={"image": data_uri(img), "points": [[30, 20, 1]]}).json()
    assert as_json["width"] == 120 and as_json["height"] == 80 and as_json["demo"] is True
    assert np.array_equal(mask_of(base64.b64decode(as_json["mask"].split(",", 1)[1])), pixels)
    boxed = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE), timeout=60,
                       json={"image": data_uri(img), "points": [[30, 20, 1], [100, 70, 0]], "boxes": [[0, 0, 60, 40]]})
    assert boxed.status_code == 200 and mask_of(boxed.content).shape == (80, 120)


def test_masks_need_a_token_and_read_only_the_callers_own_files(server):
    img = noise_image(64, 64, 5)
    body = {"image": data_uri(img), "points": [[10, 10, 1]]}
    assert httpx.post(f"{server.url}/v1/masks", json=body).status_code == 401
    upload = httpx.post(f"{server.url}/v1/files", headers=auth(ALICE),
                        files={"content": ("a.png", png_bytes(img), "image/png")}).json()
    url = upload["urls"]["get"]
    own = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE), json={"image": url, "points": [[10, 10, 1]]})
    assert own.status_code == 200 and mask_of(own.content).shape == (64, 64)
    other = httpx.post(f"{server.url}/v1/masks", headers=auth(BOB), json={"image": url, "points": [[10, 10, 1]]})
    assert other.status_code == 422 and other.json()["invalid_fields"][0]["field"] == "image"


@pytest.mark.parametrize("body, field", [
    ({"points": [[1, 1, 2]]}, "points.0"),
    ({"boxes": [[10, 10, 5, 20]]}, "boxes.0"),
    ({}, "points"),
    ({"text": "sky", "points": [[1, 1, 1]]}, "text"),
    ({"text": "  "}, "text"),
    ({"points": [[1, 1]]}, "points"),
    ({"points": [[1, 1, 1]] * 65}, "points"),
    ({"text": "x" * 257}, "text"),
    ({"threshold": 0, "text": "x"}, "threshold"),
    ({"points": [[1, 1, 1]], "shape": "circle"}, "shape"),
])
def test_bad_mask_requests_are_refused_naming_the_field(server, body, field):
    r = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE), json={"image": data_uri(noise_image(32, 32))} | body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [f["field"] for f in r.json()["invalid_fields"]][0] == field


def test_a_picture_past_the_pixel_limit_or_broken_is_refused(server):
    big = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE),
                     json={"image": data_uri(noise_image(700, 500)), "points": [[1, 1, 1]]})
    assert big.status_code == 422 and "image" in big.json()["invalid_fields"][0]["field"]
    broken = httpx.post(f"{server.url}/v1/masks", headers=auth(ALICE),
                        json={"image": "data:image/png;base64,AAAA", "points": [[1, 1, 1]]})
    assert broken.status_code == 422


# -- a server without a segmenter ---------------------------------------------------------------------

def test_a_server_without_a_segmenter_refuses_mask_prompt_naming_the_flag(live_server):
    url = live_server.url
    img = noise_image(64, 64, 6)
    r = httpx.post(url + MODEL, json={"input": fast_input(img, mask_prompt="sky")})
    assert r.status_code == 422
    field = r.json()["invalid_fields"][0]
    assert field["field"] == "input.mask_prompt" and "--segmenter" in field["description"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.images.edit(image=("a.png", png_bytes(img), "image/png"), prompt="x", extra_body={"mask_prompt": "sky"})
    assert err.value.status_code == 400 and err.value.body["param"] == "mask_prompt", err.value.body
    assert "--segmenter" in err.value.body["message"]
    bfl = httpx.post(f"{url}/v1/flux-pro-1.0-fill", json={"image": base64.b64encode(png_bytes(img)).decode(),
                                                         "prompt": "x", "mask_prompt": "sky"})
    assert bfl.status_code == 422 and "--segmenter" in bfl.text
    masks = httpx.post(f"{url}/v1/masks", json={"image": data_uri(img), "points": [[1, 1, 1]]})
    assert masks.status_code == 503 and "--segmenter" in masks.json()["detail"]
    assert httpx.get(f"{url}/health").json()["selects"] == []


def test_health_says_what_the_server_selects_by(server):
    assert httpx.get(f"{server.url}/health").json()["selects"] == ["points", "text"]


def test_a_wrong_segmenter_folder_stops_the_start_naming_the_missing_file(tmp_path, tiny_dir):
    folder = tmp_path / "sam"
    shutil.copytree(ensure_tiny_segmenter() / "sam", folder)
    (folder / "model.safetensors").unlink()
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--weights", str(tiny_dir), "--data-dir",
                           str(tmp_path / "data"), "--port", "0", "--segmenter", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 6, done.stderr[-2000:]
    assert f"The segmenter folder {folder} is incomplete: model.safetensors is missing" in done.stderr
