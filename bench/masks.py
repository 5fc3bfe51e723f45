"""Masks without a brush: the time from a click (or a box) to its mask, and from words to theirs.

    python bench/masks.py                                   # tiny, on the first GPU or the CPU
    python bench/masks.py --random-real                     # also SAM ViT-B and Grounding DINO (tiny) at real size
    python bench/masks.py --segmenter /models/sam-vit-base,/models/grounding-dino-tiny --device cuda

What is timed is :class:`inference.segment.Segmenter`, as ``POST /v1/masks`` and ``mask_prompt``
call it: ``select`` with one point on a picture it has not seen (a first click: SAM encodes the
picture), with another point and with one box on the same picture (what the page's later clicks
cost: the picture's embeddings are kept), and ``find`` with a short phrase on a picture it has not
seen (Grounding DINO's boxes, then SAM's masks of them). Each is timed ``--runs`` times after ``--warmup`` untimed
runs, on each picture size of ``--sizes``; printed are the median and the 90th percentile in
milliseconds, the regions the phrase found, and the ratio text/click of the same run.

Models:

- ``tiny``: the demo segmenter built in code (``--segmenter tiny``): a check of this script.
- ``--random-real``: the real architectures at their real size with random weights, built in code
  (real weights cannot be fetched everywhere; the time a forward pass takes does not depend on the
  weights' values): SAM ViT-B (facebook/sam-vit-base's configuration and preprocessing: the longest
  side resized to 1024, padded to 1024x1024) and Grounding DINO with a Swin-T backbone and a
  BERT-base text encoder (IDEA-Research/grounding-dino-tiny's configuration, pictures resized to
  800 px on the short side, 1333 at most). Its tokenizer has a small vocabulary written here (the
  bench's words, one token each as in BERT's); the text encoder's embedding table keeps BERT's
  30522 rows, and a lookup costs the same whatever the table's size, so the vocabulary changes
  nothing measured. With random weights the detector's scores are noise: the phrase is run with
  ``--text-threshold`` (0.01 by default for random-real, 0.3 otherwise) and the regions it found
  are printed, since SAM's share of a sentence grows with them (16 at most).
- ``--segmenter FOLDERS``: real folders (or repo ids in the local cache), as the server takes them.
- ``--compare-clipseg``: CLIPSeg at its real size (rd64-refined: CLIP ViT-B/16 at 352x352), random
  weights, from the phrase to a mask: the text-to-mask alternative the server does not serve, timed
  beside Grounding DINO with SAM.

SAM and Grounding DINO resize every picture to a fixed size, so a larger picture costs only its
preprocessing and the masks' upsampling to the picture's size; the two sizes show that part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHRASE = "the red rectangle"  # the picture has one: real weights find it
BERT_VOCAB_SIZE = 30522  # bert-base-uncased's, as in grounding-dino-tiny's text_config
BENCH_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "of", "and", "red", "rectangle", "car",
               "sky", "cat", "dog", "person", "tree", "house"]


def picture(width: int, height: int):
    """A photo-like picture: a gradient with a few shapes (the content does not change the time)."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 5, height // 3, width // 2, 2 * height // 3), fill=(200, 30, 30))
    draw.ellipse((3 * width // 5, height // 5, 4 * width // 5, height // 2), fill=(40, 90, 200))
    return image


# -- the models -----------------------------------------------------------------------------------


def build_random_real(device: str, folder: Path):
    """A Segmenter of SAM ViT-B and Grounding DINO (Swin-T, BERT-base) at their real sizes, random
    weights, float32 (as load_segmenter loads them); the tokenizer's vocabulary is written to ``folder``."""
    import torch
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor, SwinConfig)
    from transformers.models.sam.configuration_sam import SamVisionConfig

    from inference.segment import Segmenter, quiet

    quiet()
    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             global_attn_indexes=[2, 5, 8, 11])  # sam-vit-base
    with torch.device(device):
        sam = SamModel(SamConfig(vision_config=vision.to_dict())).eval()
    sam_processor = SamProcessor(image_processor=SamImageProcessor())  # longest side 1024, padded to 1024x1024

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(BENCH_WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=["stage2", "stage3", "stage4"])  # Swin-T
    text = BertConfig(vocab_size=BERT_VOCAB_SIZE)  # BERT-base: 12 layers, 768 wide
    config = GroundingDinoConfig(backbone_config=backbone.to_dict(), text_config=text.to_dict())
    with torch.device(device):
        detector = GroundingDinoForObjectDetection(config).eval()
    detector_processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer)
    for model in (sam, detector):
        model.requires_grad_(False)
    return Segmenter(sam, sam_processor, detector, detector_processor, device=device,
                     sources=["random-real sam-vit-base", "random-real grounding-dino-tiny"])


def build_clipseg(device: str):
    """CLIPSeg (CIDAS/clipseg-rd64-refined's architecture: CLIP ViT-B/16, a 64-wide decoder; pictures at
    352x352) at its real size with random weights: the text-to-mask alternative to Grounding DINO with
    SAM, timed beside it (--compare-clipseg). Not served: see inference.segment for why."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from inference.tiny import _clip_tokenizer

    torch.manual_seed(0)
    config = CLIPSegConfig(vision_config={"patch_size": 16}, reduce_dim=64)
    with torch.device(device):
        model = CLIPSegForImageSegmentation(config).eval()
    model.requires_grad_(False)
    images = ViTImageProcessor(size={"height": 352, "width": 352}, image_mean=[0.485, 0.456, 0.406],
                               image_std=[0.229, 0.224, 0.225])
    return model, CLIPSegProcessor(image_processor=images, tokenizer=_clip_tokenizer())


def clipseg_mask(model, processor, image, phrase: str, device: str):
    """CLIPSeg's mask of ``phrase``: its 352x352 map scaled to the picture, thresholded at 0.5."""
    import torch
    from PIL import Image

    inputs = processor(text=[phrase], images=[image], padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        logits = model(**inputs).logits
    heat = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]).float())
    full = torch.nn.functional.interpolate(heat, size=image.size[::-1], mode="bilinear", align_corners=False)
    return Image.fromarray(((full[0, 0] > 0.5).to(torch.uint8) * 255).cpu().numpy(), mode="L")


def load(name: str, device: str, tmp: Path):
    """The segmenter a row times: 'tiny', 'random-real', or --segmenter's folders."""
    from inference.segment import load_segmenter

    if name == "random-real":
        return build_random_real(device, tmp / "random-real")
    return load_segmenter(name, device)


def parameters(segmenter) -> float:
    models = [m for m in (segmenter.sam, segmenter.detector) if m is not None]
    return sum(p.numel() for m in models for p in m.parameters()) / 1e6


# -- measuring ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def timed(fn, runs: int, warmup: int) -> tuple[dict, object]:
    """Median and p90 of ``fn()`` in ms over ``runs`` after ``warmup`` untimed calls, and its last result.
    The segmenter returns a PIL mask, copied from the device: each call ends when its work has."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": statistics.median(times), "p90": percentile(times, 0.9)}, result


def measure(segmenter, width: int, height: int, *, runs: int, warmup: int, threshold: float,
            phrase: str = PHRASE) -> dict:
    """On one picture, in ms (p50, p90): a first click (SAM encodes the picture: its kept embeddings
    are dropped before each run), a next click and a box on the same picture (the kept embeddings:
    the page's second and later clicks), and a phrase on a new picture (a prediction's mask_prompt);
    and the regions the phrase found."""
    image = picture(width, height)
    click = [(width * 0.35, height * 0.5, 1)]
    other = [(width * 0.7, height * 0.3, 1)]
    box = [(width * 0.2, height * 0.33, width * 0.5, height * 0.67)]

    def fresh(call):
        def run():
            segmenter._encoded.clear()
            return call()
        return run

    figures = {"size": f"{width}x{height}"}
    figures["click"], _ = timed(fresh(lambda: segmenter.select(image, points=click)), runs, warmup)
    segmenter.select(image, points=click)
    figures["next"], _ = timed(lambda: segmenter.select(image, points=other), runs, warmup)
    figures["box"], _ = timed(lambda: segmenter.select(image, boxes=box), runs, warmup)
    if segmenter.reads_text:
        figures["text"], found = timed(fresh(lambda: segmenter.find(image, phrase, threshold)), runs, warmup)
        figures["regions"] = len(found.scores)
        figures["text_over_click"] = figures["text"]["p50"] / figures["click"]["p50"]
    return figures


def sizes_of(value: str) -> list[tuple[int, int]]:
    out = []
    for item in value.split(","):
        w, h = item.lower().split("x")
        out.append((int(w), int(h)))
    return out


def row(model: str, figures: dict) -> str:
    def cell(key):
        f = figures.get(key)
        return f"{f['p50']:9.1f} {f['p90']:9.1f}" if f else f"{'-':>9} {'-':>9}"

    regions = figures.get("regions")
    return (f"{model:<12} {figures['size']:>10} {cell('click')}  {cell('next')}  {cell('box')}  {cell('text')}  "
            f"{'-' if regions is None else regions:>7}")


HEADER = (f"{'model':<12} {'picture':>10} {'1st click':>9} {'p90':>9}  {'next clk':>9} {'p90':>9}  "
          f"{'box p50':>9} {'p90':>9}  {'text p50':>9} {'p90':>9}  {'regions':>7}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default with a GPU) or cpu")
    parser.add_argument("--random-real", action="store_true",
                        help="also time SAM ViT-B and Grounding DINO (Swin-T, BERT-base) at real size, random weights")
    parser.add_argument("--segmenter", default=None,
                        help="time these folders (SAM, Grounding DINO; comma-separated) instead of tiny")
    parser.add_argument("--sizes", default="1024x768,2048x1536", help="picture sizes, WxH, comma-separated")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--text-threshold", type=float, default=None,
                        help="the phrase's box score: 0.3 (the server's default); 0.01 for random weights")
    parser.add_argument("--phrase", default=PHRASE)
    parser.add_argument("--compare-clipseg", action="store_true",
                        help="also time CLIPSeg (rd64-refined's size, random weights) from the phrase to a mask")
    args = parser.parse_args(argv)
    import torch

    from inference.segment import DEFAULT_THRESHOLD

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    models = [args.segmenter] if args.segmenter else ["tiny"]
    if args.random_real:
        models.append("random-real")
    sizes = sizes_of(args.sizes)
    print(f"device {device}: ms from the call to the mask, median and p90 of {args.runs} runs after "
          f"{args.warmup} untimed; text: {args.phrase!r}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-masks-") as tmp:
        for name in models:
            started = time.perf_counter()
            segmenter = load(name, device, Path(tmp))
            label = name if name in ("tiny", "random-real") else "folders"
            threshold = args.text_threshold if args.text_threshold is not None else (
                0.01 if name == "random-real" or segmenter.demo else DEFAULT_THRESHOLD)
            print(f"{label}: {parameters(segmenter):.1f} M parameters, built or loaded in "
                  f"{time.perf_counter() - started:.1f} s ({', '.join(segmenter.sources)})", flush=True)
            for width, height in sizes:
                figures = measure(segmenter, width, height, runs=args.runs, warmup=args.warmup,
                                  threshold=threshold, phrase=args.phrase)
                results.append((label, figures))
                print(f"  {label} {width}x{height} measured", file=sys.stderr, flush=True)
            del segmenter
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    clipseg = []
    if args.compare_clipseg:
        model, processor = build_clipseg(device)
        for width, height in sizes:
            image = picture(width, height)
            figures, _ = timed(lambda: clipseg_mask(model, processor, image, args.phrase, device), args.runs, args.warmup)
            clipseg.append((f"{width}x{height}", figures))
        del model
    print(HEADER)
    for label, figures in results:
        print(row(label, figures))
    for size, figures in clipseg:
        print(f"{'clipseg':<12} {size:>10} {'-':>9} {'-':>9}  {'-':>9} {'-':>9}  {'-':>9} {'-':>9}  "
              f"{figures['p50']:9.1f} {figures['p90']:9.1f}  {'-':>7}")
    for label, figures in results:
        if "text_over_click" in figures:
            print(f"ratio text/click {label} {figures['size']}: {figures['text_over_click']:.2f}x "
                  f"({figures['regions']} region{'s' if figures['regions'] != 1 else ''})")
    for label, figures in results:
        print(f"ratio first/next click {label} {figures['size']}: "
              f"{figures['click']['p50'] / figures['next']['p50']:.1f}x (the picture's embeddings kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
