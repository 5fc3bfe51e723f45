"""Fan-out of prediction events from worker threads to the event loop.

The lifecycle publishes ``start``, ``logs``, ``output`` and ``completed`` for a prediction, and
``preview`` when a running prediction has a new preview of its picture (see server.previews);
streams, ``Prefer: wait`` requests and the webhook sender listen (webhooks never carry previews). On a shared database the events of other
nodes arrive too (see Lifecycle.remote_event). The database stays the record: an event only says
"look again".
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Callable

Listener = Callable[[str, str], None]  # (prediction_id, event)

START, LOGS, OUTPUT, COMPLETED = "start", "logs", "output", "completed"
PREVIEW = "preview"  # a new latest preview (Store.get_preview); only while the prediction runs


class Hub:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self.listeners: list[Listener] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def publish(self, prediction_id: str, event: str, remote: bool = False) -> None:
        """Thread-safe: hand the event to the loop. A ``remote`` event (another node made the move)
        wakes this node's streams and waiting requests but not its listeners: the webhook and the
        metrics of a move belong to the node that made it."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, prediction_id, event, remote)
        except RuntimeError:  # the loop is shutting down
            pass

    def _dispatch(self, prediction_id: str, event: str, remote: bool = False) -> None:
        for queue in list(self.queues.get(prediction_id, ())):
            queue.put_nowait(event)
        if not remote:
            for listener in self.listeners:
                listener(prediction_id, event)

    def wake_all(self, event: str = "stopping") -> None:
        """On the loop: wake every subscriber (the server is stopping), without telling listeners."""
        for subs in list(self.queues.values()):
            for queue in list(subs):
                queue.put_nowait(event)

    def subscribe(self, prediction_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[prediction_id].add(queue)
        return queue

    def unsubscribe(self, prediction_id: str, queue: asyncio.Queue) -> None:
        subs = self.queues.get(prediction_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                self.queues.pop(prediction_id, None)
