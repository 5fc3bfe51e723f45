"""Masks without a brush: a click, a box or a sentence becomes a mask.

Two models from transformers, each in its own folder in the layout ``save_pretrained`` writes
(``config.json``, the weights, the processor's config; a repo id is read from the local Hugging Face
cache, offline):

- **SAM** (``SamModel``, e.g. facebook/sam-vit-base) turns points and boxes into a mask: a click
  (with points to keep out) or a box selects one object; several boxes select several.
- **Grounding DINO** (``GroundingDinoForObjectDetection``, e.g. IDEA-Research/grounding-dino-tiny)
  finds the boxes a sentence names ("the red car", "sky"); SAM turns each into a mask and the
  selection is their union.

The text path is detector-then-SAM rather than CLIPSeg: SAM's masks follow an object's edges at
the picture's full resolution and SAM is needed for the clicks anyway, while CLIPSeg's mask is a
352x352 heat map whose edges have to be guessed by a threshold. CLIPSeg is faster (on a CPU, 0.9 s
against 35 s for the architectures at their real sizes: ``bench/masks.py --compare-clipseg``); the
GPU is where the segmenter is meant to run. What each folder holds is read from
its ``config.json`` (``model_type``), so ``--segmenter`` takes the folders in any order; a server
with SAM alone selects by clicks and boxes, and says that a sentence needs the detector.

``tiny`` builds both models in code with random weights (:mod:`inference.tiny_segmenter`, as
``--weights tiny`` builds the demo FLUX.1 Fill): the real architectures and file layouts, masks of
no meaning.

One :class:`Segmenter` serves a process: the workers (``mask_prompt``) and ``POST /v1/masks`` share
it, one call at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageChops

from .errors import InvalidInput, WeightsError

SAM_TYPES = ("sam",)
DETECTOR_TYPES = ("grounding-dino",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
DETECTOR_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
DEFAULT_THRESHOLD = 0.3  # Grounding DINO's box score a found region needs (its authors use 0.25 to 0.35)
TEXT_THRESHOLD = 0.25  # and the score of the words it is matched to
MAX_REGIONS = 16  # regions a sentence may select, the best scores first
MAX_PROMPT_CHARS = 256  # the detector reads a short phrase (its text encoder: 256 tokens at most)
MAX_POINTS = 64
MAX_BOXES = 16
SEGMENT_SIDE = 2048  # the longest side a picture is segmented at (see fitted)
ENCODED_PICTURES = 4  # pictures whose SAM image embeddings are kept (ViT-H: 4 MB each, 256x64x64 floats)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Selection:
    """A mask a click, box or sentence made: L, the image's size, 255 = selected."""

    mask: Image.Image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # found by a sentence
    scores: list[float] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """The share of the picture selected, 0 to 1."""
        return coverage(self.mask)


def coverage(mask: Image.Image) -> float:
    hist = mask.convert("L").histogram()
    total = mask.width * mask.height
    return sum(count * value for value, count in enumerate(hist)) / (255 * total) if total else 0.0


# -- combining a selection with a painted mask --------------------------------------------------------

MASK_MODES = ("add", "replace", "subtract", "intersect")


def combine(base: Image.Image | None, selection: Image.Image, mode: str) -> Image.Image:
    """The mask a prediction uses: ``base`` (a painted mask or the image's transparency, None when
    the request has neither) with ``selection`` by ``mode``: add (either), replace (the selection
    alone), subtract (the base less the selection), intersect (both)."""
    if mode == "replace" or (base is None and mode == "add"):
        return selection
    if base is None:
        raise InvalidInput.one("mask_mode", "required", (
            f"mask_mode {mode!r} changes a mask by the selection: send a mask (or an image with transparent pixels), "
            "or use mask_mode 'add' or 'replace'"))
    base = base.convert("L")
    if base.size != selection.size:
        base = base.resize(selection.size, Image.Resampling.LANCZOS)
    if mode == "add":
        return ImageChops.lighter(base, selection)
    if mode == "subtract":
        return ImageChops.darker(base, ImageChops.invert(selection))
    if mode == "intersect":
        return ImageChops.darker(base, selection)
    raise ValueError(f"unknown mask_mode {mode!r}")


# -- the models --------------------------------------------------------------------------------------

class Segmenter:
    """SAM (and, for sentences, Grounding DINO) on one device. Thread-safe: one call at a time."""

    def __init__(self, sam, sam_processor, detector=None, detector_processor=None, *, device: str = "cpu",
                 sources: Sequence[str] = (), demo: bool = False):
        self.sam, self.sam_processor = sam, sam_processor
        self.detector, self.detector_processor = detector, detector_processor
        self.device, self.sources, self.demo = device, list(sources), demo
        self.lock = threading.Lock()
        self._encoded: OrderedDict[bytes, object] = OrderedDict()  # picture -> SAM's image embeddings

    @property
    def reads_text(self) -> bool:
        return self.detector is not None

    # -- points and boxes -----------------------------------------------------------------------

    def select(self, image: Image.Image, points: Sequence[tuple[float, float, int]] = (),
               boxes: Sequence[tuple[float, float, float, float]] = ()) -> Selection:
        """The object at ``points`` ((x, y, 1) in it, (x, y, 0) out of it, in the image's pixels), and
        the objects in ``boxes`` ((x0, y0, x1, y1)). Points and the first box select one object
        together; each further box selects its own."""
        if not points and not boxes:
            raise InvalidInput.one("points", "required", "give at least one point or box to select")
        full = image.size
        image, scale = fitted(image)
        points = [(x * scale, y * scale, label) for x, y, label in points]
        boxes = [tuple(v * scale for v in b) for b in boxes]
        with self.lock:
            if points:
                first = [list(boxes[0])] if boxes else None
                mask = self._sam(image, points=[[float(x), float(y)] for x, y, _ in points],
                                 labels=[int(label) for _, _, label in points], boxes=first)
                rest = boxes[1:]
            else:
                mask, rest = None, boxes
            if rest:
                more = self._sam(image, boxes=[list(b) for b in rest])
                mask = more if mask is None else ImageChops.lighter(mask, more)
        return Selection(mask=scaled_back(mask, full))

    # -- a sentence -----------------------------------------------------------------------------

    def find(self, image: Image.Image, text: str, threshold: float = DEFAULT_THRESHOLD) -> Selection:
        """The regions ``text`` names: Grounding DINO's boxes scoring at least ``threshold``, each made a
        mask by SAM. An empty mask when nothing scores high enough."""
        if self.detector is None:
            raise InvalidInput.one("mask_prompt", "unavailable", (
                "this server's segmenter has SAM only, which selects by points and boxes: start it with a Grounding "
                "DINO folder too (--segmenter <SAM folder>,<Grounding DINO folder>; weights.md) to select by text"))
        import torch

        full = image.size
        image, scale = fitted(image)
        phrase = detector_phrase(text)
        with self.lock:
            inputs = self.detector_processor(images=image, text=phrase, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = self.detector(**inputs)
            found = self.detector_processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=threshold, text_threshold=min(threshold, TEXT_THRESHOLD),
                target_sizes=[image.size[::-1]])[0]
            scores = [float(s) for s in found["scores"].float().cpu()]
            boxes = [tuple(float(v) for v in b) for b in found["boxes"].float().cpu()]
            ranked = sorted(zip(scores, boxes), key=lambda sb: -sb[0])[:MAX_REGIONS]
            boxes = [_clamped(b, image.size) for _, b in ranked]
            scores = [s for s, _ in ranked]
            kept = [(s, b) for s, b in zip(scores, boxes) if b[2] > b[0] and b[3] > b[1]]
            if not kept:
                return Selection(mask=Image.new("L", full, 0))
            mask = self._sam(image, boxes=[list(b) for _, b in kept])
        return Selection(mask=scaled_back(mask, full), boxes=[tuple(v / scale for v in b) for _, b in kept],
                         scores=[s for s, _ in kept])

    # -- SAM ------------------------------------------------------------------------------------

    def _embeddings(self, image: Image.Image, pixel_values):
        """SAM's image encoder's output for ``image`` (nearly all of a click's work): kept for the last
        few pictures, so the second click on a picture costs only the prompt encoder and mask decoder."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16, person=f"{image.width}x{image.height}".encode()[:16]).digest()
        found = self._encoded.get(key)
        if found is not None:
            self._encoded.move_to_end(key)
            return found
        embeddings = self.sam.get_image_embeddings(pixel_values)
        self._encoded[key] = embeddings
        while len(self._encoded) > ENCODED_PICTURES:
            self._encoded.popitem(last=False)
        return embeddings

    def _sam(self, image: Image.Image, points=None, labels=None, boxes=None) -> Image.Image:
        """SAM's mask for one object (points, with at most one box) or one per box, united."""
        import torch

        kwargs = {}
        if points:
            kwargs["input_points"] = [[points]]
            kwargs["input_labels"] = [[labels]]
        if boxes:
            kwargs["input_boxes"] = [boxes] if not points else [[boxes[0]]]
        inputs = self.sam_processor(images=image, return_tensors="pt", **kwargs).to(self.device)
        # One click is ambiguous (a shirt, or the person wearing it): SAM proposes three masks and the
        # one it scores best is taken. More points or a box say enough for one.
        several = bool(points) and len(points) == 1 and not boxes
        pixel_values = inputs.pop("pixel_values")
        prompts = {k: v for k, v in inputs.items() if k.startswith("input_")}
        with torch.inference_mode():
            embeddings = self._embeddings(image, pixel_values)
            out = self.sam(image_embeddings=embeddings, multimask_output=several, **prompts)
            # The best candidate of each object is chosen at SAM's 256x256 and only it is scaled to the
            # picture's size, where it lies (on a GPU, only the united mask comes back to the host).
            # Each object's mask is scaled on its own into the union: one picture-sized mask at a time.
            best = out.iou_scores[0].argmax(dim=-1)  # iou_scores: (1, objects, candidates)
            low = out.pred_masks[0][torch.arange(best.shape[0], device=best.device), best]  # (objects, 256, 256)
            union = None
            for one in low:
                mask = self.sam_processor.image_processor.post_process_masks(
                    one[None, None, None].float(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][0, 0]
                union = mask if union is None else union.logical_or_(mask)
            pixels = union.to(torch.uint8).mul_(255).cpu().numpy()
        return Image.fromarray(pixels, mode="L")


def fitted(image: Image.Image) -> tuple[Image.Image, float]:
    """The picture as it is segmented, RGB, at most SEGMENT_SIDE a side, and its scale. SAM looks at
    1024 px and Grounding DINO at 1333 on the long side, and SAM's masks are 256x256 scaled up: a larger
    picture gives no finer mask, only more memory and time, so it is made smaller first."""
    image = image.convert("RGB")
    scale = min(1.0, SEGMENT_SIDE / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0), size[0] / image.width


def scaled_back(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask made on the smaller picture, at the picture's size, still black and white."""
    if mask.size == tuple(size):
        return mask
    return mask.resize(size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)


def detector_phrase(text: str) -> str:
    """The phrase as Grounding DINO reads it: lower case, phrases ended by a full stop."""
    words = " ".join(text.strip().lower().split())
    parts = [p.strip() for p in re.split(r"[.,;\n]", words) if p.strip()]
    return " . ".join(parts) + " ."


def _clamped(box, size) -> tuple[float, float, float, float]:
    w, h = size
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))


# -- loading ------------------------------------------------------------------------------------------

def parse_sources(value: str | Sequence[str] | None) -> list[str]:
    """--segmenter's value: folders (or repo ids) separated by commas, or 'tiny'."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


def model_type_of(folder: Path) -> str:
    """The model a folder holds, from its config.json; a WeightsError names the file that is missing."""
    config = folder / "config.json"
    if not folder.is_dir():
        raise WeightsError(f"The segmenter folder {folder} does not exist.")
    if not config.is_file():
        raise WeightsError(f"The segmenter folder {folder} has no config.json: it should hold a SAM or Grounding DINO "
                           "model as save_pretrained writes it (see weights.md).")
    try:
        kind = json.loads(config.read_text()).get("model_type", "")
    except (ValueError, OSError):
        raise WeightsError(f"The segmenter folder {folder} has a broken config.json; download it again (weights.md).") from None
    if kind not in SAM_TYPES + DETECTOR_TYPES:
        raise WeightsError(f"The segmenter folder {folder} holds a {kind or 'unnamed'!r} model; --segmenter takes a SAM "
                           "folder (model_type 'sam') and a Grounding DINO folder (model_type 'grounding-dino').")
    missing = []
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("model.safetensors")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        missing.append("preprocessor_config.json")
    if kind in DETECTOR_TYPES and not any((folder / name).is_file() for name in DETECTOR_TOKENIZER_FILES):
        missing.append("tokenizer.json")
    if missing:
        raise WeightsError(f"The segmenter folder {folder} is incomplete: {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing; download it again (weights.md).")
    return kind


def resolve_source(source: str) -> Path:
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or not REPO_ID.match(source):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        raise WeightsError(f"The segmenter {source!r} is not in the local Hugging Face cache; download it first "
                           "(weights.md) or pass a folder.") from None


def check_sources(value: str | Sequence[str] | None) -> dict[str, Path]:
    """The SAM folder (and Grounding DINO's) --segmenter names, each checked for its files: what a
    server checks before it starts, so a wrong folder is told at once, naming the missing file."""
    sources = parse_sources(value)
    if sources == ["tiny"]:
        from .tiny_segmenter import ensure_tiny_segmenter

        folder = ensure_tiny_segmenter()
        sources = [str(folder / "sam"), str(folder / "grounding-dino")]
    found: dict[str, Path] = {}
    for source in sources:
        folder = resolve_source(source)
        kind = model_type_of(folder)
        role = "sam" if kind in SAM_TYPES else "detector"
        if role in found:
            raise WeightsError(f"--segmenter names two {'SAM' if role == 'sam' else 'Grounding DINO'} folders "
                               f"({found[role]} and {folder}); give one of each.")
        found[role] = folder
    if found and "sam" not in found:
        raise WeightsError("--segmenter names a Grounding DINO folder but no SAM folder: SAM makes the masks of the "
                           "boxes it finds (weights.md).")
    return found


def load_segmenter(value: str | Sequence[str], device: str | None = None) -> Segmenter:
    """The models --segmenter names, on ``device`` (default: the first GPU, else the CPU), in float32.
    Every failure is a WeightsError in one sentence."""
    import torch
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

    demo = parse_sources(value) == ["tiny"]
    folders = check_sources(value)
    if not folders:
        raise WeightsError("--segmenter is empty")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet()
    try:
        sam = SamModel.from_pretrained(folders["sam"], local_files_only=True).to(device).eval()
        sam_processor = SamProcessor.from_pretrained(folders["sam"], local_files_only=True)
        detector = detector_processor = None
        if "detector" in folders:
            detector = GroundingDinoForObjectDetection.from_pretrained(folders["detector"], local_files_only=True)
            detector = detector.to(device).eval()
            detector_processor = GroundingDinoProcessor.from_pretrained(folders["detector"], local_files_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"The segmenter could not be loaded from {', '.join(map(str, folders.values()))}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for model in (sam, detector):
        if model is not None:
            model.requires_grad_(False)
    return Segmenter(sam, sam_processor, detector, detector_processor, device=str(device),
                     sources=[str(p) for p in folders.values()], demo=demo)


def quiet() -> None:
    """transformers says once per process that torchvision would be faster; the PIL path is what runs."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
