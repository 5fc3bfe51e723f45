"""Growing and feathering masks, pasting the original back, and the regions crop_to_mask generates."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from inference.compositing import composite, feather, grow_mask, mask_regions, region_size_for_budget

# -- helpers ------------------------------------------------------------------------------------


def _mask(size: tuple[int, int], *boxes: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    """An "L" mask with the given inclusive rectangles set to value."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle(box, fill=value)
    return mask


def _chessboard_distance(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    rows, cols = np.indices(shape)
    return np.maximum(abs(rows - y), abs(cols - x))


def _random_rgb(size: tuple[int, int], seed: int, low: int = 0, high: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, high, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _blob_mask(size: tuple[int, int], seed: int) -> Image.Image:
    """A soft, irregular mask: two ellipses, one of them grey, and a few grey specks."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    w, h = size
    draw.ellipse((w * 0.2, h * 0.25, w * 0.5, h * 0.7), fill=255)
    draw.ellipse((w * 0.6, h * 0.5, w * 0.8, h * 0.8), fill=140)
    for x, y in rng.integers(0, min(size), (4, 2)):
        draw.point((int(x), int(y)), fill=int(rng.integers(1, 255)))
    return mask


# -- grow_mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("px", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("at", [(30, 40), (0, 0), (59, 2)])
def test_grow_covers_exactly_the_chessboard_ball(px, at):
    y, x = at
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[y, x] = 200
    grown = np.asarray(grow_mask(Image.fromarray(mask, "L"), px))
    inside = _chessboard_distance(mask.shape, y, x) <= px
    assert (grown[inside] == 200).all()  # soft value kept, not binarised
    assert (grown[~inside] == 0).all()


def test_grow_by_zero_returns_the_mask_unchanged():
    mask = _blob_mask((64, 48), seed=1)
    assert np.array_equal(np.asarray(grow_mask(mask, 0)), np.asarray(mask))


def test_grow_takes_the_largest_value_nearby():
    mask = _mask((40, 20), (5, 5, 5, 5), value=100)
    mask.putpixel((8, 5), 250)
    grown = np.asarray(grow_mask(mask, 2))
    assert grown[5, 6] == 250  # within 2 of both: the larger wins
    assert grown[5, 3] == 100  # within 2 of the grey pixel only


@pytest.mark.parametrize("fn", [grow_mask, feather])
def test_negative_radius_is_rejected(fn):
    with pytest.raises(ValueError):
        fn(Image.new("L", (4, 4)), -1)


# -- feather ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grow, blur", [(0, 1), (0, 7), (3, 4), (10, 10), (5, 31), (16, 0)])
@pytest.mark.parametrize("at", [(50, 60), (0, 3), (99, 119)])
def test_a_grown_and_feathered_pixel_reaches_exactly_grow_plus_blur(grow, blur, at):
    y, x = at
    mask = np.zeros((100, 120), dtype=np.uint8)
    mask[y, x] = 255
    blend = np.asarray(feather(grow_mask(Image.fromarray(mask, "L"), grow), blur))
    distance = _chessboard_distance(mask.shape, y, x)
    assert (blend[distance > grow + blur] == 0).all()
    assert (blend[distance <= grow + blur] > 0).all()
    assert (blend[distance <= grow] == 255).all()


@pytest.mark.parametrize("blur", [2, 9, 24])
def test_feather_falls_steadily_outward_from_a_straight_edge(blur):
    mask = _mask((100, 40), (0, 0, 29, 39))  # columns 0..29 masked
    profile = np.asarray(feather(mask, blur))[20, :].astype(int)
    assert (profile[:30] == 255).all()
    ramp = profile[29 : 30 + blur + 1]
    assert (np.diff(ramp) <= 0).all() and (np.diff(ramp) < 0).sum() >= blur // 2
    assert ramp[-2] > 0 and ramp[-1] == 0  # last nonzero at distance blur
    assert (profile[30 + blur :] == 0).all()


def test_feather_by_zero_keeps_the_edge_hard():
    mask = _blob_mask((64, 48), seed=2)
    assert np.array_equal(np.asarray(feather(mask, 0)), np.asarray(mask))


def test_feather_never_raises_a_soft_mask_above_its_values():
    mask = _mask((50, 50), (20, 20, 29, 29), value=90)
    blend = np.asarray(feather(mask, 6))
    assert blend.max() == 90
    assert (blend[20:30, 20:30] == 90).all()


def test_feather_of_an_empty_mask_is_empty():
    assert not np.asarray(feather(Image.new("L", (30, 20)), 5)).any()


# -- composite ----------------------------------------------------------------------------------

SIZE = (320, 240)


def _blend(mask: Image.Image, grow: int, blur: int) -> np.ndarray:
    return np.asarray(feather(grow_mask(mask, grow), blur))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grow, blur", [(0, 0), (0, 8), (6, 0), (5, 12), (20, 30)])
@pytest.mark.parametrize("match_colors", [False, True])
def test_composite_keeps_the_original_exactly_where_blend_is_zero(seed, grow, blur, match_colors):
    original, generated = _random_rgb(SIZE, seed), _random_rgb(SIZE, seed + 100)
    mask = _blob_mask(SIZE, seed)
    result = np.asarray(composite(original, generated, mask, grow, blur, match_colors=match_colors))
    blend = _blend(mask, grow, blur)
    assert result.shape == (SIZE[1], SIZE[0], 3)
    keep = blend == 0
    assert keep.sum() > 1000
    assert np.array_equal(result[keep], np.asarray(original)[keep])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("grow, blur", [(0, 0), (4, 10), (20, 30)])
def test_composite_is_the_generated_image_where_blend_is_full(seed, grow, blur):
    original, generated = _random_rgb(SIZE, seed), _random_rgb(SIZE, seed + 100)
    mask = _blob_mask(SIZE, seed)
    result = np.asarray(composite(original, generated, mask, grow, blur, match_colors=False))
    full = _blend(mask, grow, blur) == 255
    assert full.any()
    assert np.array_equal(result[full], np.asarray(generated)[full])


@pytest.mark.parametrize("grow, blur", [(0, 6), (5, 12)])
def test_composite_blends_the_band_by_the_rounded_formula(grow, blur):
    original, generated = _random_rgb(SIZE, 4), _random_rgb(SIZE, 5)
    mask = _blob_mask(SIZE, 4)
    result = np.asarray(composite(original, generated, mask, grow, blur, match_colors=False)).astype(int)
    blend = _blend(mask, grow, blur).astype(int)[..., None]
    expected = np.floor((np.asarray(generated) * blend + np.asarray(original) * (255 - blend)) / 255 + 0.5)
    assert np.array_equal(result, expected.astype(int))


def test_match_colors_removes_a_uniform_drift():
    # The model kept everything outside the mask but shifted its colours by (+12, -7, +3).
    original = _random_rgb(SIZE, 6, low=20, high=236)
    drift = np.array([12, -7, 3])
    drifted = np.asarray(original).astype(int) + drift
    inside = np.asarray(_mask(SIZE, (50, 40, 99, 79))) > 0
    drifted[inside] = np.asarray(_random_rgb(SIZE, 7, low=20, high=236))[inside] + drift
    generated = Image.fromarray(drifted.astype(np.uint8), "RGB")
    mask = _mask(SIZE, (50, 40, 99, 79))

    result = np.asarray(composite(original, generated, mask, 4, 10, match_colors=True)).astype(int)
    grown = np.asarray(grow_mask(mask, 4)) > 0
    assert np.array_equal(result[~grown], np.asarray(original)[~grown])  # no seam: band matches exactly
    assert np.array_equal(result[inside], drifted[inside] - drift)  # the repainted area is corrected too

    uncorrected = np.asarray(composite(original, generated, mask, 4, 10, match_colors=False)).astype(int)
    assert not np.array_equal(uncorrected[~grown], np.asarray(original)[~grown])


def test_match_colors_without_drift_leaves_the_generated_pixels_alone():
    original = _random_rgb(SIZE, 8)
    mask = _mask(SIZE, (40, 30, 89, 69))
    generated = np.asarray(original).copy()
    generated[30:70, 40:90] = np.asarray(_random_rgb((50, 40), 9))
    result = np.asarray(composite(original, Image.fromarray(generated, "RGB"), mask, 3, 8, match_colors=True))
    assert np.array_equal(result[30:70, 40:90], generated[30:70, 40:90])


def test_composite_with_an_empty_mask_is_the_original():
    original, generated = _random_rgb(SIZE, 10), _random_rgb(SIZE, 11)
    result = composite(original, generated, Image.new("L", SIZE), 10, 10)
    assert np.array_equal(np.asarray(result), np.asarray(original))


def test_composite_with_the_whole_image_masked_is_the_generated_image():
    original, generated = _random_rgb(SIZE, 12), _random_rgb(SIZE, 13)
    result = composite(original, generated, Image.new("L", SIZE, 255), 4, 4)
    assert np.array_equal(np.asarray(result), np.asarray(generated))


@pytest.mark.parametrize(
    "sizes, grow, blur",
    [
        ((SIZE, SIZE, (SIZE[0], SIZE[1] + 1)), 0, 0),
        ((SIZE, (SIZE[0] - 1, SIZE[1]), SIZE), 0, 0),
        ((SIZE, SIZE, SIZE), -1, 0),
        ((SIZE, SIZE, SIZE), 0, -1),
    ],
)
def test_composite_rejects(sizes, grow, blur):
    original, generated = _random_rgb(sizes[0], 0), _random_rgb(sizes[1], 1)
    with pytest.raises(ValueError):
        composite(original, generated, Image.new("L", sizes[2]), grow, blur)


# -- mask_regions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, blobs, margin, expected",
    [
        # two separate blobs: two boxes, exact, x1/y1 exclusive
        ((200, 100), [(10, 10, 29, 39), (150, 50, 169, 89)], 0, [(10, 10, 30, 40), (150, 50, 170, 90)]),
        ((200, 100), [(10, 10, 29, 39), (150, 50, 169, 89)], 5, [(5, 5, 35, 45), (145, 45, 175, 95)]),
        # margins are clipped to the image
        ((200, 100), [(10, 10, 29, 39), (150, 50, 169, 89)], 30, [(0, 0, 60, 70), (120, 20, 200, 100)]),
        # close blobs whose margins overlap: one merged box
        ((200, 100), [(10, 10, 29, 39), (50, 20, 69, 49)], 15, [(0, 0, 85, 65)]),
        # boxes that merely touch after the margin stay apart
        ((200, 100), [(10, 10, 19, 19), (30, 10, 39, 19)], 5, [(5, 5, 25, 25), (25, 5, 45, 25)]),
        # diagonal neighbours are one group
        ((50, 50), [(10, 10, 14, 14), (15, 15, 19, 19)], 0, [(10, 10, 20, 20)]),
        # empty mask
        ((200, 100), [], 50, []),
    ],
)
def test_mask_regions(size, blobs, margin, expected):
    assert mask_regions(_mask(size, *blobs), margin) == expected


def test_mask_regions_merges_until_no_boxes_overlap():
    # A (an L) and B overlap as boxes; their union then overlaps C, which touches neither alone.
    mask = _mask((200, 200), (0, 0, 49, 4), (0, 0, 4, 49), (40, 40, 99, 59), (60, 10, 89, 29))
    assert mask_regions(mask, 0) == [(0, 0, 100, 60)]


def test_mask_regions_ignores_pixels_at_or_below_the_threshold():
    mask = _mask((100, 100), (10, 10, 19, 19), value=8)
    mask.paste(200, (60, 60, 70, 70))
    assert mask_regions(mask, 0) == [(60, 60, 70, 70)]
    assert mask_regions(mask, 0, threshold=0) == [(10, 10, 20, 20), (60, 60, 70, 70)]


def test_mask_regions_on_a_large_image_keeps_exact_bounds():
    # 4000 x 3000: found on a coarse grid, bounds still exact to the pixel.
    mask = _mask((4000, 3000), (1001, 503, 1377, 777), (3001, 2222, 3002, 2223))
    assert mask_regions(mask, 0) == [(1001, 503, 1378, 778), (3001, 2222, 3003, 2224)]


def _reference_regions(on: np.ndarray, margin: int) -> list[tuple[int, int, int, int]]:
    """Breadth-first 8-connected groups and a naive merge: the definition, slowly."""
    height, width = on.shape
    seen = np.zeros_like(on)
    boxes = []
    for y, x in zip(*np.nonzero(on)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, x0, y0, x1, y1 = deque([(y, x)]), x, y, x, y
        while queue:
            cy, cx = queue.popleft()
            x0, y0, x1, y1 = min(x0, cx), min(y0, cy), max(x1, cx), max(y1, cy)
            for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                    if on[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + 1 + margin, y1 + 1 + margin
        boxes.append((max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)))
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes, key=lambda box: (box[1], box[0]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin", [0, 2, 9])
def test_mask_regions_agrees_with_the_definition_on_random_masks(seed, margin):
    rng = np.random.default_rng(seed)
    values = (rng.random((90, 120)) < 0.02) * rng.integers(0, 256, (90, 120))
    mask = Image.fromarray(values.astype(np.uint8), "L")
    assert mask_regions(mask, margin) == _reference_regions(values > 8, margin)


def test_mask_regions_rejects_a_negative_margin():
    with pytest.raises(ValueError):
        mask_regions(Image.new("L", (10, 10)), -1)


# -- region_size_for_budget ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, megapixels, size",
    [
        ((300, 200), "1", (1248, 832)),  # small regions are brought up to the budget
        ((300, 200), "0.25", (608, 416)),
        ((300, 200), "match_input", (288, 192)),  # the box's own size, floored to 32
        ((20, 20), "match_input", (32, 32)),  # at least 32
        ((1024, 768), "1", (1152, 864)),
        ((4000, 3000), "match_input", (1440, 1056)),  # capped at 1440 a side like the hosted model
        ((4000, 3000), "1", (1152, 864)),
    ],
)
def test_region_size_for_budget(box, megapixels, size):
    assert region_size_for_budget(*box, megapixels) == size
