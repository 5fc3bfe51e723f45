"""Outputs uploaded as Cog uploads them: --cog-upload-url (a raw PUT of each file to <URL>/<name>,
answered as the response's Location without its query) and a request's output_file_prefix (a
multipart PUT to prefix + name), to a real storage server on loopback; a failed upload fails the
prediction, in words."""

from __future__ import annotations

import http.server
import io
import json
import threading

import httpx
import pytest
from PIL import Image

from tests.helpers import Receiver
from tests.server.cog.conftest import quick


class Storage:
    """Takes PUTs on 127.0.0.1 as (path, lower-cased headers, body); answers 201 with a signed
    Location, or 500 under /broken/."""

    def __init__(self):
        self.puts: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.puts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                broken = self.path.startswith("/broken/")
                self.send_response(500 if broken else 201)
                if not broken:
                    self.send_header("Location", f"{outer.url}/stored{self.path}?signature=secret")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def storage():
    s = Storage()
    yield s
    s.close()


def test_upload_url(server_factory, storage):
    server = server_factory("--cog-upload-url", f"{storage.url}/upload")
    receiver = Receiver()
    try:
        r = httpx.post(f"{server.url}/cog/predictions", timeout=60, json={
            "input": quick(1, num_outputs=2), "webhook": receiver.url, "webhook_events_filter": ["completed"]})
        p = r.json()
        assert r.status_code == 200 and p["status"] == "succeeded", p
        assert p["output"] == [f"{storage.url}/stored/upload/out-0.png", f"{storage.url}/stored/upload/out-1.png"]
        assert [path for path, _, _ in storage.puts] == ["/upload/out-0.png", "/upload/out-1.png"]
        for _, headers, body in storage.puts:
            assert headers["content-type"] == "image/png" and headers["x-prediction-id"] == p["id"]
            assert Image.open(io.BytesIO(body)).size == (64, 64)
        receiver.wait(1)
        assert json.loads(receiver.posts[0][1])["output"] == p["output"]  # the webhook carries the URLs too
        # Replicate's API still answers the files this server keeps.
        replicate = httpx.get(f"{server.url}/v1/predictions/{p['id']}").json()
        assert replicate["output"][0].startswith("data:image/png;base64,")
    finally:
        receiver.close()


def test_output_file_prefix_and_a_failed_upload(server_factory, storage):
    server = server_factory()  # no upload URL: data URLs unless the request names a prefix
    plain = httpx.post(f"{server.url}/cog/predictions", json={"input": quick(2)}, timeout=60).json()
    assert plain["output"][0].startswith("data:image/png;base64,") and storage.puts == []
    prefixed = httpx.post(f"{server.url}/cog/predictions", timeout=60, json={
        "input": quick(3), "output_file_prefix": f"{storage.url}/prefix/run-"}).json()
    assert prefixed["status"] == "succeeded" and prefixed["output"] == [f"{storage.url}/prefix/run-out-0.png"]
    path, headers, body = storage.puts[0]
    assert path == "/prefix/run-out-0.png" and headers["content-type"].startswith("multipart/form-data")
    assert b'name="file"' in body and b"\x89PNG" in body
    failed = httpx.post(f"{server.url}/cog/predictions", timeout=60, json={
        "input": quick(4), "output_file_prefix": f"{storage.url}/broken/"}).json()
    assert failed["status"] == "failed" and failed["output"] is None
    assert failed["error"].startswith(f"output out-0.png could not be uploaded to {storage.url}/broken/out-0.png")
