"""BFL's pictures (see server.bfl): checked from their headers on the API node, read once, checked
and fitted to BFL's exact size on the worker.

On the API node nothing is decoded: a base64 image is read for its header (size, alpha channel),
which is enough for BFL's rules (the mask has the image's size; Fill needs a mask or an alpha
channel; the output within --max-image-pixels) and for the create's ``cost``, ``input_mp`` and
``output_mp``. A picture given as a URL is fetched by the worker, which checks it then.
"""

from __future__ import annotations

from typing import Any

from inference.engine import LogFn
from inference.errors import FetchError, InvalidInput
from inference.images import ImageHeader, decode_data_uri, read_header
from inference.sizing import output_size as engine_size

from ..adapters import EngineJob, FileReader, fit_outputs
from ..protocol import ApiError, InvalidField, validation_failed
from ..records import PredictionRecord

COST_STEPS = 50  # cost: megapixel-steps / 50, so a 1 MP task at BFL's default steps costs 1.0


def _invalid(field: str, message: str, kind: str = "value_error") -> ApiError:
    return validation_failed([InvalidField(type=kind, field=field, description=message)])


SIDES = ("top", "bottom", "left", "right")


def sides(data: dict[str, Any]) -> dict[str, int]:
    """Expand's pixels per side, from this model's input (``expand_*``; absent is 0)."""
    return {side: int(data.get(f"expand_{side}") or 0) for side in SIDES}


def output_size(image: tuple[int, int], added: dict[str, int]) -> tuple[int, int]:
    """The exact size of the output: the input's, plus Expand's sides."""
    return (image[0] + added["left"] + added["right"], image[1] + added["top"] + added["bottom"])


def _megapixels(size: tuple[int, int]) -> float:
    return round(size[0] * size[1] / 1_000_000, 2)


def inline_bytes(value: str, field: str) -> bytes | None:
    """The bytes of a data: URI input (a BFL base64 image is one by now), None for a URL."""
    if not value.lower().startswith("data:"):
        return None
    try:
        return decode_data_uri(value, field)
    except FetchError as exc:
        raise _invalid(f"input.{field}", exc.errors[0].description) from None


def _header(value: str, field: str, max_pixels: int) -> ImageHeader | None:
    data = inline_bytes(value, field)
    if data is None:
        return None
    try:
        return read_header(data, field, max_pixels)
    except FetchError as exc:
        raise _invalid(f"input.{field}", exc.errors[0].description) from None


def check_pictures(data: dict[str, Any], max_pixels: int) -> dict[str, float] | None:
    """BFL's rules for the pictures of this model's input, as far as their headers tell (nothing is
    decoded): the image within --max-image-pixels, a mask of its size (or an alpha channel in the
    image, for Fill), an output within the limits. 422 naming the field otherwise. The cost and
    sizes of the create's answer (``cost``, ``input_mp``, ``output_mp``); None when the image is a
    URL (the worker checks it)."""
    image = _header(data["image"], "image", max_pixels)
    if image is None:
        return None
    mask = _header(data["mask"], "mask", max_pixels) if data.get("mask") else None
    if mask is not None and mask.size != image.size:
        raise _invalid("input.mask", f"mask is {mask.width}x{mask.height} and the image {image.width}x{image.height}: "
                                     "the mask must have the image's size")
    added = sides(data)
    expands = any(added.values())
    if not data.get("mask") and not data.get("mask_prompt") and not expands and not image.has_alpha:
        raise _invalid("input.mask", "mask is required when the image has no alpha channel (its transparent "
                                     "pixels are the ones repainted)", "missing")
    out = output_size(image.size, added)
    if out[0] * out[1] > max_pixels:
        field = f"input.expand_{next(side for side in SIDES if added[side])}" if expands else "input.image"
        raise _invalid(field, f"the output would be {out[0]}x{out[1]}, more than the {max_pixels // 1_000_000} "
                              "megapixel limit; send a smaller image or add fewer pixels")
    try:
        generated = engine_size(out[0], out[1], "match_input")
    except ValueError as exc:
        raise _invalid("input.image", str(exc)) from None
    steps = int(data.get("num_inference_steps", 50))
    cost = generated[0] * generated[1] / 1_000_000 * steps / COST_STEPS
    return {"cost": round(cost, 2), "input_mp": _megapixels(image.size), "output_mp": _megapixels(out)}


class BFLWorkerSide:
    """What a worker does with a BFL prediction (see server.adapters): it reads the image (and
    mask) once, checks what their headers tell (a URL's picture is seen here first), hands the
    bytes to the engine, and scales the outputs to BFL's exact size."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def prepare(self, record: PredictionRecord, sent: dict[str, Any], read: FileReader, log: LogFn) -> EngineJob:
        image = read(sent["image"], "image")
        header = read_header(image, "image", self.max_pixels)
        files = {sent["image"].strip(): image}
        if sent.get("mask"):
            mask = read(sent["mask"], "mask")
            stencil = read_header(mask, "mask", self.max_pixels)
            if stencil.size != header.size:
                raise InvalidInput.one("mask", "size", f"mask is {stencil.width}x{stencil.height} and the image "
                                                       f"{header.width}x{header.height}: the mask must have the "
                                                       "image's size")
            files[sent["mask"].strip()] = mask
        size = output_size(header.size, sides(sent))
        log(f"BFL {(record.api_data or {}).get('endpoint', 'task')}: the output is made {size[0]}x{size[1]}")
        output_format, quality = sent.get("output_format", "jpg"), int(sent.get("output_quality", 80))
        return EngineJob(input=sent, files=files,
                         finish=lambda outputs: fit_outputs(outputs, size, output_format, quality))
