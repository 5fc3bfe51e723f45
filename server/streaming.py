"""``urls.stream``: server-sent events as the official clients read them.

Event names are only ``output``, ``logs``, ``error`` and ``done``, and every event has an ``id``.
``output`` carries a file string, ``logs`` new log text, ``error`` JSON with ``detail``, and
``done`` ``{}`` or ``{"reason": "canceled"|"error"}``.

A stream opened with ``?previews=true`` (this server's own addition) also carries ``preview``
events while the prediction runs: JSON ``{"image": "data:image/webp;base64,...", "step": 12,
"total": 28}``, the latest preview of the picture as it forms, each sent once. Without it the
stream is exactly what the official clients read; they know no other event.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import AsyncIterator

from sse_starlette.sse import ServerSentEvent

from .events import PREVIEW
from .predictions import PredictionService
from .protocol import Status

KEEPALIVE_S = 15.0


def preview_data(preview) -> str:
    """A ``preview`` event's data: the image as a data URI, and the step it was taken at."""
    uri = f"data:{preview.content_type};base64,{base64.b64encode(preview.data).decode()}"
    return json.dumps({"image": uri, "step": preview.step, "total": preview.total})


async def prediction_events(service: PredictionService, prediction_id: str,
                            previews: bool = False) -> AsyncIterator[ServerSentEvent]:
    queue = service.hub.subscribe(prediction_id)
    counter = 0
    sent_logs = 0
    look_for_preview = previews  # at the start, then at each preview event (or a quiet wait)
    sent_preview: tuple | None = None

    def event(name: str, data: str) -> ServerSentEvent:
        nonlocal counter
        counter += 1
        return ServerSentEvent(data=data, event=name, id=str(counter))

    try:
        while True:
            record = service.get(prediction_id)
            if record is None:
                yield event("error", json.dumps({"detail": "The prediction no longer exists."}))
                yield event("done", json.dumps({"reason": "error"}))
                return
            logs = record.logs
            if len(logs) > sent_logs:
                yield event("logs", logs[sent_logs:])
                sent_logs = len(logs)
            status = record.status
            if status.terminal:
                if status == Status.SUCCEEDED:
                    for item in service.output_strings(record) or []:
                        yield event("output", item)
                    yield event("done", "{}")
                elif status == Status.CANCELED:
                    yield event("done", json.dumps({"reason": "canceled"}))
                else:
                    yield event("error", json.dumps({"detail": record.error or "The prediction failed."}))
                    yield event("done", json.dumps({"reason": "error"}))
                return
            if previews:
                service.lifecycle.watch_previews(prediction_id)  # renewed while the stream lives
            if look_for_preview:
                preview = service.store.get_preview(prediction_id)
                if preview is not None and (preview.step, preview.created_at) != sent_preview:
                    sent_preview = (preview.step, preview.created_at)
                    yield event("preview", preview_data(preview))
            try:
                woke = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
                look_for_preview = previews and woke == PREVIEW
            except asyncio.TimeoutError:
                look_for_preview = previews
    finally:
        service.hub.unsubscribe(prediction_id, queue)
