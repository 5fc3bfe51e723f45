"""A running prediction's previews, from the denoising thread to the store and the streams.

The engine hands a :class:`inference.previews.Preview` as soon as its projection is queued; here
it is turned into a WebP (quality ``QUALITY``) on a thread of its own, so the denoising never waits
for an image to be made or encoded, then kept as the prediction's latest preview and published
(``events.PREVIEW``) by the lifecycle, under the run's lease. A preview is wanted only while
someone watches (a stream asked for previews, or a page reads them: ``Lifecycle.watch_previews``,
on any node), at most every ``--preview-interval-s``, and never while the previous one is still
being encoded: a slow encode skips previews, it never queues them. ``--no-previews`` turns all of it off (the engine then takes
none).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from inference.previews import Preview

from .lifecycle import Lifecycle
from .records import PredictionRecord
from .settings import Settings

log = logging.getLogger(__name__)
QUALITY = 70  # WebP quality of a preview: a glimpse, not an output
CONTENT_TYPE = "image/webp"


def encode_preview(preview: Preview) -> bytes:
    buf = io.BytesIO()
    preview.image().save(buf, format="WEBP", quality=QUALITY, method=2)
    return buf.getvalue()


class PreviewSender:
    """One worker's previews: encoded and recorded on one thread beside the worker's."""

    def __init__(self, lifecycle: Lifecycle, settings: Settings, name: str = "previews"):
        self.lifecycle = lifecycle
        self.enabled = settings.previews
        self.interval_s = settings.preview_interval_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name) if self.enabled else None

    def for_run(self, run: PredictionRecord) -> dict:
        """The engine's ``on_preview`` and ``preview_wanted`` for one run (nothing when turned off)."""
        if not self.enabled:
            return {}
        state = _RunPreviews(self, run)
        return {"on_preview": state.send, "preview_wanted": state.wanted}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class _RunPreviews:
    def __init__(self, sender: PreviewSender, run: PredictionRecord):
        self.sender, self.run = sender, run
        self.last = float("-inf")  # when the last preview was taken (monotonic)
        self.pending = threading.Event()  # one is being encoded

    def wanted(self) -> bool:
        if self.pending.is_set() or time.monotonic() - self.last < self.sender.interval_s:
            return False
        try:
            return self.sender.lifecycle.previews_watched(self.run.id)
        except Exception:  # the database is away: no preview, the prediction goes on
            return False

    def send(self, preview: Preview) -> None:
        self.last = time.monotonic()
        self.pending.set()
        try:
            self.sender._executor.submit(self._record, preview)
        except RuntimeError:  # the sender was closed: the server is stopping
            self.pending.clear()

    def _record(self, preview: Preview) -> None:
        try:
            data = encode_preview(preview)
            self.sender.lifecycle.preview(self.run, preview.step, preview.total, CONTENT_TYPE, data)
        except Exception:  # a preview is a nicety: its failure never touches the prediction
            log.warning("could not record a preview of prediction %s", self.run.id, exc_info=True)
        finally:
            self.pending.clear()
