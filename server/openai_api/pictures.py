"""The pictures of an OpenAI request, as this server's engine takes them. Pure functions of bytes.

OpenAI's mask is the opposite of ours: its *transparent* pixels are edited, where ours are white.
Without a mask, the image's own transparent pixels are edited; an image with none is repainted
whole. A ``size`` other than ``auto`` is the exact size of every output: the image and mask are
scaled to it, the model generates at that size (sides floored to 32, at most 1440, as
``megapixels: match_input`` does) and each output is scaled to it exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from inference.errors import FetchError
from inference.images import encode_image, has_alpha, open_image

from .protocol import ENGINE_FORMATS, invalid

CANVAS_GREY = (127, 127, 127)  # a generation's canvas: fully masked, so its colour is never seen


@dataclass(frozen=True)
class Pictures:
    """What a prediction is given: the image and our mask (white is repainted), as data: URIs."""

    image: str
    mask: str
    size: tuple[int, int]  # the outputs' exact size


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        return open_image(data, param, max_pixels)
    except FetchError as exc:
        raise invalid(f"Invalid '{param}': {exc.errors[0].description}.", param, "invalid_image_format") from None


def edit_pictures(image: bytes, mask: bytes | None, size: tuple[int, int] | None, max_pixels: int) -> Pictures:
    """The image to edit and our mask, from OpenAI's image and (optional) mask."""
    picture = _open(image, "image", max_pixels)
    if mask is not None:
        stencil = _open(mask, "mask", max_pixels)
        if stencil.size != picture.size:
            raise invalid(f"Invalid 'mask': its size ({stencil.width}x{stencil.height}) must match the image's "
                          f"({picture.width}x{picture.height}).", "mask", "invalid_image_dimensions")
        if not has_alpha(stencil):
            raise invalid("Invalid 'mask': it must have an alpha channel; its fully transparent areas are the "
                          "ones edited.", "mask", "invalid_image_format")
        ours = _edited_where_transparent(stencil)
    elif has_alpha(picture):
        ours = _edited_where_transparent(picture)
    else:
        ours = Image.new("L", picture.size, 255)  # no transparency anywhere: the whole image is repainted
    if ours.getextrema() == (0, 0):
        ours = Image.new("L", picture.size, 255)
    rgb = picture.convert("RGB")
    target = size or picture.size
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        ours = ours.resize(target, Image.Resampling.BILINEAR)
    return Pictures(image=data_uri(rgb), mask=data_uri(ours), size=target)


def _edited_where_transparent(img: Image.Image) -> Image.Image:
    """Our mask from an alpha channel: 255 - alpha (transparent is repainted), kept soft."""
    return Image.eval(img.convert("RGBA").getchannel("A"), lambda a: 255 - a)


def generation_pictures(size: tuple[int, int]) -> Pictures:
    """A generation is an edit of a blank canvas of the size, masked whole."""
    return Pictures(image=data_uri(Image.new("RGB", size, CANVAS_GREY)), mask=data_uri(Image.new("L", size, 255)),
                    size=size)


def fitted(data: bytes, size: tuple[int, int], output_format: str, quality: int) -> bytes | None:
    """An encoded output scaled to exactly ``size`` (re-encoded in its format), or None when it has it."""
    with Image.open(io.BytesIO(data)) as img:
        if img.size == tuple(size):
            return None
        return encode_image(img.convert("RGB").resize(tuple(size), Image.Resampling.LANCZOS), output_format, quality)


def fit_outputs(outputs: list, api_data: dict[str, Any] | None) -> list:
    """The engine's outputs (``inference.engine.Output``) scaled to the size the request asked for, exactly."""
    size = (api_data or {}).get("size")
    if not size:
        return outputs
    engine_format = ENGINE_FORMATS.get(api_data.get("output_format", "png"), "png")
    quality = int(api_data.get("output_compression", 100))
    fitted_outputs = []
    for out in outputs:
        data = fitted(out.data, (size[0], size[1]), engine_format, quality)
        fitted_outputs.append(out if data is None else dataclasses.replace(out, data=data, width=size[0], height=size[1]))
    return fitted_outputs


def converted(data: bytes, size: tuple[int, int], output_format: str, quality: int) -> bytes:
    """A preview (any image) in the request's format and exact size."""
    with Image.open(io.BytesIO(data)) as img:
        picture = img.convert("RGB")
        if picture.size != tuple(size):
            picture = picture.resize(tuple(size), Image.Resampling.LANCZOS)
        return encode_image(picture, output_format, quality)
