"""Final webhooks owed, kept in the database: each delivered by exactly one node at a time, retried
for hours, surviving receiver outages, node restarts and database restarts.

When a prediction with a ``completed`` webhook ends, the node that ends it owes the webhook in the
same write (``Store.end_run``: ``webhook_due`` set, and held by this node's outbox lease). The
lease is this node's for ``HOLD_S`` and renewed every third of it, for every owed webhook the node
holds, in one statement, whatever the webhook is doing: waiting for a slot on a slow receiver,
being posted, waiting for a short retry. So no other node takes it while it lives, and none sends
it twice. A node that dies stops renewing; once its hold has run out, by the database's clock, any
node's sweep takes the webhook over (a restarted node takes its own back at once).

**Retries.** A failed attempt is tried again after 1 s, doubling each time, at most every
``--webhook-retry-max-interval-s`` (10 minutes by default), until ``--webhook-retry-s`` (24 hours by
default) have passed since the prediction ended; then it is given up and its last error kept.
Retries due within ``LOCAL_RETRY_S`` are waited for by the node holding the webhook; later ones
are handed back to the database (``webhook_due`` in the future, no holder), where the first node
to sweep after that time takes it. Every attempt of one prediction's final webhook carries the
same ``webhook-id``, so a receiver can drop a repeat (a delivery whose answer was lost).

**Bounded waits.** A webhook that waits ``SLOT_WAIT_S`` for a slot on its receiver (a slow one
holds all of its slots) is handed back as due in a second, without counting an attempt: the
memory and the holds of a node stay bounded, and another node may send it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Callable

from .store import DatabaseUnavailable, Store

if TYPE_CHECKING:
    from .records import PredictionRecord
    from .settings import Settings

log = logging.getLogger(__name__)

HOLD_S = 60.0  # a node holds an owed webhook this long unless it renews the hold
SWEEP_S = 5.0  # how often each node looks for owed webhooks that are due and held by nobody
LOCAL_RETRY_S = 30.0  # retries due within this long are waited for by the node holding the webhook
SLOT_WAIT_S = 30.0  # the longest a final webhook waits for a slot on its receiver
RECORD_RETRY_S = 1.0  # recording a delivery's outcome is tried again this often while the database is away
RETRY_FIRST_S = 1.0  # the first retry's delay; each next one doubles


def retry_delay(attempts: int, max_interval_s: float) -> float:
    """The wait before the next attempt, after ``attempts`` failed ones (1, 2, 4, ... s, capped)."""
    return min(RETRY_FIRST_S * 2 ** max(0, attempts - 1), max_interval_s)


class FinalDelivery:
    """The database's side of one owed final webhook, as the sender settles it (see
    ``server.webhooks.Final``): each outcome is recorded under this node's hold, off the event
    loop, tried again while the database is away."""

    def __init__(self, outbox: "Outbox", record: "PredictionRecord"):
        self.outbox, self.prediction_id = outbox, record.id
        self.attempts = record.webhook_attempts
        # The retries end this long after the prediction ended (the database's clock).
        self._ends_at = (record.completed_at or outbox.store.now()) + outbox.settings.webhook_retry_s
        self.local_retry_s = LOCAL_RETRY_S
        self.max_interval_s = outbox.settings.webhook_retry_max_interval_s
        self.slot_wait_s = SLOT_WAIT_S
        outbox.holding.add(record.id)

    def remaining_s(self) -> float:
        return self._ends_at - self.outbox.store.now()

    async def delivered(self) -> None:
        await self._record(lambda: self.outbox.store.webhook_sent(self.prediction_id, self.outbox.lease))

    async def failed(self, error: str) -> None:
        """Counted and kept in the database: a node that takes it over (or this one, restarted)
        goes on with the schedule from there, and an operator sees why it fails."""
        await self._record(lambda: self.outbox.store.webhook_failed(self.prediction_id, self.outbox.lease, error),
                           settles=False)

    async def later(self, delay_s: float) -> None:
        await self._record(lambda: self.outbox.store.webhook_later(self.prediction_id, self.outbox.lease, delay_s))

    async def give_up(self, error: str) -> None:
        log.warning("prediction %s: its final webhook is given up after %d attempts: %s", self.prediction_id,
                    self.attempts, error)
        await self._record(lambda: self.outbox.store.webhook_given_up(self.prediction_id, self.outbox.lease, error))

    def released(self) -> None:
        """The sender stopped with it unsettled (the server is stopping): still owed, held until the
        hold runs out, or until this node (restarted) takes it back."""
        self.outbox.holding.discard(self.prediction_id)

    async def _record(self, write: Callable[[], bool], settles: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if not settles:
            try:
                await loop.run_in_executor(None, write)
            except DatabaseUnavailable:
                pass  # a count and a reason: the next write catches up
            return
        try:
            while True:
                try:
                    held = await loop.run_in_executor(None, write)
                    break
                except DatabaseUnavailable:
                    # Delivered but not yet recorded: recorded once the database is back (the hold
                    # outlives the outage, see Store.claim_owed_webhooks), never sent again meanwhile.
                    await asyncio.sleep(RECORD_RETRY_S)
            if not held:
                log.warning("prediction %s: another node took its final webhook over before this one settled it",
                            self.prediction_id)
        finally:
            self.outbox.holding.discard(self.prediction_id)


class Outbox:
    """This node's part in sending the owed final webhooks (see the module's docstring)."""

    def __init__(self, store: Store, settings: "Settings", holder: str):
        self.store, self.settings, self.holder = store, settings, holder
        # This process's hold; ``<holder>/`` lets this node, restarted, take its own back at once.
        self.lease = f"{holder}/{secrets.token_hex(8)}"
        self.holding: set[str] = set()  # predictions whose final webhook this node is sending
        self.hold_s = HOLD_S
        self.capacity = max(16, 4 * settings.webhook_slots)  # the most it holds at once

    def owes(self, record: "PredictionRecord") -> bool:
        """Whether ``record`` (as it now is) is an owed final webhook this node holds."""
        return record.webhook_due is not None and record.webhook_lease == self.lease

    def take_due(self) -> list["PredictionRecord"]:
        """Claim the owed webhooks that are due and held by nobody (or by a node whose hold ran
        out, or by this node before it restarted), as many as this node has room for."""
        room = self.capacity - len(self.holding)
        if room <= 0:
            return []
        return self.store.claim_owed_webhooks(self.lease, self.hold_s, grace_s=self.hold_s, limit=min(room, 100),
                                              holder=self.holder)

    def renew(self) -> None:
        if self.holding:
            self.store.renew_webhooks(self.lease, self.hold_s)

    async def run(self, send: Callable[["PredictionRecord"], None]) -> None:
        """For the server's life: renew this node's holds, and take and ``send`` the owed webhooks
        that are due (on the event loop, the sender's own; the database off it)."""
        loop = asyncio.get_running_loop()
        renewed = time.monotonic()
        while True:
            try:
                if time.monotonic() - renewed >= self.hold_s / 3:
                    await loop.run_in_executor(None, self.renew)
                    renewed = time.monotonic()
                for record in await loop.run_in_executor(None, self.take_due):
                    if record.id in self.holding:
                        continue  # being sent here already
                    log.info("prediction %s: sending its owed final webhook (attempt %d)", record.id,
                             record.webhook_attempts + 1)
                    send(record)
            except DatabaseUnavailable:
                pass  # tried again at the next sweep
            except Exception:
                log.exception("looking for owed webhooks failed")
            await asyncio.sleep(SWEEP_S)

    def delivery(self, record: "PredictionRecord") -> FinalDelivery:
        return FinalDelivery(self, record)
