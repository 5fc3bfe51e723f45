"""Outpaint geometry: where the image sits on a larger canvas, and the canvas and mask to fill it.

The presets are those of Replicate's FLUX.1 Fill [pro]; explicit per-side pixels (``expand_*``)
are those of FLUX.1 Expand [pro]. Sizes are in pixels of the input image; the engine then sizes
the canvas by the megapixel rules like any other picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .inputs import MAX_EXPAND, OUTPAINT_PRESETS


@dataclass(frozen=True)
class OutpaintPlan:
    """A canvas of ``canvas_width`` x ``canvas_height`` px with the original image at ``image_box``
    = (x0, y0, x1, y1), x1 and y1 exclusive (PIL's crop box), so x1 - x0 is the image's width."""

    canvas_width: int
    canvas_height: int
    image_box: tuple[int, int, int, int]

    @property
    def image_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.image_box
        return x1 - x0, y1 - y0


def _extended(side: int) -> int:
    """A side made 1.5 times longer, rounded half up: side + ceil(side / 2)."""
    return side + (side + 1) // 2


def outpaint_plan(width: int, height: int, preset: str) -> OutpaintPlan:
    """Where an image of ``width`` x ``height`` px goes on the canvas of an outpaint ``preset``.

    - "None": the canvas is the image.
    - "Zoom out 1.5x" / "Zoom out 2x": each side 1.5x / 2x longer, the image centred.
    - "Make square": a square of side max(width, height), the image centred.
    - "Left/Right/Top/Bottom outpaint": that side extended by half the image's size in that
      direction (as Fill [pro] does), the image flush against the opposite edge.

    1.5x sides are rounded half up (side + ceil(side / 2)); when the new area cannot be split evenly
    for centring, the extra pixel goes right / below. Raises ValueError for an unknown preset or a
    size that is not positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = width, height
    if preset == "None":
        cw, ch = w, h
    elif preset == "Zoom out 1.5x":
        cw, ch = _extended(w), _extended(h)
    elif preset == "Zoom out 2x":
        cw, ch = 2 * w, 2 * h
    elif preset == "Make square":
        cw = ch = max(w, h)
    elif preset == "Left outpaint":
        cw = _extended(w)
        return OutpaintPlan(cw, h, (cw - w, 0, cw, h))
    elif preset == "Right outpaint":
        return OutpaintPlan(_extended(w), h, (0, 0, w, h))
    elif preset == "Top outpaint":
        ch = _extended(h)
        return OutpaintPlan(w, ch, (0, ch - h, w, ch))
    elif preset == "Bottom outpaint":
        return OutpaintPlan(w, _extended(h), (0, 0, w, h))
    else:
        raise ValueError(f"outpaint must be one of {', '.join(OUTPAINT_PRESETS)}, got {preset!r}")
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    return OutpaintPlan(cw, ch, (x0, y0, x0 + w, y0 + h))


def expand_plan(width: int, height: int, top: int = 0, bottom: int = 0, left: int = 0,
                right: int = 0) -> OutpaintPlan:
    """Where an image of ``width`` x ``height`` px goes when ``top``, ``bottom``, ``left`` and
    ``right`` pixels are added on those sides: a canvas of (left + width + right) x (top + height +
    bottom) px with the image at (left, top). Each side takes 0 to ``MAX_EXPAND`` px. Raises
    ValueError for a size that is not positive or a side out of that range."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    for name, pixels in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        if not 0 <= pixels <= MAX_EXPAND:
            raise ValueError(f"{name} must be 0 to {MAX_EXPAND} px, got {pixels}")
    return OutpaintPlan(left + width + right, top + height + bottom, (left, top, left + width, top + height))


def build_outpaint_canvas(
    image: Image.Image, plan: OutpaintPlan, overlap: int = 8
) -> tuple[Image.Image, Image.Image]:
    """The RGB canvas with ``image`` at ``plan.image_box``, and its "L" mask (255 = repaint).

    The mask is 255 on the new area and on a band ``overlap`` px wide (input pixels) inside each
    image edge that faces new area, so the seam is repainted; 0 on the rest of the image. Edges
    flush with the canvas border keep their pixels. An image no wider or taller than the bands is
    repainted whole. Raises ValueError if the image's size is not the plan's or overlap < 0.
    """
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if image.size != plan.image_size:
        raise ValueError(f"image is {_wxh(image.size)}, the plan expects {_wxh(plan.image_size)}")
    x0, y0, x1, y1 = plan.image_box
    cw, ch = plan.canvas_width, plan.canvas_height

    # The new area is filled by repeating the image's edge pixels outward. The pipeline neutralises
    # fully masked pixels itself (mid-grey in its conditioning), so a grey fill would add nothing;
    # where the mask is soft (its Lanczos-resized edge), edge colours blend in without the grey halo
    # a flat fill leaves along the seam.
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((y0, ch - y1), (x0, cw - x1), (0, 0)), mode="edge")

    mask = np.full((ch, cw), 255, dtype=np.uint8)
    keep_x0 = x0 + (overlap if x0 > 0 else 0)
    keep_y0 = y0 + (overlap if y0 > 0 else 0)
    keep_x1 = x1 - (overlap if x1 < cw else 0)
    keep_y1 = y1 - (overlap if y1 < ch else 0)
    if keep_x0 < keep_x1 and keep_y0 < keep_y1:
        mask[keep_y0:keep_y1, keep_x0:keep_x1] = 0
    return Image.fromarray(canvas, "RGB"), Image.fromarray(mask, "L")


def paste_mask_on_canvas(mask: Image.Image, plan: OutpaintPlan) -> Image.Image:
    """The user's image-sized "L" ``mask`` placed at ``plan.image_box`` on a canvas-sized "L" mask
    that is 0 (keep) elsewhere; combine it with the outpaint mask by ``ImageChops.lighter``.
    Raises ValueError if the mask's size is not the plan's image size."""
    if mask.size != plan.image_size:
        raise ValueError(f"mask is {_wxh(mask.size)}, the plan expects {_wxh(plan.image_size)}")
    canvas = Image.new("L", (plan.canvas_width, plan.canvas_height), 0)
    canvas.paste(mask.convert("L"), plan.image_box[:2])
    return canvas


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
