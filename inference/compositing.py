"""Keeping everything outside the mask: grow and feather masks, paste the original back, find the
masked regions to generate one by one. Pure functions of PIL images, computed with numpy.

Masks are "L" images, 255 = repaint, 0 = keep, soft values kept. Distances are chessboard
distances in pixels, max(|dx|, |dy|): growing by px covers every pixel within px columns and px
rows of the mask, so grown shapes have square corners. That metric is what makes the filters
separable, and so fast at any radius (a few tenths of a second on 4000x3000).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageStat

from .sizing import output_size

# Width of the ring, beyond the feathered band, where the colour drift is measured (px).
COLOR_RING = 4
# Long side, in cells, of the coarse grid that mask_regions finds connected groups on.
REGION_GRID = 256


def grow_mask(mask: Image.Image, px: int) -> Image.Image:
    """``mask`` dilated by ``px`` pixels: each pixel takes the largest value within px of it
    (soft values kept). px = 0 returns the mask unchanged. Raises ValueError if px < 0."""
    if px < 0:
        raise ValueError(f"px must be >= 0, got {px}")
    mask = _as_mask(mask)
    if px == 0:
        return mask
    return _on_support(mask, px, lambda a: _dilate(a, px))


def feather(mask: Image.Image, px: int) -> Image.Image:
    """``mask`` with its edge softened outward over ``px`` pixels.

    Inside the mask the values are kept; outside, the value falls about linearly from the mask's
    value at its edge to 0, reaching 0 beyond distance px: pixels farther than px from every
    nonzero mask pixel are exactly 0, nearer ones are nonzero. px = 0 returns the mask unchanged.
    Built as a box blur of radius ceil(px/2) over the mask grown by floor(px/2), which reach px
    together (see ``_soften``). Raises ValueError if px < 0.
    """
    if px < 0:
        raise ValueError(f"px must be >= 0, got {px}")
    mask = _as_mask(mask)
    if px == 0:
        return mask
    return _on_support(mask, px, lambda a: _soften(a, px))


def composite(
    original: Image.Image,
    generated: Image.Image,
    mask: Image.Image,
    grow: int,
    blur: int,
    match_colors: bool = True,
) -> Image.Image:
    """``generated`` over ``original`` through ``blend = feather(grow_mask(mask, grow), blur)``.

    All three are the same size. result = round((generated * blend + original * (255 - blend)) /
    255) per channel, in integers: where blend is 0 the result is the original pixel exactly, where
    it is 255 the (colour-matched) generated pixel.

    match_colors: the model drifts slightly in colour even where it was told to keep the image. The
    mean per-channel difference original - generated is measured on the ring of pixels at distance
    (grow, grow + blur + COLOR_RING] from the mask, which the model kept, and added to every
    generated pixel, rounded and clipped, before blending: the drift is global, so correcting it
    globally keeps the repainted area consistent with itself and removes the step at the seam.
    Pixels where blend is 0 never change. An empty ring (the mask covers the image) skips it.
    """
    if not (original.size == generated.size == mask.size):
        raise ValueError(
            f"sizes differ: original {original.size}, generated {generated.size}, mask {mask.size}"
        )
    if grow < 0 or blur < 0:
        raise ValueError(f"grow and blur must be >= 0, got {grow} and {blur}")
    original = _as_rgb(original)
    mask = _as_mask(mask)
    support = mask.getbbox()
    if support is None:
        return original.copy()

    # Everything happens in the box that the blend and the colour ring can reach; outside it the
    # result is the original.
    reach = grow + blur + (COLOR_RING if match_colors else 0)
    box = _expanded(support, reach, mask.size)
    generated = _as_rgb(generated).crop(box)
    grown = _dilate(np.asarray(mask.crop(box)), grow)
    blend = _soften(grown, blur)

    if match_colors:
        inside = grown > 0
        ring = (_dilate(inside.view(np.uint8), blur + COLOR_RING) > 0) & ~inside
        if ring.any():
            ring_mask = Image.fromarray(ring.view(np.uint8) * np.uint8(255), "L")
            kept = ImageStat.Stat(original.crop(box), ring_mask).mean
            drifted = ImageStat.Stat(generated, ring_mask).mean
            levels = np.arange(256)
            lut = [np.clip(levels + round(k - d), 0, 255) for k, d in zip(kept, drifted)]
            generated = generated.point(np.concatenate(lut).tolist())

    # Pillow's masked paste computes round((generated * blend + original * (255 - blend)) / 255)
    # per channel in integers: exactly the original where blend is 0, the generated where 255.
    result = original.copy()
    result.paste(generated, box[:2], Image.fromarray(blend, "L"))
    return result


def mask_regions(mask: Image.Image, margin: int, threshold: int = 8) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1), x1 and y1 exclusive, around the separate groups of mask pixels
    brighter than ``threshold``, each grown by ``margin`` px and clipped to the image; boxes that
    then overlap are merged into their common bounding box until none overlap. Sorted top to
    bottom, then left to right. An empty mask gives [].

    Groups are found (8-connected) on a grid of at most REGION_GRID cells on the long side, so
    groups closer than one cell (long side / 256 px, rounded up) count as one; each box is still the
    exact bounding box of its pixels. Raises ValueError if margin < 0.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    on = np.asarray(_as_mask(mask)) > threshold
    height, width = on.shape
    cell = max(1, -(-max(width, height) // REGION_GRID))
    gh, gw = -(-height // cell), -(-width // cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=bool)
    padded[:height, :width] = on
    blocks = padded.reshape(gh, cell, gw, cell)
    rows_on = blocks.any(axis=3)  # (gh, cell, gw): which rows of each cell hold a pixel
    cols_on = blocks.any(axis=1)  # (gh, gw, cell)
    grid = rows_on.any(axis=1)
    if not grid.any():
        return []

    labels, count = _label(grid)
    # Exact pixel bounds of each cell, then of each group as the union of its cells.
    gy, gx = np.nonzero(grid)
    first_row = rows_on.argmax(axis=1)[gy, gx]
    last_row = cell - 1 - rows_on[:, ::-1, :].argmax(axis=1)[gy, gx]
    first_col = cols_on.argmax(axis=2)[gy, gx]
    last_col = cell - 1 - cols_on[:, :, ::-1].argmax(axis=2)[gy, gx]
    x0, y0 = gx * cell, gy * cell
    cells = np.stack([x0 + first_col, y0 + first_row, x0 + last_col + 1, y0 + last_row + 1], axis=1)
    boxes = _union_per_group(cells, labels[gy, gx], count)
    boxes[:, :2] = np.maximum(boxes[:, :2] - margin, 0)
    boxes[:, 2:] = np.minimum(boxes[:, 2:] + margin, (width, height))
    boxes = _merge_overlapping(boxes)
    return sorted(((a, b, c, d) for a, b, c, d in boxes.tolist()), key=lambda box: (box[1], box[0]))


def region_size_for_budget(box_w: int, box_h: int, megapixels: str) -> tuple[int, int]:
    """The (width, height) to generate a crop_to_mask region of ``box_w`` x ``box_h`` px at:
    ``output_size`` of the box, the hosted rules applied to the crop.

    "1" / "0.25" scale the region to about that many megapixels, upscaling small regions: FLUX
    renders poorly far below its training size, and the patch is scaled back to the box, so the
    extra pixels add detail rather than invent resolution. "match_input" keeps the box's size,
    floored to a multiple of 32 (at least 32) and capped at 1440 px a side like the hosted model,
    which bounds the memory a huge region could take. Sides are multiples of 32.
    """
    return output_size(box_w, box_h, megapixels)


# -- helpers ------------------------------------------------------------------------------------


def _as_mask(mask: Image.Image) -> Image.Image:
    return mask if mask.mode == "L" else mask.convert("L")


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _expanded(box: tuple[int, int, int, int], px: int, size: tuple[int, int]) -> tuple[int, ...]:
    """``box`` grown by px on every side, clipped to an image of ``size``."""
    x0, y0, x1, y1 = box
    return max(x0 - px, 0), max(y0 - px, 0), min(x1 + px, size[0]), min(y1 + px, size[1])


def _on_support(mask: Image.Image, reach: int, apply) -> Image.Image:
    """``apply`` (array -> array, reaching ``reach`` px) run only on the box around the mask's
    nonzero pixels that it can reach; the rest stays 0."""
    support = mask.getbbox()
    if support is None:
        return mask.copy()
    box = _expanded(support, reach, mask.size)
    result = Image.new("L", mask.size, 0)
    result.paste(Image.fromarray(apply(np.asarray(mask.crop(box)))), box[:2])
    return result


def _along(axis: int, start: int, stop: int | None) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def _max_1d(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Max over a window of 2 * radius + 1 centred along ``axis``, 0 beyond the edges.

    Doubling windows (a sparse table): after the loop each entry is the max of ``span`` consecutive
    entries, and two overlapping spans cover the window, so the cost is log2(window) passes."""
    if radius == 0:
        return a
    window, length = 2 * radius + 1, a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    table, span = np.pad(a, pad), 1
    while 2 * span <= window:
        n = table.shape[axis]
        table = np.maximum(table[_along(axis, 0, n - span)], table[_along(axis, span, n)])
        span *= 2
    second = window - span
    return np.maximum(table[_along(axis, 0, length)], table[_along(axis, second, second + length)])


def _dilate(a: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation by a (2 * radius + 1)-square: the max within chessboard distance radius."""
    return _max_1d(_max_1d(a, radius, 0), radius, 1)


def _soften(a: np.ndarray, px: int) -> np.ndarray:
    """``a`` feathered outward by px (see ``feather``): the max of ``a`` and a box blur of radius
    ceil(px/2) over ``a`` dilated by floor(px/2). The blur is PIL's (edges extended, rounded to
    nearest); its support is forced to exactly the pixels within px of a nonzero pixel, and it is
    at least 1 there, so "0 beyond px, nonzero within" holds whatever the rounding."""
    if px == 0:
        return a
    grown = _dilate(a, px // 2)
    radius = px - px // 2
    blurred = np.asarray(Image.fromarray(grown, "L").filter(ImageFilter.BoxBlur(radius)))
    reached = _dilate(grown, radius) > 0
    return np.maximum(a, np.where(reached, np.maximum(blurred, 1), 0).astype(np.uint8))


def _label(grid: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean grid: labels 0..count-1 on set cells (-1 elsewhere).

    Union-find in numpy: every set cell points to a parent; each round hooks the larger of two
    neighbours' roots onto the smaller, then compresses paths, until neighbours agree."""
    h, w = grid.shape
    index = np.arange(h * w).reshape(h, w)
    u, v = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys, yd = slice(0, h - dy), slice(dy, h)
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        both = grid[ys, xs] & grid[yd, xd]
        u.append(index[ys, xs][both])
        v.append(index[yd, xd][both])
    u, v = np.concatenate(u), np.concatenate(v)
    parent = index.ravel().copy()
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            break
        ru, rv = ru[differ], rv[differ]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots = parent.reshape(h, w)[grid]
    _, compact = np.unique(roots, return_inverse=True)
    labels = np.full((h, w), -1, dtype=np.int64)
    labels[grid] = compact.ravel()
    return labels, int(compact.max()) + 1


def _merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """Merge boxes (n x 4, x1/y1 exclusive) whose areas overlap into their common bounding box,
    repeating until no two overlap."""
    while len(boxes) > 1:
        order = np.argsort(boxes[:, 0], kind="stable")
        boxes = boxes[order]
        parent = list(range(len(boxes)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        merged = False
        x0s = boxes[:, 0]
        for i, (_, y0, x1, y1) in enumerate(boxes.tolist()):
            # Sorted by x0: the boxes after this one that start before it ends overlap it in x.
            end = int(np.searchsorted(x0s, x1, side="left"))
            if end <= i + 1:
                continue
            rest = boxes[i + 1 : end]
            hits = np.nonzero((rest[:, 1] < y1) & (rest[:, 3] > y0))[0] + i + 1
            for j in hits.tolist():
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                    merged = True
        if not merged:
            break
        _, group = np.unique([root(i) for i in range(len(boxes))], return_inverse=True)
        boxes = _union_per_group(boxes, group, int(group.max()) + 1)
    return boxes


def _union_per_group(boxes: np.ndarray, group: np.ndarray, count: int) -> np.ndarray:
    """The bounding box (count x 4) of the boxes (n x 4) of each group 0..count-1."""
    big = np.iinfo(np.int64).max
    union = np.array([[big, big, -big, -big]] * count, dtype=np.int64)
    np.minimum.at(union[:, 0], group, boxes[:, 0])
    np.minimum.at(union[:, 1], group, boxes[:, 1])
    np.maximum.at(union[:, 2], group, boxes[:, 2])
    np.maximum.at(union[:, 3], group, boxes[:, 3])
    return union
