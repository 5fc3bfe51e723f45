"""Outpaint geometry: each preset's canvas, where the image sits, and the mask around it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.canvas import OutpaintPlan, build_outpaint_canvas, outpaint_plan, paste_mask_on_canvas
from inference.inputs import OUTPAINT_PRESETS

SHAPES = [(1024, 768), (768, 1024), (101, 57), (64, 64), (1, 1)]


@pytest.mark.parametrize(
    "width, height, preset, canvas, box",
    [
        (1024, 768, "None", (1024, 768), (0, 0, 1024, 768)),
        (1024, 768, "Zoom out 1.5x", (1536, 1152), (256, 192, 1280, 960)),
        (1024, 768, "Zoom out 2x", (2048, 1536), (512, 384, 1536, 1152)),
        (1024, 768, "Make square", (1024, 1024), (0, 128, 1024, 896)),
        (768, 1024, "Make square", (1024, 1024), (128, 0, 896, 1024)),
        (1024, 768, "Left outpaint", (1536, 768), (512, 0, 1536, 768)),
        (1024, 768, "Right outpaint", (1536, 768), (0, 0, 1024, 768)),
        (1024, 768, "Top outpaint", (1024, 1152), (0, 384, 1024, 1152)),
        (1024, 768, "Bottom outpaint", (1024, 1152), (0, 0, 1024, 768)),
        # odd sides: 1.5x rounds half up (101 -> 152, 57 -> 86); the odd extra pixel goes right / below
        (101, 57, "Zoom out 1.5x", (152, 86), (25, 14, 126, 71)),
        (101, 57, "Zoom out 2x", (202, 114), (50, 28, 151, 85)),
        (101, 57, "Make square", (101, 101), (0, 22, 101, 79)),
        (101, 57, "Left outpaint", (152, 57), (51, 0, 152, 57)),
        (101, 57, "Right outpaint", (152, 57), (0, 0, 101, 57)),
        (101, 57, "Top outpaint", (101, 86), (0, 29, 101, 86)),
        (101, 57, "Bottom outpaint", (101, 86), (0, 0, 101, 57)),
        (64, 64, "Make square", (64, 64), (0, 0, 64, 64)),
        (1, 1, "Zoom out 1.5x", (2, 2), (0, 0, 1, 1)),
        (1, 1, "Left outpaint", (2, 1), (1, 0, 2, 1)),
    ],
)
def test_outpaint_plan(width, height, preset, canvas, box):
    plan = outpaint_plan(width, height, preset)
    assert (plan.canvas_width, plan.canvas_height) == canvas
    assert plan.image_box == box
    assert plan.image_size == (width, height)


@pytest.mark.parametrize("width, height", SHAPES)
@pytest.mark.parametrize("preset", OUTPAINT_PRESETS)
def test_every_plan_holds_the_image_inside_the_canvas(width, height, preset):
    plan = outpaint_plan(width, height, preset)
    x0, y0, x1, y1 = plan.image_box
    assert 0 <= x0 and x1 <= plan.canvas_width and 0 <= y0 and y1 <= plan.canvas_height
    assert (x1 - x0, y1 - y0) == (width, height)


@pytest.mark.parametrize(
    "width, height, preset",
    [(100, 100, "Zoom out 3x"), (100, 100, "none"), (100, 100, ""), (0, 10, "None"), (10, -1, "Zoom out 2x")],
)
def test_outpaint_plan_rejects(width, height, preset):
    with pytest.raises(ValueError):
        outpaint_plan(width, height, preset)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("width, height", [(1024, 768), (101, 57), (40, 90)])
@pytest.mark.parametrize("preset", OUTPAINT_PRESETS)
@pytest.mark.parametrize("overlap", [0, 8])
def test_canvas_holds_the_image_and_masks_new_area_and_seam(width, height, preset, overlap):
    image = _random_image(width, height)
    plan = outpaint_plan(width, height, preset)
    canvas, mask = build_outpaint_canvas(image, plan, overlap=overlap)
    assert canvas.mode == "RGB" and mask.mode == "L"
    assert canvas.size == mask.size == (plan.canvas_width, plan.canvas_height)

    x0, y0, x1, y1 = plan.image_box
    pixels, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(pixels[y0:y1, x0:x1], np.asarray(image))

    outside = np.ones(m.shape, dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (m[outside] == 255).all()

    # The seam band lies along image edges that face new area, never along the canvas border.
    band = {
        "left": overlap if x0 > 0 else 0,
        "top": overlap if y0 > 0 else 0,
        "right": overlap if x1 < plan.canvas_width else 0,
        "bottom": overlap if y1 < plan.canvas_height else 0,
    }
    inner = m[y0 + band["top"] : y1 - band["bottom"], x0 + band["left"] : x1 - band["right"]]
    assert inner.size > 0 and (inner == 0).all()
    inside = m[y0:y1, x0:x1]
    assert (inside[:, : band["left"]] == 255).all()
    assert (inside[: band["top"], :] == 255).all()
    assert (inside[:, width - band["right"] :] == 255).all()
    assert (inside[height - band["bottom"] :, :] == 255).all()
    assert (inside == 255).sum() == inside.size - inner.size


def test_none_preset_is_the_image_with_nothing_masked():
    image = _random_image(50, 30)
    canvas, mask = build_outpaint_canvas(image, outpaint_plan(50, 30, "None"))
    assert np.array_equal(np.asarray(canvas), np.asarray(image))
    assert not np.asarray(mask).any()


@pytest.mark.parametrize(
    "preset, canvas_edge, image_edge",
    [
        ("Left outpaint", np.s_[:, 0], np.s_[:, 0]),
        ("Right outpaint", np.s_[:, -1], np.s_[:, -1]),
        ("Top outpaint", np.s_[0, :], np.s_[0, :]),
        ("Bottom outpaint", np.s_[-1, :], np.s_[-1, :]),
    ],
)
def test_new_area_repeats_the_image_edge(preset, canvas_edge, image_edge):
    image = _random_image(40, 30, seed=3)
    canvas, _ = build_outpaint_canvas(image, outpaint_plan(40, 30, preset))
    assert np.array_equal(np.asarray(canvas)[canvas_edge], np.asarray(image)[image_edge])


def test_overlap_wider_than_the_image_repaints_it_whole():
    image = _random_image(10, 10)
    _, mask = build_outpaint_canvas(image, outpaint_plan(10, 10, "Zoom out 2x"), overlap=5)
    assert (np.asarray(mask) == 255).all()


@pytest.mark.parametrize(
    "plan, image_size, overlap",
    [
        (OutpaintPlan(20, 10, (0, 0, 10, 10)), (11, 10), 8),
        (OutpaintPlan(20, 10, (0, 0, 10, 10)), (10, 10), -1),
    ],
)
def test_build_outpaint_canvas_rejects(plan, image_size, overlap):
    with pytest.raises(ValueError):
        build_outpaint_canvas(_random_image(*image_size), plan, overlap=overlap)


@pytest.mark.parametrize("preset", OUTPAINT_PRESETS)
def test_paste_mask_on_canvas_places_the_user_mask(preset):
    rng = np.random.default_rng(7)
    user = rng.integers(0, 256, (57, 101), dtype=np.uint8)
    plan = outpaint_plan(101, 57, preset)
    placed = np.asarray(paste_mask_on_canvas(Image.fromarray(user, "L"), plan))
    x0, y0, x1, y1 = plan.image_box
    assert placed.shape == (plan.canvas_height, plan.canvas_width)
    assert np.array_equal(placed[y0:y1, x0:x1], user)
    rest = placed.copy()
    rest[y0:y1, x0:x1] = 0
    assert not rest.any()


def test_paste_mask_on_canvas_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError):
        paste_mask_on_canvas(Image.new("L", (10, 10)), outpaint_plan(12, 10, "Zoom out 2x"))
