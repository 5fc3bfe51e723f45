"""The null engine (``--weights null``): no model, for benchmarks and tests of everything around it.

It reads no weights and no picture. A prediction takes ``delay_s`` (``--null-delay-s``, 0 by
default), spread over its ``num_inference_steps`` steps as a model's would be, then returns one
small fixed picture per output, encoded as asked. Between steps it reports progress, looks for a
cancel and takes previews when they are wanted, as :class:`inference.engine.Engine` does, so the
server's control path (claims, leases, logs, previews, cancels, outputs, webhooks) runs as it does
with a model, at the cost of the control path alone.

One engine serves many simulated GPUs (``--simulated-gpus``: one worker thread each, each holding
its own lease): it keeps no state between predictions and is safe to share between threads.
It is never the default: ``/health`` names it ``null engine`` and says it has no model.
"""

from __future__ import annotations

import math
import random
import threading
import time

from PIL import Image

from . import images as imageio
from .engine import CancelCheck, EngineSettings, LogFn, Output, StepCallback
from .errors import Cancelled
from .inputs import PredictionInput
from .previews import MAX_PREVIEWS, PreviewCallback, PreviewWanted
from .weights import LoadedModel

NAME = "null engine (no model)"
NOTICE = ("Null engine: no model runs. Every output is the same small grey picture, made after a fixed "
          "delay; it measures the server around a model (benchmarks and tests).")
SIZE = (64, 64)  # the fixed picture's size


class NullPreview:
    """A preview of the fixed picture (what :class:`inference.previews.Preview` offers a consumer)."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        self.size = SIZE

    def image(self) -> Image.Image:
        return _picture()


_PICTURE: Image.Image | None = None
_ENCODED: dict[tuple[str, int], bytes] = {}
_LOCK = threading.Lock()


def _picture() -> Image.Image:
    global _PICTURE
    if _PICTURE is None:
        _PICTURE = Image.new("RGB", SIZE, (128, 128, 128))
    return _PICTURE


def _encoded(fmt: str, quality: int) -> bytes:
    """The fixed picture in ``fmt``, encoded once per format and quality."""
    key = (fmt, quality)
    with _LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = imageio.encode_image(_picture(), fmt, quality)
        return _ENCODED[key]


class NullEngine:
    """Stands where :class:`inference.engine.Engine` stands for a worker: ``model``, ``settings``,
    ``predict``."""

    def __init__(self, delay_s: float = 0.0, settings: EngineSettings | None = None, device: str = "null"):
        self.delay_s = max(0.0, float(delay_s))
        self.settings = settings or EngineSettings()
        self.accelerator = None
        self.model = LoadedModel(pipeline=None, source="null", name=NAME, demo=True, device=device, dtype="none",
                                 notice=NOTICE, extras={"speed": {"engine": "null", "delay_s": self.delay_s}})

    def predict(self, inp: PredictionInput, *, resolver=None, on_step: StepCallback | None = None,
                cancelled: CancelCheck | None = None, log: LogFn | None = None,
                on_preview: PreviewCallback | None = None, preview_wanted: PreviewWanted | None = None,
                on_mask=None) -> list[Output]:
        """``delay_s`` over ``num_inference_steps`` steps, then the fixed picture per output."""

        def check() -> None:
            if cancelled is not None and cancelled():
                raise Cancelled()

        check()
        seed = inp.seed if inp.seed is not None else random.randint(0, 2**32 - 1)
        if log is not None:
            log(f"Using seed: {seed}")
            log("Null engine: no model; the outputs are a fixed picture")
        total = max(1, int(inp.num_inference_steps))
        step_s = self.delay_s / total
        stride = max(1, math.ceil(total / (MAX_PREVIEWS + 1)))
        sent = 0
        started = time.monotonic()
        for done in range(1, total + 1):
            wait = started + done * step_s - time.monotonic()  # steps on a fixed beat: no drift
            if wait > 0:
                time.sleep(wait)
            if on_step is not None:
                on_step(done, total)
            check()
            if (on_preview is not None and sent < MAX_PREVIEWS and done < total and done % stride == 0
                    and (preview_wanted is None or preview_wanted())):
                sent += 1
                on_preview(NullPreview(done, total))
        check()
        fmt = inp.output_format
        data = _encoded(fmt, inp.output_quality)
        return [Output(name=f"out-{i}.{fmt}", data=data, content_type=imageio.OUTPUT_CONTENT_TYPES[fmt],
                       seed=seed + i, width=SIZE[0], height=SIZE[1]) for i in range(inp.num_outputs)]


__all__ = ["NAME", "NOTICE", "NullEngine"]
