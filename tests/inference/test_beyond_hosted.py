"""The options beyond the hosted model, shown on the tiny model end to end (issue 4): what each
keeps bit for bit, what it changes, the sizes it generates at, and the errors for bad values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.canvas import outpaint_plan
from inference.errors import InvalidInput
from inference.inputs import parse_input
from inference.sizing import output_size
from tests.helpers import box_mask, fast_input, noise_image

OVERLAP = 8  # the seam band build_outpaint_canvas repaints inside the image's new-facing edges
CROP_SEAM_BLUR = 8  # the feathering crop_to_mask uses when mask_blur is 0


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.data)).convert("RGB"))


def run(engine, img, mask=None, **kw):
    return engine.predict(parse_input(fast_input(img, mask, seed=7, **kw)))


def outside(size: tuple[int, int], box: tuple[int, int, int, int], reach: int) -> np.ndarray:
    """True on the pixels farther than ``reach`` (chessboard distance) from the box (x1, y1
    exclusive): the box grown by reach on every side, inverted."""
    w, h = size
    x0, y0, x1, y1 = box
    far = np.ones((h, w), dtype=bool)
    far[max(y0 - reach, 0) : y1 + reach, max(x0 - reach, 0) : x1 + reach] = False
    return far


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


def record_sizes(engine, monkeypatch) -> list[tuple[int, int]]:
    """Wrap the engine's denoise so each call records the size of the picture it generates at."""
    sizes: list[tuple[int, int]] = []
    original = engine.denoise

    def denoise(inp, image, mask, seeds, embeds, progress):
        sizes.append(image.size)
        return original(inp, image, mask, seeds, embeds, progress)

    monkeypatch.setattr(engine, "denoise", denoise)
    return sizes


# -- preserve_unmasked, mask_grow, mask_blur ----------------------------------------------------

PRESERVE_IMAGE = (96, 64)  # multiples of 32: match_input generates at this very size
PRESERVE_BOX = (32, 16, 64, 40)


@pytest.mark.parametrize("grow, blur", [(0, 0), (4, 0), (0, 6), (5, 3)])
def test_preserve_unmasked_keeps_every_pixel_beyond_grow_plus_blur(engine, grow, blur):
    img = noise_image(*PRESERVE_IMAGE, seed=11)
    mask = box_mask(*PRESERVE_IMAGE, PRESERVE_BOX)
    out = run(engine, img, mask, preserve_unmasked=True, mask_grow=grow, mask_blur=blur)[0]
    assert (out.width, out.height) == PRESERVE_IMAGE
    result, original = pixels(out), np.asarray(img)
    far = outside(PRESERVE_IMAGE, PRESERVE_BOX, grow + blur)
    assert np.array_equal(result[far], original[far])
    inside = ~outside(PRESERVE_IMAGE, PRESERVE_BOX, 0)
    assert changed(result, original)[inside].mean() > 0.9  # the masked area was repainted


def test_preserve_unmasked_reaches_exactly_grow_plus_blur(engine):
    """The blend is nonzero up to grow + blur: pixels just inside that reach may change, and do."""
    img = noise_image(*PRESERVE_IMAGE, seed=11)
    mask = box_mask(*PRESERVE_IMAGE, PRESERVE_BOX)
    grow, blur = 4, 0
    result = pixels(run(engine, img, mask, preserve_unmasked=True, mask_grow=grow, mask_blur=blur)[0])
    ring = outside(PRESERVE_IMAGE, PRESERVE_BOX, 0) & ~outside(PRESERVE_IMAGE, PRESERVE_BOX, grow + blur)
    assert changed(result, np.asarray(img))[ring].mean() > 0.9


def test_without_preserve_unmasked_pixels_outside_the_mask_change(engine):
    """The hosted behaviour: the whole picture goes through the VAE, so the unmasked area drifts.
    This is what preserve_unmasked exists to stop."""
    img = noise_image(*PRESERVE_IMAGE, seed=11)
    mask = box_mask(*PRESERVE_IMAGE, PRESERVE_BOX)
    result = pixels(run(engine, img, mask)[0])
    far = outside(PRESERVE_IMAGE, PRESERVE_BOX, 16)
    assert changed(result, np.asarray(img))[far].mean() > 0.5


# -- crop_to_mask -------------------------------------------------------------------------------

BIG = (4000, 3000)


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """A 4000x3000 picture with texture everywhere (so any change shows), saved as a file the
    engine (allow_paths) reads directly: a data URI of it would be tens of MB."""
    w, h = BIG
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    arr = np.stack([(x * 7 + y) % 256, (x + y * 5) % 256, (x * y) % 251], axis=-1).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    path = tmp_path_factory.mktemp("big") / "big.png"
    img.save(path)
    return img, path


def run_big(engine, big_image, tmp_path, boxes, **kw):
    img, path = big_image
    mask = Image.new("L", BIG, 0)
    for box in boxes:
        mask.paste(255, box)
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    inp = fast_input(img.resize((32, 32)), None, seed=7, crop_to_mask=True, num_inference_steps=1, **kw)
    inp.update(image=str(path), mask=str(mask_path))
    return engine.predict(parse_input(inp))


@pytest.mark.parametrize("megapixels, budget", [("1", 1024 * 1024), ("0.25", 512 * 512)])
def test_crop_to_mask_keeps_the_size_and_generates_within_the_budget(engine, big_image, tmp_path, monkeypatch,
                                                                     megapixels, budget):
    sizes = record_sizes(engine, monkeypatch)
    box = (2000, 1200, 2200, 1350)
    out = run_big(engine, big_image, tmp_path, [box], megapixels=megapixels)[0]
    assert (out.width, out.height) == BIG
    assert len(sizes) == 1
    w, h = sizes[0]
    assert w * h <= budget and w % 32 == 0 and h % 32 == 0
    result, original = pixels(out), np.asarray(big_image[0])
    far = outside(BIG, box, CROP_SEAM_BLUR)
    assert np.array_equal(result[far], original[far])
    x0, y0, x1, y1 = box
    assert changed(result[y0:y1, x0:x1], original[y0:y1, x0:x1]).mean() > 0.9


def test_crop_to_mask_generates_each_separate_region(engine, big_image, tmp_path, monkeypatch):
    sizes = record_sizes(engine, monkeypatch)
    boxes = [(300, 200, 420, 300), (3500, 2600, 3600, 2700)]
    grow, blur = 3, 5
    out = run_big(engine, big_image, tmp_path, boxes, megapixels="0.25", mask_grow=grow, mask_blur=blur)[0]
    assert (out.width, out.height) == BIG
    assert len(sizes) == 2 and all(w * h <= 512 * 512 for w, h in sizes)
    result, original = pixels(out), np.asarray(big_image[0])
    far = outside(BIG, boxes[0], grow + blur) & outside(BIG, boxes[1], grow + blur)
    assert np.array_equal(result[far], original[far])
    for x0, y0, x1, y1 in boxes:
        assert changed(result[y0:y1, x0:x1], original[y0:y1, x0:x1]).mean() > 0.9


def test_crop_to_mask_with_an_empty_mask_returns_the_input(engine, monkeypatch):
    sizes = record_sizes(engine, monkeypatch)
    img = noise_image(200, 150, seed=5)
    lines: list[str] = []
    out = engine.predict(parse_input(fast_input(img, Image.new("L", img.size, 0), crop_to_mask=True)),
                         log=lines.append)[0]
    assert sizes == []
    assert np.array_equal(pixels(out), np.asarray(img))
    assert "The mask is empty: nothing to repaint" in lines


# -- outpaint -----------------------------------------------------------------------------------

# (image size, preset, output size at match_input): the canvas of each preset, floored to 32.
OUTPAINT_SIZES = [
    ((64, 64), "None", (64, 64)),
    ((64, 48), "Zoom out 2x", (128, 96)),
    ((64, 64), "Zoom out 1.5x", (96, 96)),
    ((64, 48), "Zoom out 1.5x", (96, 64)),  # canvas 96x72, floored to 32
    ((96, 64), "Make square", (96, 96)),
    ((64, 96), "Make square", (96, 96)),
    ((64, 64), "Left outpaint", (96, 64)),
    ((64, 64), "Right outpaint", (96, 64)),
    ((64, 64), "Top outpaint", (64, 96)),
    ((64, 64), "Bottom outpaint", (64, 96)),
]


@pytest.mark.parametrize("size, preset, expected", OUTPAINT_SIZES)
def test_outpaint_gives_the_documented_canvas(engine, monkeypatch, size, preset, expected):
    sizes = record_sizes(engine, monkeypatch)
    mask = box_mask(*size, (8, 8, 24, 24)) if preset == "None" else None  # no new area: a mask is needed
    out = run(engine, noise_image(*size, seed=2), mask, outpaint=preset, num_inference_steps=1)[0]
    assert (out.width, out.height) == expected
    plan = outpaint_plan(*size, preset)
    assert expected == output_size(plan.canvas_width, plan.canvas_height, "match_input")
    assert sizes == [expected]


# Canvases that are multiples of 32, so match_input generates at the canvas's own size.
@pytest.mark.parametrize("size, preset", [
    ((64, 48), "Zoom out 2x"),
    ((64, 64), "Zoom out 1.5x"),
    ((96, 64), "Make square"),
    ((64, 96), "Make square"),
    ((64, 64), "Left outpaint"),
    ((64, 64), "Right outpaint"),
    ((64, 64), "Top outpaint"),
    ((64, 64), "Bottom outpaint"),
])
def test_outpaint_with_preserve_unmasked_keeps_the_original_in_place(engine, size, preset):
    img = noise_image(*size, seed=4)
    out = run(engine, img, outpaint=preset, preserve_unmasked=True, num_inference_steps=1)[0]
    plan = outpaint_plan(*size, preset)
    assert (out.width, out.height) == (plan.canvas_width, plan.canvas_height)
    x0, y0, x1, y1 = plan.image_box
    result = pixels(out)
    # The original, less the seam band along each edge that faces new area.
    kx0, ky0 = x0 + (OVERLAP if x0 > 0 else 0), y0 + (OVERLAP if y0 > 0 else 0)
    kx1 = x1 - (OVERLAP if x1 < plan.canvas_width else 0)
    ky1 = y1 - (OVERLAP if y1 < plan.canvas_height else 0)
    kept = np.asarray(img)[ky0 - y0 : ky1 - y0, kx0 - x0 : kx1 - x0]
    assert np.array_equal(result[ky0:ky1, kx0:kx1], kept)
    # The new area was generated: it is not the edge pixels the canvas was padded with.
    new = np.ones(result.shape[:2], dtype=bool)
    new[y0:y1, x0:x1] = False
    padded = np.pad(np.asarray(img), ((y0, plan.canvas_height - y1), (x0, plan.canvas_width - x1), (0, 0)),
                    mode="edge")
    assert changed(result, padded)[new].mean() > 0.9


def test_outpaint_with_a_mask_repaints_the_mask_too(engine):
    img = noise_image(64, 64, seed=4)
    box = (24, 24, 40, 40)
    out = run(engine, img, box_mask(64, 64, box), outpaint="Right outpaint", preserve_unmasked=True)[0]
    result, original = pixels(out), np.asarray(img)
    x0, y0, x1, y1 = box
    assert changed(result[y0:y1, x0:x1], original[y0:y1, x0:x1]).mean() > 0.9
    keep = outside((64, 64), box, 0)
    keep[:, 64 - OVERLAP :] = False
    assert np.array_equal(result[:, :64][keep], original[keep])


# -- bad values and combinations ----------------------------------------------------------------


@pytest.mark.parametrize("extra, field, words", [
    ({"crop_to_mask": True, "outpaint": "Zoom out 2x"}, "input", "crop_to_mask cannot be combined with outpaint"),
    ({"mask_grow": -1}, "mask_grow", "greater than or equal to 0"),
    ({"mask_grow": 300}, "mask_grow", "less than or equal to 256"),
    ({"mask_blur": 257}, "mask_blur", "less than or equal to 256"),
    ({"outpaint": "Zoom out 3x"}, "outpaint", "Zoom out 2x"),
    ({"crop_margin": -5}, "crop_margin", "greater than or equal to 0"),
    ({"preserve_unmasked": "sometimes"}, "preserve_unmasked", ""),
])
def test_bad_values_name_their_field(extra, field, words):
    data = {"prompt": "p", "image": "data:image/png;base64,AA==", **extra}
    with pytest.raises(InvalidInput) as caught:
        parse_input(data)
    errors = caught.value.errors
    assert [e.field for e in errors] == [field]
    assert words in errors[0].description
    if field == "input":  # a rule between two inputs: the sentence names both
        assert "crop_to_mask" in str(caught.value) and "outpaint" in str(caught.value)
    else:
        assert field in str(caught.value)
