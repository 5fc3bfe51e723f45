"""Make the README's pictures of the options beyond the hosted model, on the demo model.

    python bench/make_pictures.py [--out docs] [--weights DIR]

The demo model has random weights, so what it paints is random colours. What the pictures show is
WHERE it paints: each row is input | mask | output | changed pixels (white where the output differs
from the input at all), so the effect of preserve_unmasked, crop_to_mask and outpaint is plain to
see. The model runs with the hosted defaults (28 steps) but for the options each picture shows.
Writes docs/option-none.png, option-preserve.png, option-crop.png and option-outpaint.png, each
kept under 150 KB (palette PNG when the noise would make it larger), and the README's example
inputs, docs/house.png and docs/house-mask.png (the door).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference.canvas import outpaint_plan  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.inputs import parse_input  # noqa: E402

PANEL_HEIGHT = 180  # px of each picture panel on the sheet
LABEL_HEIGHT = 34
GAP = 8
MAX_BYTES = 150 * 1024
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


# -- the scene ----------------------------------------------------------------------------------


def scene(width: int, height: int) -> Image.Image:
    """A legible synthetic picture: a sky gradient, a sun, hills, a house with a door and windows."""
    y = np.linspace(0, 1, height)[:, None, None]
    top, horizon = np.array([40, 90, 190]), np.array([190, 220, 250])
    sky = (top + (horizon - top) * y) * np.ones((1, width, 1))
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    u = width / 256  # drawn on a 256-wide design, scaled
    ground = int(height * 0.68)
    draw.ellipse([196 * u, 18 * u, 236 * u, 58 * u], fill=(255, 214, 60))
    draw.ellipse([-60 * u, ground - 30 * u, 150 * u, ground + 80 * u], fill=(90, 160, 70))
    draw.rectangle([0, ground, width, height], fill=(70, 140, 60))
    walls = [70 * u, ground - 48 * u, 150 * u, ground + 6 * u]
    draw.rectangle(walls, fill=(230, 220, 200), outline=(90, 70, 50), width=max(1, int(2 * u)))
    draw.polygon([(62 * u, walls[1]), (110 * u, ground - 84 * u), (158 * u, walls[1])], fill=(180, 50, 40))
    draw.rectangle([102 * u, ground - 24 * u, 118 * u, ground + 6 * u], fill=(110, 70, 40))
    for x in (80, 128):
        draw.rectangle([x * u, ground - 40 * u, (x + 14) * u, ground - 28 * u], fill=(120, 180, 230),
                       outline=(90, 70, 50))
    draw.rectangle([196 * u, ground - 10 * u, 204 * u, ground + 14 * u], fill=(110, 80, 50))
    draw.ellipse([184 * u, ground - 40 * u, 216 * u, ground - 4 * u], fill=(50, 120, 50))
    return img


def rect_mask(size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """A mask with the box given as fractions of the size."""
    w, h = size
    mask = Image.new("L", size, 0)
    mask.paste(255, (int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    return mask


# -- running the model --------------------------------------------------------------------------


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def predict(engine: Engine, img: Image.Image, mask: Image.Image | None, **options) -> Image.Image:
    inp = {"prompt": "a red balloon", "image": data_uri(img), "seed": 1,
           "megapixels": "match_input", "output_format": "png", **options}
    if mask is not None:
        inp["mask"] = data_uri(mask)
    out = engine.predict(parse_input(inp), log=lambda line: None)[0]
    return Image.open(io.BytesIO(out.data)).convert("RGB")


def generated_sizes(engine: Engine) -> list[tuple[int, int]]:
    """Record the size of each picture the model generates at (wraps this engine's denoise)."""
    sizes: list[tuple[int, int]] = []
    original = engine.denoise

    def denoise(inp, image, mask, seeds, embeds, progress):
        sizes.append(image.size)
        return original(inp, image, mask, seeds, embeds, progress)

    engine.denoise = denoise
    return sizes


def changed(before: Image.Image, after: Image.Image) -> tuple[Image.Image, float]:
    """White where any channel differs, and the fraction of pixels that do."""
    diff = (np.asarray(before) != np.asarray(after)).any(axis=-1)
    return Image.fromarray(diff.astype(np.uint8) * 255, "L"), float(diff.mean())


# -- the sheets ---------------------------------------------------------------------------------


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def fit(img: Image.Image, height: int, binary: bool = False) -> Image.Image:
    """The panel at ``height`` px high. A changed-pixels map is shrunk keeping any changed pixel
    visible (the max of each block), so one changed pixel still shows."""
    w = max(1, round(img.width * height / img.height))
    if binary and img.height > height:
        factor = -(-img.height // height)
        img = img.filter(ImageFilter.MaxFilter(factor | 1)).resize((w, height), Image.Resampling.NEAREST)
        return img.convert("RGB")
    resample = Image.Resampling.NEAREST if binary else Image.Resampling.LANCZOS
    return img.convert("RGB").resize((w, height), resample)


def sheet(title: str, rows: list[list[tuple[Image.Image, str]]], scale: float | None = None) -> Image.Image:
    """Rows of labelled panels under a title: each panel PANEL_HEIGHT px high, or, with ``scale``,
    every panel scaled by the same factor so that sizes compare."""

    def height_of(img: Image.Image) -> int:
        return PANEL_HEIGHT if scale is None else round(img.height * scale)

    rows = [[(fit(img, height_of(img), binary=img.mode == "L" and label.startswith("changed")), label)
             for img, label in row] for row in rows]
    heights = [max(p.height for p, _ in row) for row in rows]
    width = max(sum(p.width for p, _ in row) + GAP * (len(row) + 1) for row in rows)
    title_h = 30
    height = title_h + sum(heights) + len(rows) * (LABEL_HEIGHT + GAP) + GAP
    page = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(page)
    draw.text((GAP, 8), title, fill=INK, font=font(16))
    y = title_h
    small = font(12)
    for row, row_height in zip(rows, heights):
        x = GAP
        for panel, label in row:
            page.paste(panel, (x, y))
            draw.rectangle([x - 1, y - 1, x + panel.width, y + panel.height], outline=(160, 160, 160))
            for i, line in enumerate(label.split("\n")):
                draw.text((x, y + row_height + 3 + 14 * i), line, fill=INK, font=small)
            x += panel.width + GAP
        y += row_height + LABEL_HEIGHT + GAP
    return page


def save(page: Image.Image, path: Path) -> int:
    """PNG, as a palette image with fewer colours if the noise makes it too large."""
    for colours in (None, 256, 128, 64, 32):
        img = page if colours is None else page.quantize(colours, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_BYTES:
            break
    path.write_bytes(buf.getvalue())
    return buf.tell()


def outlined(img: Image.Image, box: tuple[int, int, int, int], colour=(255, 0, 255)) -> Image.Image:
    img = img.copy()
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour,
                                  width=max(1, img.width // 200))
    return img


def picture_none(engine: Engine) -> Image.Image:
    img = scene(256, 192)
    mask = rect_mask(img.size, (0.72, 0.04, 0.98, 0.36))  # the sun
    out = predict(engine, img, mask)
    diff, share = changed(img, out)
    return sheet("No options (the hosted behaviour): the whole picture goes through the VAE", [[
        (img, "input 256x192"), (mask, "mask: repaint the sun"), (out, "output"),
        (diff, f"changed pixels: {share:.0%}\n(the whole image drifts)"),
    ]])


def picture_preserve(engine: Engine) -> Image.Image:
    img = scene(256, 192)
    mask = rect_mask(img.size, (0.72, 0.04, 0.98, 0.36))
    rows = []
    for grow, blur in ((0, 0), (8, 8)):
        out = predict(engine, img, mask, preserve_unmasked=True, mask_grow=grow, mask_blur=blur)
        diff, share = changed(img, out)
        rows.append([
            (img, "input 256x192"), (mask, "mask"),
            (out, f"preserve_unmasked\nmask_grow={grow} mask_blur={blur}"),
            (diff, f"changed pixels: {share:.1%}\n(only the mask + {grow + blur} px)"),
        ])
    return sheet("preserve_unmasked: the original pixels outside the (grown, feathered) mask, bit for bit", rows)


def picture_crop(engine: Engine) -> Image.Image:
    img = scene(2048, 1536)
    mask = rect_mask(img.size, (0.385, 0.53, 0.475, 0.72))  # the door
    box = mask.getbbox()
    sizes = generated_sizes(engine)
    out = predict(engine, img, mask, crop_to_mask=True, megapixels="0.25")
    del engine.denoise  # back to the class's method
    diff, share = changed(img, out)
    gw, gh = sizes[0]
    zoom = (box[0] - 160, box[1] - 120, box[2] + 160, box[3] + 120)
    return sheet("crop_to_mask: generate around the mask at the megapixel budget, keep the full resolution", [[
        (outlined(img, box), "input 2048x1536"), (mask, "mask: the door"),
        (outlined(out, box), f"output 2048x1536\nmodel ran at {gw}x{gh} (megapixels 0.25)"),
        (diff, f"changed pixels: {share:.2%}"),
    ], [
        (img.crop(zoom), "input, zoomed on the door"), (mask.crop(zoom), "mask, zoomed"),
        (out.crop(zoom), "output, zoomed"), (diff.crop(zoom), "changed, zoomed"),
    ]])


def picture_outpaint(engine: Engine) -> Image.Image:
    img = scene(192, 128)  # every preset's canvas is then a multiple of 32: no resizing at match_input
    rows = []
    for preset in ("Zoom out 2x", "Make square", "Right outpaint", "Bottom outpaint"):
        plan = outpaint_plan(*img.size, preset)
        out = predict(engine, img, None, outpaint=preset, preserve_unmasked=True)
        placed = Image.new("RGB", (plan.canvas_width, plan.canvas_height), (0, 0, 0))
        placed.paste(img, plan.image_box[:2])
        diff, _ = changed(placed, out)
        rows.append([
            (img, "input 192x128"), (outlined(out, plan.image_box), f'"{preset}"\noutput {out.width}x{out.height}'),
            (diff, "changed pixels"),
        ])
    title = ("outpaint + preserve_unmasked, to scale (outline: where the input sits; "
             "all of it is kept but an 8 px seam)")
    return sheet(title, rows, scale=0.75)


# The README's example inputs: a house and a mask over its door.
EXAMPLE_SIZE = (512, 384)
EXAMPLE_DOOR = (0.37, 0.52, 0.49, 0.74)


def example_inputs(folder: Path) -> None:
    img = scene(*EXAMPLE_SIZE)
    img.save(folder / "house.png", optimize=True)
    rect_mask(img.size, EXAMPLE_DOOR).save(folder / "house-mask.png", optimize=True)


PICTURES = {
    "option-none.png": picture_none,
    "option-preserve.png": picture_preserve,
    "option-crop.png": picture_crop,
    "option-outpaint.png": picture_outpaint,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--weights", default=None, help="weights folder (default: the built-in demo model)")
    args = parser.parse_args()

    from inference.factory import EngineOptions, build_engine
    from inference.tiny import ensure_tiny_weights

    engine = build_engine(EngineOptions(weights=args.weights or str(ensure_tiny_weights()), device="cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    example_inputs(args.out)
    total = 0
    for name, make in PICTURES.items():
        size = save(make(engine), args.out / name)
        total += size
        print(f"{args.out / name}: {size / 1024:.0f} KB")
    print(f"total: {total / 1024:.0f} KB")


if __name__ == "__main__":
    main()
