"""``urls.stream``: server-sent events as the official clients read them.

Event names are only ``output``, ``logs``, ``error`` and ``done``, and every event has an ``id``.
``output`` carries a file string, ``logs`` new log text, ``error`` JSON with ``detail``, and
``done`` ``{}`` or ``{"reason": "canceled"|"error"}``.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from sse_starlette.sse import ServerSentEvent

from .predictions import PredictionService
from .protocol import Status

KEEPALIVE_S = 15.0


async def prediction_events(service: PredictionService, prediction_id: str) -> AsyncIterator[ServerSentEvent]:
    queue = service.hub.subscribe(prediction_id)
    counter = 0
    sent_logs = 0

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
            try:
                await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
            except asyncio.TimeoutError:
                pass
    finally:
        service.hub.unsubscribe(prediction_id, queue)
