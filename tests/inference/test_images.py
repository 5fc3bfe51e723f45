import base64
import http.server
import struct
import threading
import zlib

import pytest
from PIL import Image

from inference.errors import FetchError
from inference.images import FetchPolicy, mask_from_alpha, open_image, read_file_string
from tests.helpers import data_uri, noise_image, png_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares a huge size, with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_data_uri_round_trip():
    img = noise_image(20, 10)
    data = read_file_string(data_uri(img), "image")
    assert open_image(data, "image").size == (20, 10)


@pytest.mark.parametrize("value,rule", [
    ("data:image/png;base64,!!!notbase64", "format"),
    ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "format"),
])
def test_undecodable_data_is_a_clear_error(value, rule):
    with pytest.raises(FetchError) as err:
        open_image(read_file_string(value, "image"), "image")
    assert err.value.errors[0].field == "image"
    assert "image" in err.value.errors[0].description


@pytest.mark.parametrize("size", [(100_000, 100_000), (12_000, 10_000)])
def test_bomb_sized_header_is_refused_before_decoding(size):
    data = png_header_only(*size)
    with pytest.raises(FetchError) as err:
        open_image(data, "image", max_pixels=100_000_000)
    assert err.value.errors[0].type == "size"


def test_truncated_image_is_a_clear_error():
    data = png_bytes(noise_image(64, 64))[:200]
    with pytest.raises(FetchError) as err:
        open_image(data, "mask")
    assert err.value.errors[0].field == "mask"


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://example.com/a.png", "/etc/passwd", "gopher://x/y"])
def test_refused_schemes(value):
    with pytest.raises(FetchError) as err:
        read_file_string(value, "image")
    assert "data: URI or an http(s) URL" in err.value.errors[0].description


def test_paths_only_when_allowed(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(noise_image(8, 8)))
    assert read_file_string(str(path), "image", allow_paths=True) == path.read_bytes()
    with pytest.raises(FetchError):
        read_file_string(str(path), "image")


def test_alpha_becomes_mask_transparent_repaints():
    img = Image.new("RGBA", (4, 1), (10, 20, 30, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    assert list(mask_from_alpha(img).getdata()) == [0, 255, 127, 0]


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.routes
    server.shutdown()
    _Handler.routes.clear()


def test_url_fetch_with_limits(http_server):
    base, routes = http_server
    image = png_bytes(noise_image(16, 16))
    routes["/ok.png"] = (200, {"Content-Type": "image/png"}, image)
    routes["/big.png"] = (200, {}, b"x" * 5000)
    routes["/hop"] = (302, {"Location": "/ok.png"}, b"")
    for i in range(8):
        routes[f"/loop{i}"] = (302, {"Location": f"/loop{i + 1}"}, b"")
    assert read_file_string(f"{base}/ok.png", "image") == image
    assert read_file_string(f"{base}/hop", "image") == image
    with pytest.raises(FetchError, match="larger than"):
        read_file_string(f"{base}/big.png", "image", policy=FetchPolicy(max_bytes=1000))
    with pytest.raises(FetchError, match="redirects"):
        read_file_string(f"{base}/loop0", "image", policy=FetchPolicy(max_redirects=3))
    with pytest.raises(FetchError, match="HTTP 404"):
        read_file_string(f"{base}/missing", "image")
    with pytest.raises(FetchError, match="private or loopback"):
        read_file_string(f"{base}/ok.png", "image", policy=FetchPolicy(allow_private=False))


def test_a_fetch_into_a_file_keeps_nothing_in_memory(http_server):
    """LoRA downloads (gigabytes) are written as they arrive; the size limit still holds."""
    import io

    from inference.images import fetch_url

    base, routes = http_server
    routes["/lora.safetensors"] = (200, {}, b"w" * 300_000)
    sink = io.BytesIO()
    assert fetch_url(f"{base}/lora.safetensors", "lora_weights", FetchPolicy(), into=sink) == b""
    assert sink.getvalue() == b"w" * 300_000
    with pytest.raises(FetchError, match="larger than"):
        fetch_url(f"{base}/lora.safetensors", "lora_weights", FetchPolicy(max_bytes=100_000), into=io.BytesIO())


def test_private_check_pins_the_checked_address(http_server, monkeypatch):
    """With private addresses refused, the request goes to the address that was checked: a name whose
    second DNS answer differs (DNS rebinding) cannot slip another address in between."""
    import socket

    import inference.images as images

    base, routes = http_server
    port = base.rsplit(":", 1)[1]
    routes["/ok.png"] = (200, {}, b"pinned")
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])  # the first answer is checked; later ones differ

    def rebinding(host, *args, **kwargs):
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(images, "is_public", lambda addr: str(addr) == "127.0.0.1")  # stand-in for a public address
    got = read_file_string(f"http://rebind.test:{port}/ok.png", "image", policy=FetchPolicy(allow_private=False))
    assert got == b"pinned"
