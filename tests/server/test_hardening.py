"""Reliability and security through the live server (issue 7).

Input URLs and limits; faults that fail one prediction while the worker goes on; a slow webhook
receiver; a full disk; restarts that never re-run a finished prediction; auth on every route; tokens
kept out of the log; rate limits; hundreds of hostile inputs with no 5xx; and a bounded load test.
Every request goes to 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import secrets
import struct
import threading
import time
import zlib

import httpx
import pytest

from tests.conftest import TOKEN
from tests.helpers import LiveServer, box_mask, fast_input, free_port, noise_image, png_bytes

MODEL_PATH = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
TERMINAL = ("succeeded", "failed", "canceled")
PROBLEM = "application/problem+json"


# -- helpers -------------------------------------------------------------------------------------

def quick_input(side: int = 16, **extra) -> dict:
    """A real prediction that takes well under a second on the tiny model."""
    return fast_input(noise_image(side, side, seed=side), box_mask(side, side, (2, 2, side - 2, side - 2)),
                      num_inference_steps=1, **extra)


def wait_terminal(url: str, ids: list[str], headers: dict | None = None, timeout: float = 60) -> dict[str, dict]:
    """Poll until every prediction is terminal or the time is up; the last answer for each."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        for pid in pending:
            found[pid] = httpx.get(f"{url}/v1/predictions/{pid}", headers=headers, timeout=10).json()
        pending = [pid for pid in pending if found[pid]["status"] not in TERMINAL]
        if pending:
            time.sleep(0.2)
    return found


def create(url: str, inp: dict, headers: dict | None = None, **body) -> dict:
    r = httpx.post(url + MODEL_PATH, json={"input": inp, **body}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def assert_problem(r: httpx.Response, status: int | None = None) -> dict:
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM), (r.status_code, r.headers.get("content-type"), r.text[:300])
    body = r.json()
    assert body["status"] == r.status_code and isinstance(body["detail"], str) and body["detail"]
    return body


class Loopback:
    """A small HTTP server on 127.0.0.1 in threads: serves a picture, redirects, answers slowly,
    and records every request. POSTs (webhooks) wait ``post_delay_s`` before answering."""

    def __init__(self, picture: bytes = b"", post_delay_s: float = 0.0):
        self.picture, self.post_delay_s = picture, post_delay_s
        self.requests: list[tuple[str, str, bytes]] = []
        self.closing = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(("GET", self.path, b""))
                if self.path.startswith("/pic"):
                    self._answer(200, outer.picture, "image/png")
                elif self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/slow":
                    outer.closing.wait(6)
                    self._answer(200, outer.picture, "image/png")
                else:
                    self._answer(404, b"not here", "text/plain")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.requests.append(("POST", self.path, body))
                outer.closing.wait(outer.post_delay_s)
                self._answer(200, b"{}", "application/json")

            def _answer(self, status, body, ctype):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def posts(self) -> list[dict]:
        return [json.loads(body) for method, _, body in self.requests if method == "POST"]

    def __enter__(self) -> "Loopback":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_dir):
    """SSRF block on, a 200 KB body limit and a 50 KB upload limit."""
    folder = tmp_path_factory.mktemp("guarded")
    server = LiveServer(folder / "data", args=["--weights", str(tiny_dir), "--block-private-urls",
                                               "--max-body-bytes", "200000", "--max-upload-bytes", "50000"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny_dir):
    """A server with broken LoRAs in its LoRA folder and short fetch limits, to force faults."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("faulty")
    loras = folder / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"\0" * 128)  # not a safetensors file at all
    # Right key names, wrong shapes: the load fails deep inside peft with a RuntimeError.
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 7),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(5, 4)},
              str(loras / "misfit.safetensors"))
    save_file({"unrelated.weight": torch.randn(4, 7)}, str(loras / "nokeys.safetensors"))  # no LoRA keys
    server = LiveServer(folder / "data", args=["--weights", str(tiny_dir), "--lora-dir", str(loras),
                                               "--fetch-timeout-s", "2", "--fetch-max-redirects", "3"]).start()
    yield server
    server.stop()


# -- 1. input URLs, body and upload limits, prompt length ----------------------------------------

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


def test_a_5000_word_prompt_succeeds(faulty):
    words = [f"word{i % 97}" for i in range(5000)]  # far past T5's 512 tokens: truncated, not an error
    p = create(faulty.url, quick_input(prompt=" ".join(words)), headers={"Prefer": "wait=60"})
    assert p["status"] == "succeeded", p.get("error")
    assert p["input"]["prompt"].count(" ") == 4999  # the prompt is kept whole in the record


# -- 2. faults -----------------------------------------------------------------------------------

def fault_cases(origin: Loopback) -> list[tuple[str, dict, str]]:
    """(what, input changes, a phrase the error must contain): each a real fault, none simulated.
    File strings that are not URLs at all (file://, gopher://, a broken host or port) are refused at
    create with 422 (tests/server/replicate/test_api.py); these fail only when the server reads them."""
    picture = png_bytes(noise_image(32, 32))
    closed = free_port()
    return [
        ("LoRA file that is not safetensors", {"lora_weights": "broken"}, "not a readable .safetensors"),
        ("LoRA with the wrong shapes", {"lora_weights": "misfit"}, "misfit.safetensors was made for a model of another size"),
        ("LoRA without LoRA keys", {"lora_weights": "nokeys"}, "nokeys.safetensors holds no FLUX.1 transformer LoRA"),
        ("LoRA name that does not exist", {"lora_weights": "no-such-lora"}, "no LoRA named"),
        ("truncated PNG", {"image": b64_uri(picture[: len(picture) // 2])}, "image"),
        ("bytes that are no image", {"image": b64_uri(b"hello, world", "text/plain")}, "not an image"),
        ("PNG header of 200000x200000 (bomb)", {"image": b64_uri(png_header_only(200_000, 200_000))}, "too many pixels"),
        ("PNG header of 12000x12000", {"mask": b64_uri(png_header_only(12_000, 12_000))}, "100 megapixel limit"),
        ("mask that is no image", {"mask": b64_uri(b"\0" * 300)}, "mask"),
        ("base64 that is not base64", {"image": "data:image/png;base64,@@@@****"}, "image"),
        ("URL answering 404", {"image": origin.url("/missing.png")}, "HTTP 404"),
        ("URL redirecting forever", {"image": origin.url("/loop")}, "more than 3 redirects"),
        ("URL slower than the fetch limit", {"image": origin.url("/slow")}, "took longer than 2 s"),
        ("URL on a closed port", {"image": f"http://127.0.0.1:{closed}/x.png"}, "could not fetch image"),
        ("URL with host 999.999.999.999", {"image": "http://999.999.999.999/x.png"}, "not a URL this server can fetch"),
        ("unknown file id", {"image": "http://127.0.0.1:1/v1/files/" + "a" * 26}, "could not fetch image"),
    ]


def test_each_fault_fails_only_its_prediction_and_the_worker_goes_on(faulty):
    with Loopback(png_bytes(noise_image(32, 32))) as origin:
        cases = fault_cases(origin)
        goods = [fast_input(noise_image(1, 1), box_mask(1, 1, (0, 0, 1, 1)), num_inference_steps=1), quick_input(16),
                 fast_input(noise_image(1, 300), box_mask(1, 300, (0, 0, 1, 100)), num_inference_steps=1)]
        order = []  # a good prediction after every fault, all queued at once
        for i, (what, change, phrase) in enumerate(cases):
            order.append((what, create(faulty.url, {**quick_input(), **change})["id"], phrase))
            order.append(("good", create(faulty.url, goods[i % len(goods)])["id"], None))
        found = wait_terminal(faulty.url, [pid for _, pid, _ in order], timeout=120)
    wrong = []
    for what, pid, phrase in order:
        p = found[pid]
        if phrase is None:
            ok = p["status"] == "succeeded"
        else:
            ok = (p["status"] == "failed" and isinstance(p["error"], str) and phrase in p["error"]
                  and "Internal error" not in p["error"] and p["error"] in p["logs"])
        if not ok:
            wrong.append((what, p["status"], p["error"]))
    assert not wrong, "\n".join(map(str, wrong))
    assert httpx.get(faulty.url + "/health").json()["status"] in ("READY", "BUSY")
    print(f"\nfaults forced: {len(cases)}; each failed its own prediction with a clear error; "
          f"{len(cases)} good predictions between them succeeded")


def test_an_unexpected_exception_fails_one_prediction_and_the_worker_goes_on(faulty):
    """The outputs folder replaced by a file: writing the output raises NotADirectoryError."""
    outputs = faulty.data_dir / "outputs"
    aside = faulty.data_dir / "outputs-aside"
    os.replace(outputs, aside)
    outputs.write_bytes(b"not a folder")
    try:
        p = create(faulty.url, quick_input(), headers={"Prefer": "wait=30"})
    finally:
        outputs.unlink()
        os.replace(aside, outputs)
    assert p["status"] == "failed"
    assert p["error"].startswith("Internal error while generating (") and "server log" in p["error"], p["error"]
    assert "Traceback" not in p["error"] and "Traceback" not in p["logs"]
    assert "Traceback (most recent call last)" in faulty.log()  # the details stay in the server log
    again = create(faulty.url, quick_input(), headers={"Prefer": "wait=30"})
    assert again["status"] == "succeeded", again["error"]


def test_a_slow_webhook_receiver_never_stalls_the_queue(faulty):
    """A receiver that holds each webhook for a minute (past the sender's 10 s per POST): the
    prediction that names it runs as fast as the rest, and the next one starts as soon as it ends.
    Judged on the server's own timestamps, so a loaded machine cannot fail it: a webhook sent in
    the worker's way would add 10 s inside a run or between two."""
    from datetime import datetime

    def at(p: dict, key: str) -> float:
        return datetime.fromisoformat(p[key].replace("Z", "+00:00")).timestamp()

    with Loopback(post_delay_s=60) as receiver:
        t0 = time.monotonic()
        slow = create(faulty.url, quick_input(), webhook=receiver.url("/slow-hook"))
        others = [create(faulty.url, quick_input(seed=i))["id"] for i in range(4)]
        found = wait_terminal(faulty.url, [slow["id"], *others], timeout=45)
        elapsed = time.monotonic() - t0
        assert all(p["status"] == "succeeded" for p in found.values()), {k: v["status"] for k, v in found.items()}
        assert receiver.requests  # the receiver was really being called (and was hanging)
        runs = sorted(found.values(), key=lambda p: at(p, "started_at"))
        assert runs[0]["id"] == slow["id"]
        took = [at(p, "completed_at") - at(p, "started_at") for p in runs]
        gaps = [at(b, "started_at") - at(a, "completed_at") for a, b in zip(runs, runs[1:])]
        assert took[0] < 5 and max(gaps) < 5, (took, gaps)
        # The API answers at once meanwhile.
        t1 = time.monotonic()
        assert httpx.get(faulty.url + "/v1/predictions", timeout=5).status_code == 200
        assert time.monotonic() - t1 < 2
    print(f"\nslow webhook receiver (60 s): 5 predictions done in {elapsed:.1f} s; runs "
          f"{', '.join(f'{t:.2f}' for t in took)} s; gaps between runs at most {max(gaps):.2f} s")


def test_a_full_disk_fails_queued_predictions_cleanly_and_refuses_new_work(server_factory, tmp_path):
    """Predictions queued while there was room fail with a clear error when the disk is full as they
    run (here the server comes back with the disk "full"); new creates and uploads get 507."""
    data = tmp_path / "full"
    server = server_factory(data_dir=data)
    slow = fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), num_inference_steps=50,
                      megapixels="1", num_outputs=4)
    ids = [create(server.url, slow)["id"]] + [create(server.url, quick_input())["id"] for _ in range(2)]
    server.kill()
    full = server_factory("--min-free-disk-mb", str(10**12), data_dir=data)  # an exabyte: always "full"
    found = wait_terminal(full.url, ids)
    for p in found.values():
        assert p["status"] == "failed"
        assert p["error"] == "The server's disk is full; this prediction could not be saved."
        assert p["output"] is None and p["completed_at"]
    assert_problem(httpx.post(full.url + MODEL_PATH, json={"input": quick_input()}), 507)
    assert_problem(httpx.post(full.url + "/v1/files", files={"content": ("a.png", png_bytes(noise_image(8, 8)))}), 507)
    assert httpx.get(full.url + "/health").json()["status"] == "READY"
    listed = httpx.get(full.url + "/v1/predictions").json()["results"]
    assert {p["id"] for p in listed} == set(ids)
    assert not list((full.data_dir / "outputs").iterdir())  # nothing half-written


def test_the_free_disk_threshold_defaults_to_64_mb():
    from server.settings import Settings

    assert Settings().min_free_disk_mb == 64


def test_a_finished_prediction_never_runs_again_after_a_restart(server_factory, tmp_path):
    data = tmp_path / "restarts"
    server = server_factory(data_dir=data)
    done = [create(server.url, quick_input(seed=i), headers={"Prefer": "wait=30"}) for i in range(2)]
    assert [p["status"] for p in done] == ["succeeded", "succeeded"]
    queued = [create(server.url, quick_input(seed=10 + i))["id"] for i in range(4)]  # some still queued
    files = {p["id"]: next((data / "outputs" / p["id"]).glob("*/out-0.png")) for p in done}  # its run's folder
    stamps = {pid: (f.stat().st_mtime_ns, f.read_bytes()) for pid, f in files.items()}
    keys = ("status", "output", "started_at", "completed_at", "metrics", "logs", "error")

    def check_unchanged(live: LiveServer) -> None:
        for p in done:
            now = httpx.get(f"{live.url}/v1/predictions/{p['id']}").json()
            assert {k: now[k] for k in keys} == {k: p[k] for k in keys}
            assert (files[p["id"]].stat().st_mtime_ns, files[p["id"]].read_bytes()) == stamps[p["id"]]

    server.kill()  # kill -9
    again = server_factory(data_dir=data)
    assert all(p["status"] == "succeeded" for p in wait_terminal(again.url, queued).values())  # the worker ran
    check_unchanged(again)
    assert again.stop() in (0, -15)  # SIGTERM
    third = server_factory(data_dir=data)
    more = create(third.url, quick_input(), headers={"Prefer": "wait=30"})
    assert more["status"] == "succeeded"
    check_unchanged(third)
    assert "runs again" not in "".join(p["logs"] for p in done)


# -- 3. auth -------------------------------------------------------------------------------------

PUBLIC_PATHS = {"/health", "/outputs/{prediction_id}/{token}/{name}", "/inputs/{prediction_id}/{token}/{name}",
                "/v1/predictions/{prediction_id}/stream", "/v1/predictions/{prediction_id}/preview"}
PARAMS = {"owner": "black-forest-labs", "name": "flux-fill-dev", "prediction_id": "a" * 26, "file_id": "b" * 26,
          "version_id": "abc123", "token": "t" * 32}


BFL_PATHS = {"/v1/flux-pro-1.0-fill", "/v1/flux-pro-1.0-expand", "/v1/get_result"}
OPENAI_PATHS = {"/v1/images/edits", "/v1/images/generations", "/v1/models/{name}"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], path)


def test_every_route_but_the_public_ones_needs_the_token(auth_server):
    schema = httpx.get(auth_server.url + "/openapi.json").json()
    operations = [(method.upper(), path) for path, item in schema["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")]
    assert len(operations) >= 14, operations
    wrong = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Token wrong-token"},
             {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"},
             {"Authorization": TOKEN}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}]
    checked = 0
    for method, path in operations:
        for prefix in ("", "/replicate"):
            url = auth_server.url + prefix + concrete(path)
            if path in PUBLIC_PATHS:
                r = httpx.request(method, url, timeout=10)
                assert r.status_code not in (401, 403) and r.status_code < 500, (method, path, r.status_code)
                continue
            for headers in wrong:
                r = httpx.request(method, url, headers=headers, json={} if method == "POST" else None, timeout=10)
                if path in BFL_PATHS:  # BFL's routes answer as BFL does: 403 in its words
                    assert r.status_code == 403, (method, path, r.status_code)
                    assert r.json() == {"detail": "Not authenticated - Invalid Authentication"}, (method, path)
                    checked += 1
                    continue
                if path in OPENAI_PATHS:  # OpenAI's routes answer in OpenAI's shape
                    assert r.status_code == 401, (method, path, r.status_code)
                    error = r.json()["error"]
                    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
                    checked += 1
                    continue
                body = assert_problem(r, 401)
                assert body["title"] == "Unauthenticated", (method, path)
                assert body["detail"] == "You did not pass a valid authentication token"
                checked += 1
            r = httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert r.status_code != 401 and r.status_code < 500, (method, path, r.status_code, r.text[:200])
    for public in ("/", "/replicate/", "/ui/app.js", "/openapi.json"):
        assert httpx.get(auth_server.url + public).status_code == 200, public
    print(f"\nauth: {len(operations)} operations x 2 prefixes, {checked} unauthenticated requests, all refused (401; BFL's 403)")


def test_tokens_are_never_logged_and_rate_limits_answer_429(server_factory):
    first, second = "tok-" + secrets.token_hex(16), "tok-" + secrets.token_hex(16)
    bad = "bad-" + secrets.token_hex(16)
    server = server_factory("--api-token", first, "--api-token", second, "--rate-limit-per-minute", "3",
                            "--log-level", "debug")
    auth = {"Authorization": f"Bearer {first}"}
    assert httpx.get(server.url + "/v1/predictions", headers=auth).status_code == 200
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Token {second}"}).status_code == 200
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Token {bad}"}).status_code == 401
    secret = httpx.get(server.url + "/v1/webhooks/default/secret", headers=auth).json()["key"]

    statuses = [httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers=auth).status_code
                for _ in range(3)]
    assert statuses == [201, 201, 201]
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers=auth)
    assert_problem(r, 429)
    assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60
    # Per token: the other token still has its own three.
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers={"Authorization": f"Bearer {second}"})
    assert r.status_code == 201
    # Invalid bodies are refused before they cost anything; reads are never rate limited.
    assert httpx.post(server.url + MODEL_PATH, json={"input": {}}, headers=auth).status_code == 422
    assert httpx.get(server.url + "/v1/predictions", headers=auth).status_code == 200

    wait_terminal(server.url, [p["id"] for p in httpx.get(server.url + "/v1/predictions", headers=auth).json()["results"]],
                  headers=auth)
    server.stop()
    log = server.log()
    assert "DEBUG" in log or "debug" in log.lower()  # the log really was at its most verbose
    for leaked in (first, second, bad, secret, secret.removeprefix("whsec_")):
        assert leaked not in log


# -- 4. hostile inputs ---------------------------------------------------------------------------

def _deep(n: int):
    value: object = "bottom"
    for _ in range(n):
        value = [value]
    return value


HOSTILE_VALUES = [
    None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, 2**64 + 1, 10**40, 1e308, -1e308,
    "", " ", "\x00", "a\x00b", "\u202e\u0645\u0631\u062d\u0628\u0627", "🎨" * 500, "\ud800", "x" * 70_000,
    "'; DROP TABLE predictions; --", "\" OR 1=1 --", "<script>alert(1)</script>", "../../../../etc/passwd",
    "%00%2e%2e%2f", "${jndi:ldap://127.0.0.1/a}", "{{7*7}}", [], {}, [1, 2, 3], {"$gt": ""}, _deep(60),
    "data:image/png;base64,AAAA", "data:,", "data:image/png;base64,!!!!", "data:;base64," + "A" * 1000,
    "file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://127.0.0.1/x.png", "javascript:alert(1)",
    "http://[::1]:1/x", "http://999.999.999.999/x", "http://127.0.0.1:1/" + "a" * 5000, "NaN", "Infinity", "1e999",
]
FIELDS = ["prompt", "image", "mask", "num_outputs", "num_inference_steps", "guidance", "seed", "megapixels",
          "output_format", "output_quality", "lora_weights", "lora_scale", "disable_safety_checker", "go_fast",
          "preserve_unmasked", "crop_to_mask", "outpaint", "mask_grow"]


def hostile_requests(valid: dict) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments) for ~400 malformed and hostile requests."""
    out: list[tuple[str, str, dict]] = []
    # Every field of the input set to every hostile value (a sample of fields per value keeps it bounded).
    for i, value in enumerate(HOSTILE_VALUES):
        for field in FIELDS[i % 3::3] + ["image", "prompt"]:
            out.append(("POST", MODEL_PATH, {"json": {"input": {**valid, field: value}}}))
    # The body around the input.
    for value in HOSTILE_VALUES[::3]:
        out.append(("POST", MODEL_PATH, {"json": {"input": value}}))
        out.append(("POST", "/v1/predictions", {"json": {"version": value, "input": valid}}))
        out.append(("POST", "/v1/deployments/a/b/predictions", {"json": {"input": valid, "webhook": value}}))
        out.append(("POST", MODEL_PATH, {"json": {"input": valid, "webhook_events_filter": value}}))
    for extra in ({"stream": True}, {"unknown": 1}, {"input": valid, "x" * 1000: 1}, {"webhook_completed": "x"}):
        out.append(("POST", MODEL_PATH, {"json": extra}))
    # Raw bodies: not JSON, not an object, odd encodings and content types.
    raw = [b"", b"{", b"}", b"null", b"[]", b"1", b'"input"', b"\x00" * 64, b"\xff\xfe\xfd", b'{"input": NaN}',
           b'{"input": {"prompt": "a", "seed": Infinity}}', b'{"input": {"prompt": "\\ud800"}}',
           b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"[" * 100_000, b'{"input": {}}' * 1000,
           b'{"input":' + json.dumps(valid).encode() + b', "input": 5}', "{\"input\": {\"prompt\": \"é\"}}".encode("latin-1")]
    for body in raw:
        for ctype in ("application/json", "text/plain"):
            out.append(("POST", MODEL_PATH, {"content": body, "headers": {"content-type": ctype}}))
    # Prefer headers, the model path's names.
    for prefer in ("wait=0", "wait=-5", "wait=99999999999999999999999", "wait=abc", "wait=1, wait=2", "\x7f", "wait" * 500):
        out.append(("POST", MODEL_PATH, {"json": {"input": valid}, "headers": {"prefer": prefer}}))
    for owner, name in (("black-forest-labs", "x" * 3000), ("..", ".."), ("%00", "%2F"), ("a b", "ü")):
        out.append(("POST", f"/v1/models/{owner}/{name}/predictions", {"json": {"input": valid}}))
    # The files route.
    png = png_bytes(noise_image(8, 8))
    for form, files in (
        ({}, {"content": ("a.png", png)}), ({"filename": "../../etc/passwd"}, {"content": ("x", png)}),
        ({"filename": "a\x00b.png"}, {"content": ("x", png)}), ({"filename": "x" * 10_000}, {"content": ("x", png)}),
        ({"metadata": "{"}, {"content": ("x", png)}), ({"metadata": '{"a": "\\ud800"}'}, {"content": ("x", png)}), ({"metadata": "[1,2]"}, {"content": ("x", png)}),
        ({"metadata": "[" * 5000 + "]" * 5000}, {"content": ("x", png)}), ({"metadata": "null"}, {"content": ("x", png)}),
        ({"type": "\x00/\x00"}, {"content": ("x", png)}), ({"type": "x" * 5000}, {"content": ("x", b"")}),
        ({"content": "a string, not a file"}, None), ({}, {"other": ("x", png)}),
        ({}, {"content": ("🎨.png", png)}), ({}, [("content", ("a", png)), ("content", ("b", png))]),
        ({f"f{i}": "x" for i in range(20)}, {"content": ("x", png)}),
    ):
        out.append(("POST", "/v1/files", {"data": form, "files": files}))
    for body, ctype in ((b"", "multipart/form-data"), (b"junk", "multipart/form-data; boundary=zz"),
                        (b"--zz\r\n\r\n", "multipart/form-data; boundary=zz"), (b'{"content": 1}', "application/json"),
                        (b"content=abc", "application/x-www-form-urlencoded"), (png, "image/png"),
                        (b'--zz\r\nContent-Disposition: form-data; name="content"; filename="\xff\xfe.png"\r\n\r\n'
                         b"abc\r\n--zz--\r\n", "multipart/form-data; boundary=zz"),
                        (b'--zz\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"a": "\xff\xfe"}\r\n--zz\r\n'
                         b'Content-Disposition: form-data; name="content"; filename="a"\r\n\r\nabc\r\n--zz--\r\n',
                         "multipart/form-data; boundary=zz")):
        out.append(("POST", "/v1/files", {"content": body, "headers": {"content-type": ctype}}))
    for file_id in ("x", "a" * 26, "%00", "..%2F..%2Fetc%2Fpasswd", "ü" * 50, "a" * 5000):
        out.append(("GET", f"/v1/files/{file_id}", {}))
        out.append(("DELETE", f"/v1/files/{file_id}", {}))
        out.append(("GET", f"/v1/predictions/{file_id}", {}))
        out.append(("POST", f"/v1/predictions/{file_id}/cancel", {}))
        out.append(("GET", f"/v1/predictions/{file_id}/stream", {}))
        out.append(("GET", f"/outputs/{file_id}/{file_id}/out-0.png", {}))
    # The list's query parameters.
    cursors = ["x", "", "====", "b:1", base64.urlsafe_b64encode(b"b:abc").decode(),
               base64.urlsafe_b64encode(b"b:99999999999999999999999999").decode(),
               base64.urlsafe_b64encode(b"a:-99999999999999999999999999").decode(),
               base64.urlsafe_b64encode(b"\xff\xfe:1").decode(), base64.urlsafe_b64encode(b"z:1").decode(),
               base64.urlsafe_b64encode(b"b:1e400").decode(), "%00", "a" * 10_000]
    dates = ["x", "", "2024-13-45", "99999-01-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
             "1e400", "2024-01-01T00:00:00Z\x00", "-1", "2024-02-30"]
    for cursor in cursors:
        out.append(("GET", "/v1/predictions", {"params": {"cursor": cursor}}))
    for date in dates:
        out.append(("GET", "/v1/predictions", {"params": {"created_after": date}}))
        out.append(("GET", "/v1/predictions", {"params": {"created_before": date, "cursor": cursors[1]}}))
    out.append(("GET", "/v1/predictions", {"params": [("cursor", "a"), ("cursor", "b")]}))
    return out


def test_hundreds_of_hostile_inputs_get_no_5xx(server_factory):
    server = server_factory("--max-queue", "1000")
    valid = quick_input(8)
    cases = hostile_requests(valid)
    assert len(cases) >= 300
    accepted, statuses, problems = [], {}, []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, kw in cases:
            if "json" in kw:  # ASCII JSON, so that lone surrogates travel as escapes
                kw = {**kw, "content": json.dumps(kw.pop("json")).encode(),
                      "headers": {"content-type": "application/json", **kw.get("headers", {})}}
            if "prefer" in kw.get("headers", {}):  # `Prefer: wait=N` may rightly hold the answer up to 60 s
                kw = {**kw, "timeout": 70}
            try:
                r = client.request(method, path, **kw)
            except httpx.TransportError as exc:
                problems.append(("no answer", method, path[:80], repr(kw)[:160], repr(exc)))
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            shown = (method, path[:80], repr(kw)[:160], r.status_code, r.text[:200])
            if r.status_code >= 500:
                problems.append(shown)
            elif r.status_code >= 400 and not r.headers.get("content-type", "").startswith(PROBLEM):
                problems.append(("not problem+json",) + shown)
            elif r.status_code == 201 and path.endswith("/predictions"):
                accepted.append(r.json()["id"])
    assert not problems, "\n".join(map(str, problems[:20]))
    found = wait_terminal(server.url, accepted, timeout=120)
    stuck = {pid: p["status"] for pid, p in found.items() if p["status"] not in ("succeeded", "failed")}
    assert not stuck
    assert all(p["error"] is None or isinstance(p["error"], str) for p in found.values())
    unclear = [(p["input"].get("image", "")[:60], p["error"]) for p in found.values()
               if p["error"] and p["error"].startswith("Internal error")]
    assert not unclear, unclear  # a hostile input is the caller's fault: say what is wrong with it
    assert httpx.get(server.url + "/health").json()["status"] in ("READY", "BUSY")
    print(f"\nhostile: {len(cases)} requests, answers {dict(sorted(statuses.items()))}, 5xx 0; "
          f"{len(accepted)} predictions accepted, all ended "
          f"({sum(p['status'] == 'succeeded' for p in found.values())} succeeded, "
          f"{sum(p['status'] == 'failed' for p in found.values())} failed)")


# -- 5. load -------------------------------------------------------------------------------------

def test_load_every_prediction_is_accepted_or_refused_and_none_lost(server_factory):
    from bench.load import run_load

    server = server_factory("--max-queue", "100", "--log-level", "warning")
    report = asyncio.run(run_load(server.url, total=300, concurrency=50, polls=2, drain_timeout_s=110))
    print("\nload: 300 creates, 50 at once, --max-queue 100\n" + "\n".join(report.lines()))
    assert report.server_errors == 0 and report.transport_errors == []
    assert set(report.create_statuses) <= {201, 429}, report.create_statuses
    assert report.created + report.refused == 300
    assert report.refused > 0 and report.refused_without_retry_after == 0  # the queue really filled up
    assert report.created >= 100
    assert report.stuck == [] and report.final_statuses == {"succeeded": report.created}
    assert report.missing_from_list == []


# -- 6. hostile header values ----------------------------------------------------------------------

HEADER_VALUES_PER_NAME = 2700
DOCUMENTED_CANCEL_AFTER = re.compile(r"\s*(?:(?:[0-9]+(?:\.[0-9]+)?[hms])+|[0-9]+(?:\.[0-9]+)?)\s*", re.IGNORECASE)


def hostile_header_values(name: str, count: int, seed: int) -> list[bytes]:
    """``count`` odd values for one header: random bytes, huge numbers, near misses of valid values."""
    import random

    rng = random.Random(seed)
    printable = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
    near = {
        "Prefer": [b"wait", b"wait=", b"wait=0", b"wait=-1", b"wait=1e9", b"wait=0x10", b"wait=\xb2", b"wait=\"5\"",
                   b"respond-async, wait=", b"wait=5;x", b"wait==5", b"WAIT=", b"wait=" + b"9" * 5000],
        "Cancel-After": [b"1d", b"-5s", b"4s", b"4.999s", b"1e3", b"5 m", b"s", b"m5", b"0x10s", b"\xb2s", b"5ms",
                         b"9" * 300, b"1h" * 200, b"nan", b"inf", b"5.s", b".5h"],
        "Authorization": [b"Bearer", b"Bearer ", b"Token", b"Basic " + base64.b64encode(b"a:b"), b"bearer  x",
                          b"Bearer " + b"x" * 8000, b"\xff\xfe", b"Token " + TOKEN.encode() + b"\x80"],
        "Content-Type": [b"application/json; charset=\xff", b"application/json; charset=nope", b"text/json",
                         b"application/x-json+json", b"multipart/form-data", b"multipart/form-data; boundary=",
                         b"application/json;;;;", b"*/*", b"application/", b"/json", b"application/json" * 100],
    }[name]
    values = list(near)
    while len(values) < count:
        kind = rng.randrange(6)
        if kind == 0:
            value = bytes(rng.choice(printable) for _ in range(rng.randrange(0, 200)))
        elif kind == 1:
            value = str(rng.randrange(10 ** rng.randrange(1, 30))).encode() * rng.randrange(1, 300)
        elif kind == 2:
            value = (rng.choice(near) + bytes(rng.choice(printable) for _ in range(rng.randrange(1, 20))))
        elif kind == 3:
            value = bytes(rng.choice(b"0123456789.hms ,;=-+eE") for _ in range(rng.randrange(1, 40)))
        elif kind == 4:
            value = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 30))).encode("utf-8")
        else:
            value = rng.choice(near)[: rng.randrange(0, 20)] + b"\t" + bytes(rng.choice(printable) for _ in range(5))
        values.append(value.strip(b" \t"))
    if name == "Cancel-After":  # only invalid ones: a valid deadline would rightly create a prediction
        values = [v for v in values if not DOCUMENTED_CANCEL_AFTER.fullmatch(v.decode("latin-1"))]
    return values[:count]


def count_predictions(server: LiveServer) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{server.data_dir / 'flux-fill.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


def test_ten_thousand_hostile_header_values_get_no_5xx_and_create_nothing(server_factory):
    """Prefer, Cancel-After, Authorization and Content-Type, each with thousands of odd values on an
    otherwise valid create. Every request fails (an invalid Cancel-After rides along with the other
    headers; the token server refuses the wrong tokens), none with a 5xx or a dropped connection, and
    no prediction is written."""
    import h11

    server = server_factory("--api-token", TOKEN, "--log-level", "warning")
    body = json.dumps({"input": quick_input(8)}).encode()
    good = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Cancel-After": "never"}
    before = count_predictions(server)
    statuses: dict[int, int] = {}
    problems, sent = [], 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for index, name in enumerate(("Prefer", "Cancel-After", "Authorization", "Content-Type")):
            for value in hostile_header_values(name, HEADER_VALUES_PER_NAME, seed=index):
                headers = {**good, name: value}
                try:
                    r = client.post(MODEL_PATH, content=body, headers=headers)
                except h11.LocalProtocolError:
                    continue  # a value HTTP/1.1 itself cannot carry: never reaches any server
                except httpx.LocalProtocolError:
                    continue
                except httpx.TransportError as exc:
                    problems.append(("no answer", name, value[:80], repr(exc)))
                    continue
                sent += 1
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500 or r.status_code < 400 or not r.headers["content-type"].startswith(PROBLEM):
                    problems.append((r.status_code, name, value[:80], r.text[:200]))
    assert not problems, "\n".join(map(str, problems[:20]))
    assert sent >= 10_000, sent
    assert count_predictions(server) == before
    assert "Traceback" not in server.log()
    print(f"\nhostile headers: {sent} requests, answers {dict(sorted(statuses.items()))}, 5xx 0, predictions written 0")
