"""Input URLs and the server's limits through the live server: private addresses blocked for
inputs and webhooks (and allowed where they may be), request bodies and uploads over their limits
(413, with or without a Content-Length), and a prompt far past T5's length."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.helpers import LiveServer, noise_image, png_bytes
from tests.server.hostile import (MODEL_PATH, Loopback, assert_problem, create, quick_input, wait_terminal)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_dir):
    """SSRF block on, a 200 KB body limit and a 50 KB upload limit."""
    folder = tmp_path_factory.mktemp("guarded")
    server = LiveServer(folder / "data", args=["--weights", str(tiny_dir), "--block-private-urls",
                                               "--max-body-bytes", "200000", "--max-upload-bytes", "50000"]).start()
    yield server
    server.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0", "127.1"])
def test_block_private_urls_fails_a_loopback_image_url(guarded, host):
    with Loopback(png_bytes(noise_image(16, 16))) as origin:
        url = origin.url("/pic.png", host)
        p = create(guarded.url, {**quick_input(), "image": url}, headers={"Prefer": "wait=20"})
        assert p["status"] == "failed", p
        assert "private or loopback address" in p["error"] and p["error"].startswith("image"), p["error"]
        assert origin.requests == []  # refused before any connection


def test_block_private_urls_never_delivers_a_webhook_to_loopback(guarded):
    with Loopback() as receiver:
        p = create(guarded.url, quick_input(), webhook=receiver.url("/hook"))
        done = wait_terminal(guarded.url, [p["id"]])[p["id"]]
        assert done["status"] == "succeeded"
        time.sleep(1.5)  # the completed webhook would have been sent by now
        assert receiver.requests == []


def test_loopback_urls_work_where_private_urls_are_allowed(live_server):
    """The same URLs on a server without --block-private-urls: the block above is what refused them."""
    with Loopback(png_bytes(noise_image(16, 16))) as origin:
        p = create(live_server.url, {**quick_input(), "image": origin.url("/pic.png")},
                   webhook=origin.url("/hook"), webhook_events_filter=["completed"])
        assert wait_terminal(live_server.url, [p["id"]])[p["id"]]["status"] == "succeeded"
        deadline = time.monotonic() + 10
        while not origin.posts() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ("GET", "/pic.png", b"") in origin.requests
        assert origin.posts() and origin.posts()[0]["status"] == "succeeded"


def _chunks(total: int, size: int = 16384):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


@pytest.mark.parametrize("path", [MODEL_PATH, "/v1/predictions", "/v1/deployments/acme/inpaint/predictions"])
def test_request_bodies_over_the_limit_are_413(guarded, path):
    big = json.dumps({"input": {**quick_input(), "prompt": "x" * 300_000}}).encode()
    r = httpx.post(guarded.url + path, content=big, headers={"content-type": "application/json"}, timeout=30)
    body = assert_problem(r, 413)
    assert "195 KB" in body["detail"]  # says the limit in a unit that is not "0 MB"

    # The same without Content-Length (chunked): counted as it arrives, refused with the same 413.
    r = httpx.post(guarded.url + path, content=_chunks(300_000), headers={"content-type": "application/json"},
                   timeout=30)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_problem(r, 413)

    # Under the limit, chunked too, the body is read and judged on its merits.
    small = json.dumps({"input": quick_input(), "version": "black-forest-labs/flux-fill-dev"}).encode()
    r = httpx.post(guarded.url + path, content=iter([small[:100], small[100:]]),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 201, r.text
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_uploads_over_the_limit_are_413(guarded):
    r = httpx.post(guarded.url + "/v1/files", files={"content": ("big.bin", b"x" * 60_000)}, timeout=30)
    assert "48.8 KB" in assert_problem(r, 413)["detail"]

    def multipart(size: int):
        yield b'--b0undary\r\nContent-Disposition: form-data; name="content"; filename="a.bin"\r\n' \
              b"Content-Type: application/octet-stream\r\n\r\n"
        yield from (b"y" * len(c) for c in _chunks(size))
        yield b"\r\n--b0undary--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    for size in (60_000, 400_000):  # over the upload limit; over the body limit as well
        r = httpx.post(guarded.url + "/v1/files", content=multipart(size), headers=headers, timeout=30)
        assert "content-length" not in r.request.headers
        assert_problem(r, 413)
    r = httpx.post(guarded.url + "/v1/files", content=multipart(10_000), headers=headers, timeout=30)
    assert r.status_code == 201 and r.json()["size"] == 10_000, r.text


def test_a_5000_word_prompt_succeeds(guarded):
    words = [f"word{i % 97}" for i in range(5000)]  # far past T5's 512 tokens: truncated, not an error
    p = create(guarded.url, quick_input(prompt=" ".join(words)), headers={"Prefer": "wait=60"})
    assert p["status"] == "succeeded", p.get("error")
    assert p["input"]["prompt"].count(" ") == 4999  # the prompt is kept whole in the record
