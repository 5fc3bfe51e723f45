"""A prediction whose every output the safety checker flagged, as each API answers it: Replicate's
failed prediction with the hosted model's words, BFL's "Content Moderated", OpenAI's 400
moderation_blocked (a 400, which the openai clients do not retry into new predictions)."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from inference.errors import ALL_FLAGGED
from tests.conftest import TOKEN
from tests.helpers import LiveServer, noise_image, png_bytes
from tests.inference.test_safety import add_safety_checker
from tests.server.bfl.test_bfl_api import KEY, fill_body, poll, post

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def flagging_server(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("flagging") / "weights"
    shutil.copytree(tiny_dir, folder)
    add_safety_checker(folder, flag_everything=True)
    server = LiveServer(folder.parent / "data", args=["--weights", str(folder), "--api-token", TOKEN]).start()
    yield server
    server.stop()


def predictions(server) -> list[dict]:
    return httpx.get(f"{server.url}/v1/predictions", headers=AUTH, timeout=10).json()["results"]


def test_openai_answers_400_moderation_blocked_and_the_client_makes_no_retry(flagging_server):
    client = openai.OpenAI(base_url=f"{flagging_server.url}/v1", api_key=TOKEN, timeout=120)  # retries on
    before = len(predictions(flagging_server))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("photo.png", png_bytes(noise_image(64, 64)), "image/png"),  # no alpha: all of it
                           prompt="a red door", quality="low")
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "moderation_blocked", error
    assert ALL_FLAGGED in error["message"]
    made = predictions(flagging_server)
    assert len(made) == before + 1 and made[0]["status"] == "failed" and made[0]["error"] == ALL_FLAGGED


def test_bfl_answers_content_moderated(flagging_server):
    created = post(flagging_server, "flux-pro-1.0-fill", fill_body(), headers=KEY)
    assert created.status_code == 200, created.text
    result = poll(created.json()["polling_url"])
    assert result["status"] == "Content Moderated", result
    assert result["details"]["Moderation Reasons"] == ["NSFW"]
