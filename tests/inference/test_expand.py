"""expand_top/bottom/left/right: the canvas of explicit per-side pixels (FLUX.1 Expand [pro]'s), as a
table of pure arithmetic, then end to end on the tiny model: the output's size, the original kept in
place, the limits and the combinations refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.canvas import build_outpaint_canvas, expand_plan
from inference.engine import Engine, EngineSettings
from inference.errors import InvalidInput
from inference.inputs import MAX_EXPAND, parse_input
from tests.helpers import box_mask, fast_input, noise_image

OVERLAP = 8  # the seam band build_outpaint_canvas repaints inside the image's new-facing edges


# (image size, (top, bottom, left, right)) -> (canvas size, image box)
PLANS = [
    ((64, 48), (0, 0, 0, 0), (64, 48), (0, 0, 64, 48)),
    ((64, 48), (16, 0, 0, 0), (64, 64), (0, 16, 64, 64)),
    ((64, 48), (0, 16, 0, 0), (64, 64), (0, 0, 64, 48)),
    ((64, 48), (0, 0, 32, 0), (96, 48), (32, 0, 96, 48)),
    ((64, 48), (0, 0, 0, 32), (96, 48), (0, 0, 64, 48)),
    ((64, 48), (1, 2, 3, 4), (71, 51), (3, 1, 67, 49)),
    ((10, 10), (MAX_EXPAND, MAX_EXPAND, MAX_EXPAND, MAX_EXPAND), (10 + 2 * MAX_EXPAND,) * 2,
     (MAX_EXPAND, MAX_EXPAND, MAX_EXPAND + 10, MAX_EXPAND + 10)),
]


@pytest.mark.parametrize("size, sides, canvas, box", PLANS)
def test_the_canvas_adds_each_sides_pixels(size, sides, canvas, box):
    top, bottom, left, right = sides
    plan = expand_plan(*size, top=top, bottom=bottom, left=left, right=right)
    assert (plan.canvas_width, plan.canvas_height) == canvas
    assert plan.image_box == box
    assert plan.image_size == size


@pytest.mark.parametrize("args, words", [
    ((0, 10), "positive"),
    ((10, -1), "positive"),
    ((10, 10, -1), "top must be 0 to"),
    ((10, 10, 0, MAX_EXPAND + 1), "bottom must be 0 to"),
    ((10, 10, 0, 0, -3), "left must be 0 to"),
    ((10, 10, 0, 0, 0, MAX_EXPAND + 1), "right must be 0 to"),
])
def test_bad_sizes_and_sides_are_refused(args, words):
    with pytest.raises(ValueError, match=words):
        expand_plan(*args)


def test_the_mask_covers_the_new_area_and_a_seam_band_on_expanded_sides_only():
    img = noise_image(64, 48, seed=1)
    plan = expand_plan(64, 48, top=16, left=32)
    canvas, mask = build_outpaint_canvas(img, plan)
    m = np.asarray(mask)
    assert canvas.size == mask.size == (96, 64)
    assert (m[:16, :] == 255).all() and (m[:, :32] == 255).all()  # the new area
    assert (m[16 : 16 + OVERLAP, 32:] == 255).all() and (m[16:, 32 : 32 + OVERLAP] == 255).all()  # seams
    assert (m[16 + OVERLAP :, 32 + OVERLAP :] == 0).all()  # the rest of the image, and its flush edges
    assert np.array_equal(np.asarray(canvas)[16:, 32:], np.asarray(img))


# -- end to end on the tiny model ----------------------------------------------------------------


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.data)).convert("RGB"))


def run(engine, img, mask=None, **kw):
    return engine.predict(parse_input(fast_input(img, mask, seed=7, num_inference_steps=1, **kw)))


@pytest.mark.parametrize("size, sides, expected", [
    ((64, 64), dict(expand_top=32), (64, 96)),
    ((64, 64), dict(expand_right=64), (128, 64)),
    ((64, 32), dict(expand_top=16, expand_bottom=16, expand_left=32, expand_right=32), (128, 64)),
    ((64, 64), dict(expand_left=16), (64, 64)),  # an 80 px side is floored to 64 by match_input
])
def test_expand_gives_the_canvas_size(engine, size, sides, expected):
    out = run(engine, noise_image(*size, seed=2), **sides)[0]
    assert (out.width, out.height) == expected


def test_expand_with_preserve_unmasked_keeps_the_original_in_place(engine):
    img = noise_image(64, 64, seed=4)
    out = run(engine, img, expand_top=32, expand_left=32, preserve_unmasked=True)[0]
    result = pixels(out)
    assert result.shape == (96, 96, 3)
    # The original, less the seam bands along its top and left edges.
    assert np.array_equal(result[32 + OVERLAP :, 32 + OVERLAP :], np.asarray(img)[OVERLAP:, OVERLAP:])
    assert not np.array_equal(result[:32, :], np.zeros_like(result[:32, :]))


def test_expand_with_a_mask_repaints_the_mask_too(engine):
    img = noise_image(64, 64, seed=4)
    box = (24, 24, 40, 40)
    out = run(engine, img, box_mask(64, 64, box), expand_bottom=32, preserve_unmasked=True)[0]
    result, original = pixels(out), np.asarray(img)
    x0, y0, x1, y1 = box
    assert result.shape == (96, 64, 3)
    assert (np.abs(result[y0:y1, x0:x1].astype(int) - original[y0:y1, x0:x1]).sum(axis=2) > 0).mean() > 0.9
    assert np.array_equal(result[:8, :8], original[:8, :8])  # far from the mask and the seam: kept


def test_a_canvas_past_the_pixel_limit_is_refused_in_words(tiny_model):
    small = Engine(tiny_model, EngineSettings(allow_paths=True, max_pixels=10_000))
    with pytest.raises(InvalidInput) as caught:
        run(small, noise_image(64, 64, seed=1), expand_right=2048)
    assert caught.value.errors[0].field == "expand_right"
    assert "megapixel limit" in caught.value.errors[0].description


@pytest.mark.parametrize("extra, field, words", [
    ({"expand_top": -1}, "expand_top", "greater than or equal to 0"),
    ({"expand_left": MAX_EXPAND + 1}, "expand_left", f"less than or equal to {MAX_EXPAND}"),
    ({"expand_right": "8"}, "expand_right", "Expected: integer"),
    ({"expand_bottom": 8, "outpaint": "Zoom out 2x"}, "input", "cannot be combined with an outpaint preset"),
    ({"expand_bottom": 8, "crop_to_mask": True}, "input", "crop_to_mask cannot be combined with expand"),
])
def test_bad_values_name_their_field(extra, field, words):
    with pytest.raises(InvalidInput) as caught:
        parse_input({"prompt": "p", "image": "data:image/png;base64,AA==", **extra})
    assert [e.field for e in caught.value.errors] == [field]
    assert words in caught.value.errors[0].description


def test_whole_number_floats_are_integers():
    assert parse_input({"prompt": "p", "image": "x", "expand_top": 16.0}).expand_top == 16
