"""The pictures of an OpenAI request: checked from their headers on the API node, made into the
engine's image and mask on the worker.

OpenAI's mask is the opposite of ours: its *transparent* pixels are edited, where ours are white.
Without a mask, the image's own transparent pixels are edited; an image with none (or with no
transparent pixel) is repainted whole. A ``size`` other than ``auto`` is the exact size of every
output: the image and mask are scaled to it, the model generates at that size (sides floored to 32,
at most 1440, as ``megapixels: match_input`` does) and each output is scaled to it exactly. A
generation is an edit of a blank canvas of the size, masked whole.

Nothing here decodes a picture on the API node: :func:`check_edit` reads headers only (a 10000 x
10000 PNG of 400 KB costs 400 KB there), and :func:`edit_pictures` runs on the worker.
"""

from __future__ import annotations

import io

from PIL import Image

from inference.errors import FetchError
from inference.images import ImageHeader, encode_image, has_alpha, open_image, read_header

from .protocol import OpenAIError, invalid

CANVAS_GREY = (127, 127, 127)  # a generation's canvas: fully masked, so its colour is never seen


def _invalid_picture(exc: FetchError, param: str) -> OpenAIError:
    return invalid(f"Invalid '{param}': {exc.errors[0].description}.", param, "invalid_image_format")


def check_edit(image: bytes, mask: bytes | None, max_pixels: int) -> tuple[ImageHeader, ImageHeader | None]:
    """The image's and mask's headers, once they pass OpenAI's rules as far as headers tell:
    pictures this server reads, within --max-image-pixels, a mask of the image's size that has an
    alpha channel. 400 (OpenAI's shape) naming the parameter otherwise."""
    try:
        picture = read_header(image, "image", max_pixels)
    except FetchError as exc:
        raise _invalid_picture(exc, "image") from None
    stencil = None
    if mask is not None:
        try:
            stencil = read_header(mask, "mask", max_pixels)
        except FetchError as exc:
            raise _invalid_picture(exc, "mask") from None
        if stencil.size != picture.size:
            raise invalid(f"Invalid 'mask': its size ({stencil.width}x{stencil.height}) must match the image's "
                          f"({picture.width}x{picture.height}).", "mask", "invalid_image_dimensions")
        if not stencil.has_alpha:
            raise invalid("Invalid 'mask': it must have an alpha channel; its fully transparent areas are the "
                          "ones edited.", "mask", "invalid_image_format")
    return picture, stencil


def edit_pictures(image: bytes, mask: bytes | None, size: tuple[int, int],
                  max_pixels: int, selects: bool = False) -> tuple[Image.Image, Image.Image | None]:
    """On the worker: the image to edit (RGB) and our mask ("L", white is repainted) at ``size``,
    from OpenAI's image and (optional) mask. ``selects``: the edit has a mask_prompt, so an image
    with neither a mask nor transparency has no mask (None): the selection is the mask."""
    picture = open_image(image, "image", max_pixels)
    if mask is not None:
        stencil = open_image(mask, "mask", max_pixels)
        if stencil.size != picture.size:  # checked at admission; a stored input is checked again
            raise FetchError.one("mask", "size", f"mask is {stencil.width}x{stencil.height}, the image "
                                                 f"{picture.width}x{picture.height}: they must match")
        ours = _edited_where_transparent(stencil)
    elif has_alpha(picture):
        ours = _edited_where_transparent(picture)
    elif selects:
        ours = None
    else:
        ours = Image.new("L", picture.size, 255)  # no transparency anywhere: the whole image is repainted
    if ours is not None and ours.getextrema() == (0, 0) and not selects:
        ours = Image.new("L", picture.size, 255)
    rgb = picture.convert("RGB")
    if rgb.size != tuple(size):
        rgb = rgb.resize(tuple(size), Image.Resampling.LANCZOS)
        ours = ours.resize(tuple(size), Image.Resampling.BILINEAR) if ours is not None else None
    return rgb, ours


def _edited_where_transparent(img: Image.Image) -> Image.Image:
    """Our mask from an alpha channel: 255 - alpha (transparent is repainted), kept soft."""
    return Image.eval(img.convert("RGBA").getchannel("A"), lambda a: 255 - a)


def canvas(size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """On the worker: a generation's blank canvas of the size and its mask, masked whole."""
    return Image.new("RGB", tuple(size), CANVAS_GREY), Image.new("L", tuple(size), 255)


def converted(data: bytes, size: tuple[int, int], output_format: str, quality: int) -> bytes:
    """A preview (any image) in the request's format and exact size."""
    with Image.open(io.BytesIO(data)) as img:
        picture = img.convert("RGB")
        if picture.size != tuple(size):
            picture = picture.resize(tuple(size), Image.Resampling.LANCZOS)
        return encode_image(picture, output_format, quality)
