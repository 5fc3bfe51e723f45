"""The seam between the core and the other APIs' adapters (OpenAI's, BFL's) on the worker's side.

An adapter admits its requests on the API node without decoding a picture: it reads sizes from the
pictures' headers, and the prediction's input keeps the pictures as they were sent, ``api_data``
what the adapter needs to run and answer them. The worker that claims such a prediction asks the
adapter registered for its ``api`` to ``prepare`` it: the adapter reads the pictures (fetched
under the engine's limits), turns them into the engine's input (decoding and scaling them there,
on the worker), and says how the engine's outputs become the recorded ones (scaled to the exact
size its API promises) and which facts of the run it keeps in ``api_data`` (OpenAI's usage).

A prediction of Replicate's API has no adapter: its input is the engine's, as sent.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from PIL import Image

from inference.engine import LogFn, Output
from inference.images import Resolver, encode_image

from .records import PredictionRecord

# Reads one file string of the input (a data: URI, an http(s) URL, this server's file URL) as the
# engine would, under its limits: (value, field) -> bytes. Raises FetchError naming the field.
FileReader = Callable[[str, str], bytes]


@dataclass
class EngineJob:
    """A claimed prediction as its worker runs it.

    ``input``: the engine's input (the worker validates it). ``files``: bytes already read for
    file strings of that input, which the engine takes from here rather than reading them again.
    ``finish``: the engine's outputs as they are recorded. ``facts``: what the adapter keeps of
    the run, merged into the prediction's ``api_data``, from the engine's outputs as made (before
    ``finish``)."""

    input: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    finish: Callable[[list[Output]], list[Output]] | None = None
    facts: Callable[[list[Output]], dict[str, Any]] | None = None

    def resolver(self, fallback: Resolver | None) -> Resolver:
        def resolve(value: str) -> bytes | None:
            found = self.files.get(value)
            if found is not None:
                return found
            return fallback(value) if fallback is not None else None

        return resolve

    def finished(self, outputs: list[Output]) -> list[Output]:
        return self.finish(outputs) if self.finish is not None else outputs

    def facts_of(self, outputs: list[Output]) -> dict[str, Any]:
        return self.facts(outputs) if self.facts is not None and outputs else {}


class WorkerSide(Protocol):
    """What an adapter does on the worker (see the module's docstring)."""

    def prepare(self, record: PredictionRecord, sent: dict[str, Any], read: FileReader, log: LogFn) -> EngineJob:
        ...


def fit_outputs(outputs: list[Output], size: tuple[int, int], output_format: str, quality: int) -> list[Output]:
    """The engine's outputs scaled to exactly ``size`` (Lanczos) and encoded again in their format;
    one that has the size already is kept as it is. The engine generates at sides floored to a
    multiple of 32 (at most 1440 px); the other APIs promise an exact size."""
    fitted = []
    for out in outputs:
        with Image.open(io.BytesIO(out.data)) as img:
            if img.size == tuple(size):
                fitted.append(out)
                continue
            data = encode_image(img.convert("RGB").resize(tuple(size), Image.Resampling.LANCZOS), output_format,
                                quality)
        fitted.append(dataclasses.replace(out, data=data, width=size[0], height=size[1]))
    return fitted


def prepared_png(img: Image.Image) -> bytes:
    """A picture an adapter made for the engine, handed over as a PNG (fast, lossless)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
