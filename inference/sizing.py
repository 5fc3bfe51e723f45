"""Output geometry: the hosted model's megapixel rules. Pure functions of sizes."""

from __future__ import annotations

import math
from typing import Literal, get_args

Megapixels = Literal["1", "0.25", "match_input"]  # the megapixels input's choices
MEGAPIXELS: tuple[str, ...] = get_args(Megapixels)
TARGET_PIXELS = {"1": 1024 * 1024, "0.25": 512 * 512}
MATCH_INPUT_MAX_SIDE = 1440
MULTIPLE = 32
OVER_BUDGET = 1.25  # a generated size may exceed its pixel budget by this much (the 32 px minimum side)


def floor_to(value: int, multiple: int = MULTIPLE) -> int:
    return max(multiple, (int(value) // multiple) * multiple)


def output_size(width: int, height: int, megapixels: str) -> tuple[int, int]:
    """The (width, height) the hosted flux-fill-dev generates for an input of this stored size.

    "1" and "0.25" scale the image to about that many megapixels (small images are upscaled, with no
    side cap), truncate to integers, then floor each side to a multiple of 32. "match_input" keeps
    the size unless a side exceeds 1440, in which case it scales by min(1440/w, 1440/h); then it
    floors to 32 as well.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if megapixels in TARGET_PIXELS:
        scale = math.sqrt(TARGET_PIXELS[megapixels] / (width * height))
        w, h = int(width * scale), int(height * scale)
    elif megapixels == "match_input":
        w, h = width, height
        if max(w, h) > MATCH_INPUT_MAX_SIDE:
            scale = min(MATCH_INPUT_MAX_SIDE / w, MATCH_INPUT_MAX_SIDE / h)
            w, h = int(w * scale), int(h * scale)
    else:
        raise ValueError(f"megapixels must be one of {', '.join(MEGAPIXELS)}, got {megapixels!r}")
    size = floor_to(w), floor_to(h)
    budget = TARGET_PIXELS.get(megapixels, MATCH_INPUT_MAX_SIDE**2)
    if size[0] * size[1] > budget * OVER_BUDGET:
        # Only a side raised to the 32 px minimum can do this: a 1x100000 strip would be generated at
        # 32x316224, ten times the budget.
        raise ValueError(f"a {width}x{height} image is too narrow to generate at {megapixels} megapixels: it would "
                         f"be {size[0]}x{size[1]}, more than {OVER_BUDGET:g} times the budget; crop it to a "
                         f"less extreme aspect ratio")
    return size
