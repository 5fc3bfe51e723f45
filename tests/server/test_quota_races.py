"""Quotas that hold: a tenant's outputs are counted before they are written, so a 1 MB storage quota
is never passed, whichever API made the prediction; and creates and uploads racing on two API nodes
of one PostgreSQL database cannot pass a queue or storage quota together."""

from __future__ import annotations

import http.server
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.helpers import box_mask, data_uri, fast_input, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"
ALICE, ADMIN = "alice:alice-token", "admin-token"
TERMINAL = ("succeeded", "failed", "canceled")
pytestmark = pytest.mark.slow


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token.split(':')[-1]}"}


class ImageHost:
    """Serves one PNG over HTTP on loopback: an input fetched by URL, which the quota does not count."""

    def __init__(self, image: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/photo.png"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_all(server, ids, token):
    deadline = time.monotonic() + 300
    while True:
        found = {pid: httpx.get(f"{server.url}/v1/predictions/{pid}", headers=auth(token), timeout=30).json()
                 for pid in ids}
        if all(p["status"] in TERMINAL for p in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_outputs_are_counted_before_they_are_written_on_every_api(server_factory, tmp_path):
    """Each prediction keeps a full-size photo of about 0.5 MB as its output (crop_to_mask, the input
    fetched by URL): two fit in 1 MB, no more is written, and the ones that would pass fail in words."""
    photo = png_bytes(noise_image(400, 400, seed=1))  # noise: as large as a PNG of its size gets
    host = ImageHost(photo)
    try:
        server = server_factory("--api-token", ALICE, "--admin-token", ADMIN, "--tenant-max-stored-mb", "1")
        mask = data_uri(box_mask(400, 400, (180, 180, 220, 220)))
        inp = {"prompt": "a red door", "image": host.url, "mask": mask, "crop_to_mask": True, "megapixels": "0.25",
               "num_inference_steps": 1, "output_format": "png"}
        with ThreadPoolExecutor(4) as pool:  # at once: they end together
            made = list(pool.map(lambda n: httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", headers=auth(ALICE),
                                                      json={"input": {**inp, "seed": n}}, timeout=30), range(4)))
        assert all(r.status_code == 201 for r in made), [r.text for r in made]
        found = wait_all(server, [r.json()["id"] for r in made], ALICE)
        ok = [p for p in found.values() if p["status"] == "succeeded"]
        refused = [p for p in found.values() if p["status"] == "failed"]
        assert len(ok) == 2 and len(refused) == 2, [(p["status"], p["error"]) for p in found.values()]
        for p in refused:
            assert p["error"].startswith("Storage quota exceeded: this prediction's outputs"), p["error"]
            assert p["output"] is None
        sizes = [len(httpx.get(p["output"][0], timeout=30).content) if p["output"][0].startswith("http") else
                 len(p["output"][0]) * 3 // 4 for p in ok]
        assert sum(sizes) <= 1024 * 1024
        # The outputs of refused runs were never written.
        outputs = [f for f in (server.data_dir / "outputs").rglob("out-*") if f.is_file()]
        assert len(outputs) == 2
        # The other APIs' predictions are held to the same quota. The demo keeps the picture outside
        # the mask in 8 px tiles, so a whole-picture output compresses well: uploads first take the
        # room left down to under 2 KB, less than any 400x400 PNG the demo makes.
        size = 256 * 1024
        while size >= 2048:
            pad = httpx.post(f"{server.url}/v1/files", headers=auth(ALICE), timeout=30,
                             files={"content": ("pad.bin", os.urandom(size), "application/octet-stream")})
            assert pad.status_code in (201, 413), pad.text
            if pad.status_code == 413:
                size //= 2
        bfl = httpx.post(f"{server.url}/v1/flux-pro-1.0-fill", headers={"x-key": ALICE.split(":")[-1]},
                         json={"prompt": "a door", "image": host.url, "mask": mask.split(",", 1)[1], "steps": 15,
                               "output_format": "png"}, timeout=30)
        assert bfl.status_code == 200, bfl.text
        deadline = time.monotonic() + 120
        while (result := httpx.get(f"{server.url}/v1/get_result", params={"id": bfl.json()["id"]},
                                   headers={"x-key": ALICE.split(":")[-1]}, timeout=30).json())["status"] == "Pending":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert result["status"] == "Error" and "Storage quota exceeded" in str(result), result
        # The admin has no quota.
        r = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", headers=auth(ADMIN), json={"input": inp},
                       timeout=30)
        assert wait_all(server, [r.json()["id"]], ADMIN)[r.json()["id"]]["status"] == "succeeded"
    finally:
        host.close()


def test_creates_and_uploads_racing_on_two_nodes_cannot_pass_a_quota(server_factory, postgres_url):
    shared = ("--database", postgres_url, "--no-workers", "--api-token", ALICE, "--tenant-max-queued", "5",
              "--tenant-max-stored-mb", "5")
    nodes = [server_factory(*shared), server_factory(*shared)]
    img, mask = noise_image(16, 16), box_mask(16, 16, (2, 2, 14, 14))

    def create(n: int) -> int:
        return httpx.post(f"{nodes[n % 2].url}/v1/models/{MODEL}/predictions", headers=auth(ALICE), timeout=30,
                          json={"input": fast_input(img, mask, seed=n)}).status_code

    with ThreadPoolExecutor(12) as pool:  # no workers: every create stays queued
        codes = list(pool.map(create, range(12)))
    assert sorted(codes) == [201] * 5 + [429] * 7, codes
    blob = os.urandom(1024 * 1024 - 4096)

    def upload(n: int) -> int:
        return httpx.post(f"{nodes[n % 2].url}/v1/files", headers=auth(ALICE), timeout=60,
                          files={"content": (f"{n}.bin", io.BytesIO(blob))}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, range(8)))
    assert codes.count(201) == 5 and codes.count(413) == 3, codes
    listed = httpx.get(f"{nodes[0].url}/v1/files", headers=auth(ALICE), timeout=30).json()["results"]
    assert sum(f["size"] for f in listed) <= 5 * 1024 * 1024


def test_a_cancel_while_large_outputs_are_encoded_and_saved_is_honoured(server_factory):
    """A cancel that comes after the last denoising step still stops the prediction before its
    outputs are saved (encoding four large PNGs takes seconds): it ends canceled, with no output."""
    photo = png_bytes(noise_image(1600, 1600, seed=3))
    host = ImageHost(photo)
    try:
        server = server_factory()
        inp = {"prompt": "a red door", "image": host.url, "mask": data_uri(box_mask(1600, 1600, (700, 700, 760, 760))),
               "crop_to_mask": True, "megapixels": "0.25", "num_inference_steps": 1, "num_outputs": 4,
               "output_format": "png"}
        pid = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json={"input": inp}, timeout=30).json()["id"]
        deadline = time.monotonic() + 120
        while "1/1" not in (p := httpx.get(f"{server.url}/v1/predictions/{pid}", timeout=30).json())["logs"]:
            assert p["status"] in ("starting", "processing") and time.monotonic() < deadline, p
            time.sleep(0.02)
        assert httpx.post(f"{server.url}/v1/predictions/{pid}/cancel", timeout=30).status_code == 200
        done = wait_all(server, [pid], ALICE)[pid]
        assert done["status"] == "canceled" and done["output"] is None, (done["status"], done["logs"][-300:])
        assert not [f for f in (server.data_dir / "outputs").rglob("out-*") if f.is_file()]
    finally:
        host.close()
