"""Admission before work on OpenAI's and BFL's routes: an API node reads a picture's header, never its
pixels, and checks the queue before it reads even that. A 10000 x 10000 PNG is a 300 KB file and
400 MB of pixels; sent to an API node it must cost that node the file, not the pixels.

Each test measures the API node's peak resident memory (VmHWM in /proc/<pid>/status) around its
requests: it may grow by less than 100 MB however large the pictures' pixel counts are.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import TOKEN
from bench.large_pngs import flat_png

MB = 1024 * 1024
LIMIT = 99_000_000  # --max-image-pixels: below 10000 x 10000, above 8000 x 8000
KEY = {"x-key": TOKEN}


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    return {"over": flat_png(10000, 10000), "within": flat_png(8000, 8000)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_pictures_are_admitted_from_their_headers_and_made_on_the_worker(server_factory, postgres_url, pictures):
    """An API node and a worker node on one database: pictures over --max-image-pixels are refused
    in each API's shape, one within it is queued and made by the worker, and the API node's memory
    does not grow by the pictures' pixels."""
    common = ("--database", postgres_url, "--api-token", TOKEN, "--max-image-pixels", str(LIMIT))
    api = server_factory("--no-workers", *common)
    server_factory(*common, command="worker")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0, timeout=180)
    before = peak_rss(api.process.pid)

    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("big.png", pictures["over"], "image/png"), prompt="x", size="256x256")
    assert err.value.param == "image" and "10000x10000, more than the 99 megapixel limit" in err.value.message
    for endpoint, extra in (("flux-pro-1.0-fill", {}), ("flux-pro-1.0-expand", {"top": 64})):
        refused = httpx.post(f"{api.url}/v1/{endpoint}", headers=KEY, timeout=60,
                             json={"image": b64(pictures["over"]), "steps": 15, **extra})
        assert refused.status_code == 422, refused.text
        [detail] = refused.json()["detail"]
        assert detail["loc"] == ["body", "image"] and "more than the 99 megapixel limit" in detail["msg"]
    assert httpx.get(f"{api.url}/v1/predictions", headers=KEY).json()["results"] == []

    made = client.images.edit(model="gpt-image-2", image=("within.png", pictures["within"], "image/png"),
                              prompt="x", size="256x256", quality="low")
    assert Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))).size == (256, 256)
    assert made.usage.input_tokens_details.image_tokens == 256  # the image as the model took it: 256 x 256
    grown = peak_rss(api.process.pid) - before
    assert grown < 100 * MB, f"the API node's peak memory grew by {grown // MB} MB"


def test_a_full_queue_is_429_before_any_picture_is_read(server_factory, pictures):
    """--max-queue 1 on an API node without workers: once one task waits, OpenAI's edit and BFL's
    fill are refused at once in their shapes, and the 64 MP picture they carry is never decoded."""
    api = server_factory("--no-workers", "--api-token", TOKEN, "--max-queue", "1")
    small = flat_png(64, 64, (10, 20, 30, 0))  # transparent: Fill repaints it whole
    queued = httpx.post(f"{api.url}/v1/flux-pro-1.0-fill", headers=KEY, json={"image": b64(small)}, timeout=30)
    assert queued.status_code == 200, queued.text
    before = peak_rss(api.process.pid)

    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.images.edit(image=("within.png", pictures["within"], "image/png"), prompt="x")
    assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
    full = httpx.post(f"{api.url}/v1/flux-pro-1.0-fill", headers=KEY, json={"image": b64(pictures["within"])},
                      timeout=60)
    assert full.status_code == 429 and set(full.json()) == {"detail"} and "overloaded" in full.json()["detail"]
    assert int(full.headers["retry-after"]) >= 1
    grown = peak_rss(api.process.pid) - before
    assert grown < 100 * MB, f"the API node's peak memory grew by {grown // MB} MB"
    assert len(httpx.get(f"{api.url}/v1/predictions", headers=KEY).json()["results"]) == 1


def test_the_admission_bench_prints_both_ways_and_their_ratio():
    """bench/admission.py, small: it runs and prints its lines (the figures are its business)."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    done = subprocess.run([sys.executable, "bench/admission.py", "--side", "1000", "--repeats", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("header read  1000x1000 PNG") and lines[1].startswith("full decode  1000x1000 PNG")
    assert lines[-1].startswith("ratio header read over full decode: time ")
