"""``urls.stream``: server-sent events as the official clients read them.

Event names are only ``output``, ``logs``, ``error`` and ``done``, and every event has an ``id``.
``output`` carries a file string, ``logs`` new log text, ``error`` JSON with ``detail``, and
``done`` ``{}`` or ``{"reason": "canceled"|"error"}``.

A stream opened with ``?previews=true`` (this server's own addition) also carries ``preview``
events while the prediction runs: JSON ``{"image": "data:image/webp;base64,...", "step": 12,
"total": 28}``, the latest preview of the picture as it forms, each sent once. Without it the
stream is exactly what the official clients read; they know no other event.

Every stream of one prediction on a node reads what it sends through the same
:class:`~server.events.SharedReads`: the record (with its outputs as answered, once it has
succeeded) and the latest preview are read, and their events encoded, once per event for all of
them, off the event loop. What one wake of a stream has to say goes out as one write. At most
``--max-stream-watchers`` streams watch one prediction on one node.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import AsyncIterator, NamedTuple

from sse_starlette.sse import ServerSentEvent

from .events import LOGS, OUTPUT, PREVIEW, SharedReads
from .protocol import Status
from .records import PredictionRecord
from .store import DatabaseUnavailable

KEEPALIVE_S = 15.0
_TIMEOUT = getattr(asyncio, "timeout", None)
_DONE, _CANCELED, _FAILED = (ServerSentEvent(data=data, event="done").encode()
                             for data in ("{}", json.dumps({"reason": "canceled"}), json.dumps({"reason": "error"})))
AWAY_RETRY_S = 1.0  # while the database is away, a stream looks again this often


class Seen(NamedTuple):
    """What the streams of a prediction send after an event: its record, and its ``output``
    events (encoded, without their id) once it has succeeded."""

    record: PredictionRecord | None
    outputs: list[bytes] | None


def encoded(name: str, data: str) -> bytes:
    """One event as the stream writes it, but for its ``id:`` line (see :func:`with_id`)."""
    return ServerSentEvent(data=data, event=name).encode()


def with_id(number: int, body: bytes) -> bytes:
    """The event ``body`` (from :func:`encoded`) with its id: the bytes sse_starlette would write."""
    return b"id: %d\r\n" % number + body


def preview_data(preview) -> str:
    """A ``preview`` event's data: the image as a data URI, and the step it was taken at."""
    uri = f"data:{preview.content_type};base64,{base64.b64encode(preview.data).decode()}"
    return json.dumps({"image": uri, "step": preview.step, "total": preview.total})


class StreamReads:
    """The shared reads of a node's streams (see the module's docstring)."""

    def __init__(self, service):
        self.service = service
        self.seen = SharedReads(service.hub, self._seen)
        self.previews = SharedReads(service.hub, self._preview)

    def _seen(self, prediction_id: str) -> Seen:
        record = self.service.get(prediction_id)
        outputs = None
        if record is not None and record.status == Status.SUCCEEDED:
            outputs = [encoded(OUTPUT, item) for item in self.service.output_strings(record) or []]
        return Seen(record, outputs)

    def _preview(self, prediction_id: str) -> tuple[tuple, bytes] | None:
        preview = self.service.store.get_preview(prediction_id)
        if preview is None:
            return None
        return (preview.step, preview.created_at), encoded("preview", preview_data(preview))


async def prediction_events(service, prediction_id: str, previews: bool = False,
                            queue: asyncio.Queue | None = None) -> AsyncIterator[bytes]:
    """The events of one prediction's stream, encoded, those of one wake in one chunk; ``queue``:
    its subscription to the hub, taken by the route (which refuses a watcher past the limit),
    else taken here."""
    queue = queue if queue is not None else service.hub.subscribe(prediction_id)
    reads: StreamReads = service.stream_reads
    loop = asyncio.get_running_loop()
    counter = 0
    sent_logs = 0
    look_for_preview = previews  # at the start, then at each preview event (or a quiet wait)
    sent_preview: tuple | None = None

    def event(body: bytes) -> bytes:
        nonlocal counter
        counter += 1
        return with_id(counter, body)

    try:
        while True:
            try:
                seen = await reads.seen.get(prediction_id)
                found = await reads.previews.get(prediction_id) if look_for_preview else None
            except DatabaseUnavailable:  # the stream stays open; what happened meanwhile follows
                await _next_event(queue, AWAY_RETRY_S)
                continue
            record = seen.record
            if record is None:
                yield event(encoded("error", json.dumps({"detail": "The prediction no longer exists."}))) + \
                    event(encoded("done", json.dumps({"reason": "error"})))
                return
            chunk = b""
            logs = record.logs
            if len(logs) > sent_logs:
                chunk += event(encoded(LOGS, logs[sent_logs:]))
                sent_logs = len(logs)
            status = record.status
            if status.terminal:
                if status == Status.SUCCEEDED:
                    for body in seen.outputs or []:
                        chunk += event(body)
                    chunk += event(_DONE)
                elif status == Status.CANCELED:
                    chunk += event(_CANCELED)
                else:
                    chunk += event(encoded("error", json.dumps({"detail": record.error or "The prediction failed."})))
                    chunk += event(_FAILED)
                yield chunk
                return
            if previews and service.lifecycle.watch_due(prediction_id):
                # Renewed while the stream lives (a write at most every few seconds per prediction per node).
                loop.run_in_executor(None, _quietly, service.lifecycle.watch_previews, prediction_id)
            if found is not None and found[0] != sent_preview:
                sent_preview = found[0]
                chunk += event(found[1])
            if chunk:
                yield chunk
            woke = await _next_event(queue, KEEPALIVE_S)
            look_for_preview = previews and woke in (PREVIEW, None, "look")
    finally:
        service.hub.unsubscribe(prediction_id, queue)


async def _next_event(queue: asyncio.Queue, timeout: float) -> str | None:
    """The next event of the queue, or None after ``timeout`` seconds; events that piled up
    meanwhile are one "look again" (the last of them is given). Cheap, for it runs once per event
    per stream: no task of its own where asyncio.timeout exists (Python 3.11+)."""
    try:
        if _TIMEOUT is not None:
            async with _TIMEOUT(timeout):
                woke = await queue.get()
        else:
            woke = await asyncio.wait_for(queue.get(), timeout=timeout)
    except asyncio.TimeoutError:
        return None
    while not queue.empty():
        later = queue.get_nowait()
        woke = PREVIEW if PREVIEW in (woke, later) else later
    return woke


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except DatabaseUnavailable:
        pass
