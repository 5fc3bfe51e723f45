"""What a worker does with a prediction of OpenAI's image API (see server.adapters): it makes the
engine's image and mask from the pictures as they were sent (OpenAI's mask turned into ours, both
scaled to the request's size; a generation's blank canvas), scales the outputs to that size
exactly, and keeps the run's usage (tokens, as OpenAI counts them for image models) in the
prediction's ``api_data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.engine import LogFn, Output

from ..adapters import EngineJob, FileReader, fit_outputs, prepared_png
from ..records import PredictionRecord
from . import models
from .pictures import canvas, edit_pictures
from .protocol import EDITS, MASK_INPUT, Usage

PREPARED_IMAGE, PREPARED_MASK = "prepared:image", "prepared:mask"  # the engine's file strings for them
PIXELS_PER_TOKEN_SIDE = 16  # FLUX: latents 8 times smaller than the picture, in patches of 2 x 2


def image_tokens(width: int, height: int) -> int:
    """The tokens of an image of this size in FLUX's transformer."""
    return (width // PIXELS_PER_TOKEN_SIDE) * (height // PIXELS_PER_TOKEN_SIDE)


class OpenAIWorkerSide:
    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def prepare(self, record: PredictionRecord, sent: dict[str, Any], read: FileReader, log: LogFn) -> EngineJob:
        data = record.api_data or {}
        size = (int(data["size"][0]), int(data["size"][1]))
        edit = data.get("endpoint") == EDITS
        log(f"OpenAI image {'edit' if edit else 'generation'} for model {data.get('model') or models.OWN_NAME!r}, "
            f"run by {models.SERVED_BY}; the outputs are made {size[0]}x{size[1]}")
        if edit:
            mask = sent.get(MASK_INPUT)
            image, ours = edit_pictures(read(sent["image"], "image"), read(mask, "mask") if mask else None, size,
                                        self.max_pixels, selects=bool(sent.get("mask_prompt")))
        else:
            image, ours = canvas(size)
        engine_input = {key: value for key, value in sent.items() if key != MASK_INPUT}
        engine_input.update(image=PREPARED_IMAGE)
        if ours is not None:
            engine_input.update(mask=PREPARED_MASK)
        output_format, quality = sent.get("output_format", "png"), int(sent.get("output_quality", 100))
        return EngineJob(
            input=engine_input,
            files={PREPARED_IMAGE: prepared_png(image), **({PREPARED_MASK: prepared_png(ours)} if ours else {})},
            finish=lambda outputs: fit_outputs(outputs, size, output_format, quality),
            facts=lambda outputs: {"usage": counted(outputs, int(sent.get("num_outputs", 1)), edit)},
        )


def counted(outputs: list[Output], num_outputs: int, edit: bool) -> dict[str, int]:
    """A run's usage, from the engine's outputs as made: the prompt's T5 tokens, an edit's image at
    the generated size, and every image generated (a flagged one was generated too)."""
    first = outputs[0]
    per_image = image_tokens(first.width, first.height)
    return {"text_tokens": first.prompt_tokens, "image_tokens": per_image if edit else 0,
            "tokens_per_output": per_image, "output_tokens": per_image * num_outputs}


@dataclass(frozen=True)
class Ran:
    """A prediction's usage as its worker kept it (zeros before it ran)."""

    text_tokens: int = 0
    image_tokens: int = 0
    tokens_per_output: int = 0
    output_tokens: int = 0


def ran(record: PredictionRecord | None) -> Ran:
    kept = ((record.api_data or {}).get("usage") if record is not None else None) or {}
    return Ran(**{key: int(kept.get(key, 0)) for key in Ran.__dataclass_fields__})


def usage_of(records: list[PredictionRecord]) -> Usage:
    """A request's usage: its input (prompt and image) once, the images of all its predictions."""
    runs = [ran(record) for record in records]
    return Usage.counted(runs[0].text_tokens, runs[0].image_tokens, sum(r.output_tokens for r in runs))
