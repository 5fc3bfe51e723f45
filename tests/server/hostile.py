"""What the tests of a server under hostile or faulty use share: quick real predictions, waiting for
them, checking a problem+json answer, and a loopback HTTP server that serves pictures, redirects
forever, answers slowly and records the webhooks it gets."""

from __future__ import annotations

import base64
import http.server
import json
import struct
import threading
import time
import zlib

import httpx

from tests.helpers import box_mask, fast_input, noise_image

MODEL_PATH = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
TERMINAL = ("succeeded", "failed", "canceled")
PROBLEM = "application/problem+json"


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
