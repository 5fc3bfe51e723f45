"""Every request's work is bounded on the engine's side: fetches by their whole time and by cancel,
addresses by every IPv6 form that leads to a private IPv4 one, decoding by format and colour mode,
sizes by their pixel budget, crop_to_mask by its number of regions, the LoRA download cache by bytes."""

from __future__ import annotations

import http.server
import io
import ipaddress
import os
import threading
import time

import pytest
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.errors import Cancelled, FetchError, InvalidInput
from inference.images import FetchPolicy, fetch_url, is_public, open_image, read_file_string
from inference.inputs import parse_input
from inference.lora import LoraManager, LoraSettings, trim_cache
from inference.sizing import output_size
from tests.helpers import box_mask, fast_input, noise_image, png_bytes


class Drip(http.server.BaseHTTPRequestHandler):
    """A server that sends a PNG header and then one byte every ``gap`` seconds, forever after."""

    gap = 0.2
    seen_headers: list = []

    def do_GET(self):
        Drip.seen_headers.append(dict(self.headers))
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", "10000000")
        self.end_headers()
        try:
            self.wfile.write(b"\x89PNG\r\n\x1a\n")
            self.wfile.flush()
            for _ in range(10_000):
                time.sleep(self.gap)
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def drip():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()
    server.server_close()


def test_a_dripping_server_is_cut_off_at_the_whole_fetchs_time_limit(drip):
    """Each read gets a byte well within the time limit; the fetch as a whole does not."""
    started = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1.5 s"):
        fetch_url(drip, "image", FetchPolicy(timeout_s=1.5))
    assert time.monotonic() - started < 5


def test_a_cancel_stops_a_fetch_between_two_reads(drip):
    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) > 2

    started = time.monotonic()
    with pytest.raises(Cancelled):
        read_file_string(drip, "image", policy=FetchPolicy(timeout_s=60), cancelled=cancelled)
    assert time.monotonic() - started < 5


def test_fetches_carry_the_policys_headers(drip):
    Drip.seen_headers.clear()
    with pytest.raises(FetchError):
        fetch_url(drip, "image", FetchPolicy(timeout_s=0.5, headers=(("X-Flux-Fill-Fetch", "instance-7"),)))
    assert Drip.seen_headers[0].get("X-Flux-Fill-Fetch") == "instance-7"


@pytest.mark.parametrize(("address", "public"), [
    ("::ffff:10.0.0.1", False),       # IPv4-mapped
    ("::127.0.0.1", False),           # IPv4-compatible (deprecated)
    ("64:ff9b::7f00:1", False),       # NAT64 of 127.0.0.1
    ("64:ff9b::a00:1", False),        # NAT64 of 10.0.0.1
    ("64:ff9b:1::c0a8:101", False),   # local-use NAT64 of 192.168.1.1
    ("2002:a9fe:a9fe::1", False),     # 6to4 of 169.254.169.254, the cloud metadata address
    ("2002:7f00:1::", False),         # 6to4 of 127.0.0.1
    ("fec0::1", False),               # site-local
    ("::1", False),
    ("fe80::1", False),
    ("64:ff9b::808:808", True),       # NAT64 of 8.8.8.8
    ("2002:808:808::1", True),        # 6to4 of 8.8.8.8
    ("2606:4700:4700::1111", True),
    ("8.8.8.8", True),
    ("100.64.0.1", False),            # shared address space
])
def test_every_ipv6_form_of_a_private_ipv4_address_is_private(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def encoded(fmt: str, mode: str = "RGB", size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else None).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_formats_people_send_are_read(fmt):
    assert open_image(encoded(fmt), "image").size == (16, 16)


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "ICO", "EPS"])
def test_other_formats_are_not_decoded_at_all(fmt, monkeypatch):
    if fmt == "EPS":  # writing EPS needs nothing; reading it would run Ghostscript
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    else:
        data = encoded(fmt)
    with pytest.raises(FetchError, match="PNG, JPEG, WebP, GIF, BMP or TIFF"):
        open_image(data, "image")


def test_a_lab_tiff_mask_is_read_not_an_internal_error(engine):
    buf = io.BytesIO()
    Image.new("LAB", (64, 64), (200, 0, 0)).save(buf, format="TIFF")
    import base64

    lab = "data:image/tiff;base64," + base64.b64encode(buf.getvalue()).decode()
    inp = parse_input({**fast_input(noise_image(64, 64), seed=1), "mask": lab})
    assert len(engine.predict(inp)) == 1


def test_a_strip_image_is_refused_rather_than_generated_at_ten_megapixels(engine):
    with pytest.raises(ValueError, match="too narrow"):
        output_size(1, 100_000, "1")
    assert output_size(100, 1600, "1") == (256, 4096)  # tall, but within the budget
    strip = Image.new("RGB", (1, 2000), (9, 9, 9))
    inp = parse_input({**fast_input(strip, box_mask(1, 2000, (0, 0, 1, 100))), "megapixels": "1"})
    with pytest.raises(InvalidInput) as err:
        engine.predict(inp)
    assert err.value.errors[0].field == "image" and "too narrow" in err.value.errors[0].description


def test_the_outpaint_canvas_is_held_to_the_pixel_limit(tiny_model):
    engine = Engine(tiny_model, EngineSettings(max_pixels=10_000))
    inp = parse_input(fast_input(noise_image(80, 80), outpaint="Zoom out 2x"))  # 6,400 px in, 25,600 canvas
    with pytest.raises(InvalidInput) as err:
        engine.predict(inp)
    assert err.value.errors[0].field == "outpaint" and "160x160 canvas" in err.value.errors[0].description


def test_crop_to_mask_generates_a_bounded_number_of_regions(tiny_model):
    engine = Engine(tiny_model, EngineSettings(max_regions=4))
    dots = Image.new("L", (256, 256), 0)
    for x in range(8, 256, 48):
        for y in range(8, 256, 48):
            dots.putpixel((x, y), 255)
    calls = []
    handle = engine.pipeline.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(InvalidInput) as err:
            engine.predict(parse_input(fast_input(noise_image(256, 256), dots, crop_to_mask=True, crop_margin=0)))
    finally:
        handle.remove()
    assert err.value.errors[0].field == "mask" and "36 separate regions" in err.value.errors[0].description
    assert calls == []  # refused before any step


def test_the_lora_download_cache_keeps_the_recently_used_within_its_bytes(tmp_path):
    now = time.time()
    for i, age in enumerate((300, 200, 100)):  # lora0 used longest ago
        path = tmp_path / f"lora{i}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age, now - 1000))
    stale = tmp_path / "half.123.part"
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (now - 7200, now - 7200))
    trim_cache(tmp_path, 2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora1.safetensors", "lora2.safetensors"]


def test_a_downloaded_file_that_is_no_lora_is_not_kept(tiny_model, tmp_path):
    cache = tmp_path / "loras"
    cache.mkdir()
    bad = cache / ("0" * 32 + ".safetensors")
    bad.write_bytes(png_bytes(noise_image(8, 8)))
    manager = LoraManager(tiny_model.pipeline, LoraSettings(cache_dir=cache, allow_paths=True))
    with pytest.raises(InvalidInput, match="not a readable .safetensors file"):
        with manager.applied(str(bad), 1.0):
            pass
    assert not bad.exists() and not manager.loaded
