"""Fan-out of prediction events from worker threads to the event loop.

The lifecycle publishes ``start``, ``logs``, ``output`` and ``completed`` for a prediction, and
``preview`` when a running prediction has a new preview of its picture (see server.previews);
streams, ``Prefer: wait`` requests and the webhook sender listen (webhooks never carry previews). On a shared database the events of other
nodes arrive too (see Lifecycle.remote_event). The database stays the record: an event only says
"look again".

However many watch one prediction on this node, what they look at is read once per event
(:class:`SharedReads`): 500 streams of one prediction cost the database, and the event loop, what
one does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger(__name__)
Listener = Callable[[str, str, Any], None]  # (prediction_id, event, the record as it was published)

START, LOGS, OUTPUT, COMPLETED = "start", "logs", "output", "completed"
PREVIEW = "preview"  # a new latest preview (Store.get_preview); only while the prediction runs


class TooManyWatchers(Exception):
    """A prediction already has as many watchers on this node as it may."""


class Hub:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self.listeners: list[Listener] = []
        self.generation: dict[str, int] = {}  # per watched prediction: events seen, for SharedReads
        self._forgotten: list[Callable[[str], None]] = []  # told when a prediction's last watcher leaves

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def publish(self, prediction_id: str, event: str, remote: bool = False, record: Any = None) -> None:
        """Thread-safe: hand the event to the loop. A ``remote`` event (another node made the move)
        wakes this node's streams and waiting requests but not its listeners: the webhook and the
        metrics of a move belong to the node that made it. ``record``: the prediction as the move
        left it, for the listeners."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, prediction_id, event, remote, record)
        except RuntimeError:  # the loop is shutting down
            pass

    def _dispatch(self, prediction_id: str, event: str, remote: bool = False, record: Any = None) -> None:
        subs = self.queues.get(prediction_id)
        if subs:
            self.generation[prediction_id] = self.generation.get(prediction_id, 0) + 1
            for queue in list(subs):
                queue.put_nowait(event)
        if not remote:
            for listener in self.listeners:
                try:
                    listener(prediction_id, event, record)
                except Exception:  # one listener's failure never keeps the event from the others
                    log.exception("a listener of %s's %s event failed", prediction_id, event)

    def wake_all(self, event: str = "stopping") -> None:
        """On the loop: wake every subscriber (the server is stopping, or the database is back and
        they must look again), without telling listeners."""
        for prediction_id, subs in list(self.queues.items()):
            self.generation[prediction_id] = self.generation.get(prediction_id, 0) + 1
            for queue in list(subs):
                queue.put_nowait(event)

    def watchers(self, prediction_id: str) -> int:
        return len(self.queues.get(prediction_id, ()))

    def subscribe(self, prediction_id: str, limit: int | None = None) -> asyncio.Queue:
        """A queue of the prediction's events; TooManyWatchers when it has ``limit`` already."""
        if limit is not None and self.watchers(prediction_id) >= limit:
            raise TooManyWatchers(prediction_id)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[prediction_id].add(queue)
        return queue

    def unsubscribe(self, prediction_id: str, queue: asyncio.Queue) -> None:
        subs = self.queues.get(prediction_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                self.queues.pop(prediction_id, None)
                self.generation.pop(prediction_id, None)
                for forget in self._forgotten:
                    forget(prediction_id)


class SharedReads:
    """What the watchers of a prediction on this node read after each event, read once for all of
    them, off the event loop: ``await reads.get(pid)`` gives ``read(pid)`` as it was after the
    latest event the hub saw for ``pid`` (a read begun before an event is never taken for one
    after it). A read that failed is tried again by the next caller."""

    def __init__(self, hub: Hub, read: Callable[[str], Any]):
        self.hub, self.read = hub, read
        self._reads: dict[str, tuple[int, asyncio.Future]] = {}
        hub._forgotten.append(lambda pid: self._reads.pop(pid, None))

    async def get(self, prediction_id: str) -> Any:
        generation = self.hub.generation.get(prediction_id, 0)
        entry = self._reads.get(prediction_id)
        if entry is None or entry[0] != generation or (entry[1].done() and entry[1].exception() is not None):
            future = asyncio.get_running_loop().run_in_executor(None, self.read, prediction_id)
            entry = self._reads[prediction_id] = (generation, future)
            if not self.hub.watchers(prediction_id):  # nobody subscribed: nothing will forget it
                future.add_done_callback(lambda _f, pid=prediction_id, e=entry: self._drop(pid, e))
        return await asyncio.shield(entry[1])

    def _drop(self, prediction_id: str, entry) -> None:
        if self._reads.get(prediction_id) is entry and not self.hub.watchers(prediction_id):
            self._reads.pop(prediction_id, None)
