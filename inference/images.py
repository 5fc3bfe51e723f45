"""File inputs and image outputs: decode data URIs, URLs and paths under limits; encode outputs.

Every failure is a :class:`FetchError` naming the input field and saying what was wrong, so a
prediction fails with one clear sentence and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, get_args

from PIL import Image, ImageOps

from .errors import Cancelled, FetchError

# Stops decompression bombs: the header is read first, and anything above this many pixels is
# refused before a single pixel is decoded. 100 MP covers any camera photo.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
USER_AGENT = "flux-fill-server"  # on every request this server makes: input fetches and webhooks

OutputFormat = Literal["webp", "jpg", "png"]  # the output_format input's choices
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
# The formats decoded, with their media types: what people send the hosted model (the JPEG reader
# also opens phones' MPO files). Pillow would open about forty more (EPS through Ghostscript among
# them); none of them is tried.
ACCEPTED_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                  "BMP": "image/bmp", "TIFF": "image/tiff"}
ACCEPTED_FORMATS = tuple(ACCEPTED_TYPES)
_PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}  # output format -> Pillow's name
OUTPUT_CONTENT_TYPES = {fmt: ACCEPTED_TYPES[_PIL_FORMATS[fmt]] for fmt in OUTPUT_FORMATS}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for file inputs fetched over the network. ``timeout_s`` is the whole fetch's time,
    redirects and a server that sends a byte now and then included, not a time per read."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = 30.0
    max_redirects: int = 5
    allow_private: bool = True  # False refuses loopback, private and link-local addresses (SSRF)
    user_agent: str = USER_AGENT
    headers: tuple = ()  # (name, value) pairs sent with every fetch (the server marks its own fetches)


# A resolver maps a file string to its bytes, or returns None to fall through to the defaults.
Resolver = Callable[[str], "bytes | None"]


def decode_data_uri(value: str, field: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    header, sep, payload = value.partition(",")
    if not sep:
        raise FetchError.one(field, "format", f"{field} is not a valid data URI (no comma)")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise FetchError.one(field, "size", f"{field} is larger than {max_bytes // (1024 * 1024)} MB")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise FetchError.one(field, "format", f"{field} is not valid base64") from None
    return urllib.parse.unquote_to_bytes(payload)


def check_host_allowed(url: str, field: str, policy: FetchPolicy) -> str | None:
    """Refuse URLs that resolve to loopback, private or link-local addresses when the policy says so.

    Returns the checked address the request must connect to (None when every address is allowed):
    connecting to it, rather than resolving the name again, leaves no gap for a DNS answer that
    changes between the check and the connection (DNS rebinding)."""
    if policy.allow_private:
        return None
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise FetchError.one(field, "fetch", f"could not resolve the host of {field}") from None
    if non_public_address(info[4][0] for info in infos) is not None:
        raise FetchError.one(field, "forbidden", f"{field} points to a private or loopback address, which this server refuses")
    if not infos:
        raise FetchError.one(field, "fetch", f"could not resolve the host of {field}")
    return infos[0][4][0]


NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address: not loopback, private, link-local, shared or reserved.
    An IPv6 address that carries an IPv4 one (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64
    64:ff9b::/96, 6to4 2002::/16, Teredo) is judged by that IPv4 address, which is where it leads;
    site-local fec0::/10 is private."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = embedded_ipv4(addr)
        if embedded is not None:
            return is_public(embedded)
        if addr.is_site_local:
            return False
    return addr.is_global and not addr.is_multicast


def non_public_address(hosts) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The first of ``hosts`` (the address strings of a ``getaddrinfo`` answer, an IPv6 scope id
    allowed) that is not public, or None: the check of input URLs and webhook URLs alike."""
    for host in hosts:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
        if not is_public(addr):
            return addr
    return None


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through, if it is one of the forms that carry one."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    value = int(addr)
    if any(addr in net for net in NAT64_PREFIXES) or (0 < value < 2**32 and value > 1):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)  # NAT64, or the deprecated IPv4-compatible ::a.b.c.d
    return None


def pinned_request(url: str, address: str | None) -> tuple[object, dict, dict]:
    """The URL, headers and extensions that send a request for ``url`` to ``address``, keeping the
    Host header, TLS server name and certificate check of the original host."""
    import httpx

    target = httpx.URL(url)
    if address is None:
        return target, {}, {}
    headers = {"host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return target.copy_with(host=address), headers, extensions


def fetch_url(url: str, field: str, policy: FetchPolicy, cancelled: Callable[[], bool] | None = None,
              into=None) -> bytes:
    """GET an http(s) URL with size, time and redirect limits; each redirect hop is checked again.
    The time limit covers the whole fetch; ``cancelled`` is asked between reads (a canceled
    prediction stops fetching at once). With ``into`` (a file open for writing) the bytes go there
    as they arrive, not into memory, and b"" is returned."""
    import httpx

    deadline = time.monotonic() + policy.timeout_s
    too_slow = FetchError.one(field, "fetch", f"fetching {field} took longer than {policy.timeout_s:g} s")

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise too_slow
        if cancelled is not None and cancelled():
            raise Cancelled()
        return remaining

    current = url
    headers = {"user-agent": policy.user_agent, **dict(policy.headers)}
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False, headers=headers) as client:
        for _ in range(policy.max_redirects + 1):
            scheme = urllib.parse.urlsplit(current).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError.one(field, "format", f"{field} redirected to an unsupported scheme {scheme!r}")
            try:
                target, pin_headers, extensions = pinned_request(current, check_host_allowed(current, field, policy))
                with client.stream("GET", target, headers=pin_headers, extensions=extensions,
                                   timeout=min(left(), policy.timeout_s)) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise FetchError.one(field, "fetch", f"{field}: redirect without a location")
                        current = urllib.parse.urljoin(current, location)
                        continue
                    if resp.status_code != 200:
                        raise FetchError.one(field, "fetch", f"could not fetch {field}: HTTP {resp.status_code}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise FetchError.one(field, "size", f"{field} is larger than {policy.max_bytes // (1024 * 1024)} MB")
                    chunks, total = [], 0
                    for chunk in resp.iter_bytes():  # as the bytes arrive: a drip is checked byte by byte
                        left()
                        total += len(chunk)
                        if total > policy.max_bytes:
                            raise FetchError.one(field, "size", f"{field} is larger than {policy.max_bytes // (1024 * 1024)} MB")
                        if into is not None:
                            into.write(chunk)
                        else:
                            chunks.append(chunk)
                    left()
                    return b"".join(chunks)
            except httpx.TimeoutException:
                raise too_slow from None
            except httpx.HTTPError as exc:
                raise FetchError.one(field, "fetch", f"could not fetch {field}: {type(exc).__name__}") from None
            except FetchError:
                raise
            except (httpx.InvalidURL, ValueError, OverflowError) as exc:  # e.g. host 999.999.999.999, port 99999
                raise FetchError.one(field, "format", f"{field} is not a URL this server can fetch ({type(exc).__name__})") from None
    raise FetchError.one(field, "fetch", f"{field}: more than {policy.max_redirects} redirects")


def read_file_string(
    value: str,
    field: str,
    *,
    policy: FetchPolicy = FetchPolicy(),
    resolver: Resolver | None = None,
    allow_paths: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> bytes:
    """The bytes behind a file input: a data URI, an http(s) URL, or (CLI only) a local path."""
    if not isinstance(value, str) or not value.strip():
        raise FetchError.one(field, "format", f"{field} is empty")
    value = value.strip()
    if resolver is not None:
        found = resolver(value)
        if found is not None:
            return found
    try:
        scheme = urllib.parse.urlsplit(value).scheme.lower() if ":" in value else ""
    except ValueError:  # e.g. "http://[::1:1/": an unclosed IPv6 host
        raise FetchError.one(field, "format", f"{field} is not a valid URL") from None
    if scheme == "data":
        return decode_data_uri(value, field, policy.max_bytes)
    if scheme in ("http", "https"):
        return fetch_url(value, field, policy, cancelled)
    if allow_paths and (scheme == "" or len(scheme) == 1):  # a bare path, or a Windows drive letter
        path = Path(value).expanduser()
        if not path.is_file():
            raise FetchError.one(field, "format", f"{field}: no such file {value}")
        if path.stat().st_size > policy.max_bytes:
            raise FetchError.one(field, "size", f"{field} is larger than {policy.max_bytes // (1024 * 1024)} MB")
        return path.read_bytes()
    shown = scheme or "a path"
    raise FetchError.one(field, "format", f"{field} must be a data: URI or an http(s) URL, not {shown}")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel: its format, stored size and
    colour mode, and whether it has an alpha channel (or a transparent palette colour)."""

    format: str
    width: int
    height: int
    mode: str
    has_alpha: bool

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def content_type(self) -> str:
        """Its media type; a phone's MPO (which the JPEG reader opens) is a JPEG."""
        return ACCEPTED_TYPES.get(self.format, "image/jpeg")


def read_header(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of image bytes, refused as :func:`open_image` refuses them (not an image this server
    reads, more than ``max_pixels``) but without decoding the pixels: a 10000x10000 PNG of a few
    hundred KB costs that few hundred KB here, not the 400 MB its pixels take."""
    Image.init()
    try:
        with _bomb_limit(max_pixels), Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            header = ImageHeader(format=img.format or "", width=img.width, height=img.height, mode=img.mode,
                                 has_alpha=has_alpha(img))
    except Image.DecompressionBombError:
        raise FetchError.one(field, "size", f"{field} has too many pixels") from None
    except Exception:
        raise FetchError.one(field, "format", f"{field} is not an image this server can read "
                                              "(PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    if header.width * header.height > max_pixels:
        raise FetchError.one(field, "size", f"{field} is {header.width}x{header.height}, more than the "
                                            f"{max_pixels // 1_000_000} megapixel limit")
    if header.width < 1 or header.height < 1:
        raise FetchError.one(field, "format", f"{field} has no pixels")
    return header


def open_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes, refusing anything whose header declares more than ``max_pixels``."""
    Image.init()  # every reader registered (once): Pillow's first pass knows only five formats
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise FetchError.one(field, "size", f"{field} has too many pixels") from None
    except Exception:
        raise FetchError.one(field, "format", f"{field} is not an image this server can read "
                                              "(PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    w, h = img.size
    if w * h > max_pixels:
        raise FetchError.one(field, "size", f"{field} is {w}x{h}, more than the {max_pixels // 1_000_000} megapixel limit")
    if w < 1 or h < 1:
        raise FetchError.one(field, "format", f"{field} has no pixels")
    try:
        with _bomb_limit(max_pixels):
            img.load()
    except Exception:
        raise FetchError.one(field, "format", f"{field} could not be decoded (truncated or corrupt)") from None
    return img


class _bomb_limit:
    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def __enter__(self):
        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(self.saved or 0, self.max_pixels)

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.saved


def has_alpha(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA"):
        return True
    return img.mode == "P" and "transparency" in img.info


def mask_from_alpha(img: Image.Image) -> Image.Image:
    """Transparent = repaint (Black Forest Labs' convention): the mask is 255 - alpha."""
    alpha = img.convert("RGBA").getchannel("A")
    return ImageOps.invert(alpha)


def to_rgb(img: Image.Image, field: str = "image") -> Image.Image:
    """The stored RGB, the stored size kept (no EXIF rotation). An alpha channel is dropped, not
    flattened: the hosted model reads the stored colours, and here the alpha only makes the mask
    when no mask is given."""
    return img if img.mode == "RGB" else _converted(img, "RGB", field)


def to_mask(img: Image.Image, field: str = "mask") -> Image.Image:
    """Greyscale mask (white = repaint): the luminance of the stored colours, an alpha channel ignored."""
    return _converted(img, "L", field)


def _converted(img: Image.Image, mode: str, field: str) -> Image.Image:
    """``img`` in ``mode``; a colour mode Pillow cannot convert (LAB, for one) is the input's fault."""
    try:
        return img.convert(mode)
    except (ValueError, OSError):
        try:  # one step through RGB reaches most modes
            return img.convert("RGB").convert(mode)
        except (ValueError, OSError):
            raise FetchError.one(field, "format", f"{field} is in a colour mode ({img.mode}) this server cannot "
                                                  "convert; send it as RGB or greyscale") from None


def encode_image(img: Image.Image, output_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    fmt = _PIL_FORMATS[output_format]
    if fmt == "PNG":
        img.save(buf, format=fmt)
    else:
        img.save(buf, format=fmt, quality=int(quality))
    return buf.getvalue()
