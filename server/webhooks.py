"""Webhook delivery: signing, throttling, ordering and retries, as Replicate does it.

The app owns one `WebhookSender`. The server calls `notify(...)` on each prediction event; the
sender keeps one ordered channel per prediction, served by its own short-lived asyncio task:

- `start` and `completed` are always sent (when the prediction's events filter lists them);
- `output` and `logs` are throttled per prediction: a send at most every `throttle_s`; a burst is
  coalesced into one trailing send whose body is taken at send time, so it carries the newest state.
  Once `completed` is queued no `output`/`logs` send follows: the final body carries everything;
- only `completed` is retried, on a connection error, a timeout or any non-2xx answer (a 3xx
  included: redirects are never followed), with exponential backoff, under one `webhook-id`. How
  long, and who records each outcome, is its `Final`'s to say: in the server, the database's
  outbox (:mod:`server.outbox`: retries for hours, across nodes and restarts); used alone, for
  about `retry_for_s`. The other events are tried once;
- the POSTs in flight are bounded per destination (scheme, host and port: `max_per_destination`)
  and all together (`max_concurrency`), and each POST has a total deadline of `timeout_s`: a slow
  or dead receiver holds only its own destination's slots, so the webhooks of every other receiver
  go out at once however many predictions point at the slow one.

Bodies are signed with the Standard Webhooks scheme (https://www.standardwebhooks.com), which the
official clients validate: `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
A prediction made through another API's adapter is sent in that API's style (`WebhookStyle`): its
own body and signature headers, through the same channels, retries and owed-webhook records.

Its length is on purpose: it is one delivery engine (channels per destination, throttled progress
events, bounded slots, retries, signing) whose parts share the same queue and bookkeeping.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import socket
import time
from typing import Callable
from urllib.parse import urlsplit

import httpx

from inference.images import USER_AGENT, non_public_address, pinned_request

from .events import COMPLETED, LOGS, OUTPUT
from .protocol import WEBHOOK_EVENTS

logger = logging.getLogger(__name__)

EVENTS = WEBHOOK_EVENTS
_PROGRESS = frozenset({OUTPUT, LOGS})  # the throttled events
_SECRET_PREFIX = "whsec_"
KEEP_BODY_BYTES = 65536  # an answer body at most this long is read, so its connection is kept
KEEP_BODY_S = 0.5  # ... for at most this long


def new_secret() -> str:
    """A fresh signing secret: "whsec_" + base64 of 32 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature header value ("v1,<base64 digest>") of one delivery."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_bfl(secret: str, body: bytes) -> str:
    """BFL's signature header value: "sha256=" + hex HMAC-SHA256 of the body, keyed by the
    request's ``webhook_secret`` as UTF-8."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


Signer = Callable[[bytes], dict]  # a body -> the signature headers of its delivery


@dataclasses.dataclass(frozen=True)
class WebhookStyle:
    """How the webhooks of predictions made through one API's adapter look: ``snapshot(record)``
    is the body, ``signer(record)`` gives the headers that sign a body (None: the Standard
    Webhooks signature with the tenant's secret)."""

    snapshot: Callable[[object], dict]
    signer: Callable[[object], Signer | None]


class _Refused(Exception):
    """The URL must never be posted to (bad scheme, or a non-public address): drop, don't retry."""


class _NoSlot(Exception):
    """No slot on the receiver freed within the final webhook's wait: hand it back for later."""


class Final:
    """How one completed event's delivery is settled: its retries' budget and where each outcome
    is recorded. :mod:`server.outbox` gives the database's; used alone, the sender makes a
    :class:`LocalFinal`."""

    attempts: int = 0  # failed attempts before this delivery began
    local_retry_s: float = math.inf  # retries due within this long are waited for by the sender
    max_interval_s: float = math.inf  # the longest wait between two attempts
    slot_wait_s: float | None = None  # the longest wait for a slot on the receiver (None: no limit)

    def remaining_s(self) -> float:
        """Seconds left before the retries end."""
        raise NotImplementedError

    async def delivered(self) -> None: ...

    async def failed(self, error: str) -> None:
        """One attempt failed (it is tried again, or given up, next)."""

    async def later(self, delay_s: float) -> None:
        """Not settled: to be tried again in ``delay_s`` (by whoever then holds it)."""

    async def give_up(self, error: str) -> None: ...

    def released(self) -> None:
        """The sender stopped before it settled the delivery."""


class LocalFinal(Final):
    """A delivery retried by the sender alone for ``retry_for_s``; ``done()`` once it is settled
    (delivered, refused, or given up after its retries)."""

    def __init__(self, retry_for_s: float, done: Callable[[], None] | None):
        self._ends = time.monotonic() + retry_for_s
        self._done = done

    def remaining_s(self) -> float:
        return self._ends - time.monotonic()

    async def delivered(self) -> None:
        self._settled()

    async def give_up(self, error: str) -> None:
        self._settled()

    async def later(self, delay_s: float) -> None:
        self._settled()  # nobody else will try it again

    def _settled(self) -> None:
        if self._done is not None:
            try:
                self._done()
            except Exception:
                logger.exception("webhooks: recording a completed delivery failed")


@dataclasses.dataclass
class _Job:
    event: str
    url: str
    snapshot: Callable[[], dict]
    secret: str | None = None  # the prediction's tenant's, when not the sender's own
    final: Final | None = None  # for "completed": how its delivery is settled
    signer: Signer | None = None  # another API's signature headers, in place of the Standard Webhooks one


@dataclasses.dataclass
class _Channel:
    """The pending deliveries of one prediction, sent in order by at most one task."""

    jobs: collections.deque = dataclasses.field(default_factory=collections.deque)
    pending_progress: _Job | None = None  # an output/logs job not yet sent: later ones merge into it
    completed: bool = False  # "completed" was queued: no more events for this prediction
    last_progress: float = -math.inf  # loop time of the last output/logs send
    # Set once completed is queued or the sender closes: cuts a throttle wait short.
    cut_short: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class WebhookSender:
    """Delivers prediction webhooks in the background.

    secret: the signing secret ("whsec_..."); never logged.
    allow_private: when False, refuse URLs whose host resolves to a loopback, private, link-local
        or otherwise non-public address (the delivery is logged and dropped).
    timeout_s: total time allowed for one POST, connect to answer.
    throttle_s: the least time between two output/logs sends of one prediction.
    retry_for_s: how long a failing "completed" delivery keeps being retried.
    user_agent: the user-agent header of every POST.
    backoff_base_s: the first retry delay; each next one doubles (1, 2, 4, 8, ... s by default).
    max_concurrency: the most POSTs in flight at once, all destinations together.
    max_per_destination: the most POSTs in flight at once to one destination (scheme, host, port).
    """

    def __init__(
        self,
        secret: str,
        *,
        allow_private: bool = True,
        timeout_s: float = 10.0,
        throttle_s: float = 0.5,
        retry_for_s: float = 60.0,
        user_agent: str = USER_AGENT,
        backoff_base_s: float = 1.0,
        max_concurrency: int = 64,
        max_per_destination: int = 4,
    ) -> None:
        self._secret = secret
        self._allow_private = allow_private
        self._timeout_s = timeout_s
        self._throttle_s = throttle_s
        self._retry_for_s = retry_for_s
        self._user_agent = user_agent
        self._backoff_base_s = backoff_base_s
        self._max_concurrency = max_concurrency
        self._max_per_destination = max_per_destination
        self._destinations: dict[str, list] = {}  # destination -> [its semaphore, tasks using it]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._channels: dict[str, _Channel] = {}
        self._closing = False
        self.stats = {"delivered": 0, "failed": 0, "retried": 0, "dropped": 0}

    async def start(self) -> None:
        """Open the HTTP client; call inside the running event loop (the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self._max_concurrency)
        # trust_env=False: a proxy from the environment would bypass the private-address check.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=self._timeout_s,
            limits=httpx.Limits(max_connections=self._max_concurrency),
        )

    async def close(self, drain_s: float = 5.0) -> None:
        """Stop taking events; give queued start/completed deliveries up to drain_s, then cancel."""
        self._closing = True
        for channel in self._channels.values():
            channel.cut_short.set()
        tasks = [c.task for c in self._channels.values() if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                logger.warning("webhooks: gave up on %d predictions' deliveries at shutdown", len(pending))
        self._channels.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def notify(
        self,
        prediction_id: str,
        url: str,
        events_filter: list[str] | None,
        event: str,
        snapshot: Callable[[], dict],
        secret: str | None = None,
        done: Callable[[], None] | None = None,
        signer: Signer | None = None,
        final: Final | None = None,
    ) -> None:
        """Queue the webhook for one prediction event; never blocks, never raises.

        events_filter: the events the prediction asked for; None means all of them.
        snapshot: returns the prediction as GET /v1/predictions/{id} shows it; called at send time.
        secret: the signing secret of the prediction's tenant; None signs with the sender's own.
        done: for "completed", called once the delivery is settled: delivered, refused, or given up
            after its retries (not when the sender stops first: it is then still owed).
        signer: for a prediction of another API, the signature headers of a body (replacing the
            Standard Webhooks ``webhook-signature``).
        final: for "completed", how its delivery is settled and retried (replaces ``done``: see
            server.outbox); without it, a LocalFinal of ``retry_for_s`` that calls ``done``.
        Meant for the event loop thread; a call from another thread is handed over to the loop.
        """
        try:
            if self._loop is None or self._client is None or self._closing:
                if events_filter is None or event in events_filter:
                    logger.warning("webhooks: %s event of %s dropped: sender not running", event, prediction_id)
                    self.stats["dropped"] += 1
                return
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if event == COMPLETED and final is None:
                final = LocalFinal(self._retry_for_s, done)
            args = (prediction_id, url, events_filter, event, snapshot, secret, final, signer)
            if on_loop:
                self._enqueue(*args)
            else:
                self._loop.call_soon_threadsafe(self._enqueue_logged, *args)
        except Exception:  # the caller is the prediction lifecycle: a webhook must never break it
            logger.exception("webhooks: %s event of %s not queued", event, prediction_id)

    # -- queueing (event loop thread) ------------------------------------------------------------

    def _enqueue_logged(self, *args) -> None:
        try:
            self._enqueue(*args)
        except Exception:
            logger.exception("webhooks: event not queued")

    def _enqueue(self, prediction_id, url, events_filter, event, snapshot, secret=None, final=None,
                 signer=None) -> None:
        if event not in EVENTS:
            logger.warning("webhooks: unknown event %r for %s ignored", event, prediction_id)
            return
        wanted = events_filter is None or event in events_filter
        if self._closing:
            self.stats["dropped"] += wanted
            if final is not None:
                final.released()
            return
        channel = self._channels.get(prediction_id)
        if channel is None:
            if not wanted:
                return
            channel = self._channels[prediction_id] = _Channel()
        if channel.completed:
            if final is not None:
                final.released()  # already being sent
            return  # nothing follows completed, whether it was sent or filtered out
        job = _Job(event, url, snapshot, secret, final if event == COMPLETED else None, signer)
        if event == COMPLETED:
            channel.completed = True  # even when filtered out: no events follow the end
            if wanted:  # the final body carries everything: pending output/logs sends are moot
                channel.cut_short.set()
                channel.jobs = collections.deque(j for j in channel.jobs if j.event not in _PROGRESS)
                channel.pending_progress = None
                channel.jobs.append(job)
            # else a pending output/logs send still goes out, after its throttle: it has the last state
        elif not wanted:
            return
        elif event in _PROGRESS and channel.pending_progress is not None:
            channel.pending_progress.url = url  # coalesced: the queued send will snapshot the newest state
            channel.pending_progress.snapshot = snapshot
            channel.pending_progress.secret = secret
            channel.pending_progress.signer = signer
            return
        else:
            if event in _PROGRESS:
                channel.pending_progress = job
            channel.jobs.append(job)
        if channel.task is None:
            if channel.jobs:
                channel.task = asyncio.create_task(self._serve(prediction_id, channel))
            elif channel.completed:
                del self._channels[prediction_id]

    # -- sending (one task per prediction with pending deliveries) -------------------------------

    async def _serve(self, prediction_id: str, channel: _Channel) -> None:
        """Send the channel's jobs in order until none are left."""
        job = None
        try:
            while channel.jobs:
                job = channel.jobs.popleft()
                if job.event in _PROGRESS:
                    if not await self._throttle(channel):
                        continue  # completed was queued, or the sender is closing
                    channel.pending_progress = None  # later events make a new send
                    channel.last_progress = asyncio.get_running_loop().time()
                try:
                    await self._deliver(prediction_id, job)
                except Exception:
                    logger.exception("webhooks: %s delivery of %s crashed", job.event, prediction_id)
                job = None
        except asyncio.CancelledError:
            self.stats["dropped"] += len(channel.jobs) + (job is not None)
            for unsettled in [*channel.jobs, job]:
                if unsettled is not None and unsettled.final is not None:
                    unsettled.final.released()
            raise
        finally:
            channel.task = None
            if channel.completed and not channel.jobs:
                self._channels.pop(prediction_id, None)

    async def _throttle(self, channel: _Channel) -> bool:
        """Wait until an output/logs send is allowed; False if it must not be sent at all."""
        wait = channel.last_progress + self._throttle_s - asyncio.get_running_loop().time()
        if wait > 0 and not channel.cut_short.is_set():
            try:
                await asyncio.wait_for(channel.cut_short.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return not channel.cut_short.is_set()

    async def _deliver(self, prediction_id: str, job: _Job) -> None:
        """POST one event; a "completed" one is retried, and settled, as its Final says."""
        loop = asyncio.get_running_loop()
        try:  # the snapshot reads the database: off the event loop
            body = json.dumps(await loop.run_in_executor(None, job.snapshot), separators=(",", ":")).encode()
        except Exception as error:  # the database is away, or snapshot() (the caller's code) failed
            if job.final is not None and not isinstance(job.final, LocalFinal):  # owed: tried again later
                logger.warning("webhooks: completed event of %s not sent now (no snapshot: %s); tried again later",
                               prediction_id, error)
                await job.final.later(self._backoff_base_s)
                return
            logger.warning("webhooks: %s event of %s dropped: no snapshot (%s)", job.event, prediction_id, error)
            self.stats["dropped"] += 1
            if job.final is not None:
                await job.final.give_up(f"no snapshot: {error}")
            return
        # One message per prediction event: a completed event sent again (by another node, after a
        # restart) keeps its webhook-id, by which receivers drop what they already have.
        msg_id = "msg_" + hashlib.sha256(f"{prediction_id}:{job.event}".encode()).hexdigest()[:32] \
            if job.event == COMPLETED else "msg_" + secrets.token_hex(16)
        where = _host_of(job.url)  # the URL itself may carry a token: log only the host
        final = job.final
        attempts = final.attempts if final is not None else 0
        while True:
            try:
                failure = await self._attempt(job.url, msg_id, body, job.secret, job.signer,
                                              slot_wait_s=final.slot_wait_s if final is not None else None)
            except _Refused as refusal:
                logger.warning("webhooks: %s event of %s to %s refused: %s", job.event, prediction_id, where, refusal)
                self.stats["dropped"] += 1
                if final is not None:
                    await final.give_up(f"refused: {refusal}")
                return
            except _NoSlot:
                logger.info("webhooks: completed event of %s waited %g s for a slot on %s; handed back for later",
                            prediction_id, final.slot_wait_s, where)
                await final.later(self._backoff_base_s)
                return
            if failure is None:
                logger.debug("webhooks: %s event of %s delivered to %s", job.event, prediction_id, where)
                self.stats["delivered"] += 1
                if final is not None:
                    await final.delivered()
                return
            if final is None:
                logger.warning("webhooks: %s event of %s to %s failed: %s", job.event, prediction_id, where, failure)
                self.stats["failed"] += 1
                return
            attempts += 1
            final.attempts = attempts
            await final.failed(failure)
            pause = min(self._backoff_base_s * 2 ** (attempts - 1), final.max_interval_s)
            remaining = final.remaining_s()
            if remaining <= 0 or (pause > final.local_retry_s and remaining <= pause):
                logger.warning("webhooks: completed event of %s to %s failed %d times, the last: %s; given up",
                               prediction_id, where, attempts, failure)
                self.stats["failed"] += 1
                await final.give_up(failure)
                return
            self.stats["retried"] += 1
            if pause > final.local_retry_s:
                logger.info("webhooks: completed event of %s to %s failed (%s); retrying in %.0f s", prediction_id,
                            where, failure, pause)
                await final.later(pause)
                return
            pause = min(pause, remaining)
            logger.info("webhooks: %s event of %s to %s failed (%s); retrying in %.1f s",
                        job.event, prediction_id, where, failure, pause)
            await asyncio.sleep(pause)

    async def _attempt(self, url: str, msg_id: str, body: bytes, secret: str | None = None,
                       signer: Signer | None = None, slot_wait_s: float | None = None) -> str | None:
        """POST once: None on a 2xx, else why it failed. Raises _Refused for a forbidden URL, and
        _NoSlot when no slot on the receiver freed within ``slot_wait_s``."""
        try:
            address = await asyncio.wait_for(self._check_destination(url), self._timeout_s)
        except (OSError, asyncio.TimeoutError) as error:  # DNS trouble may pass: a failure, not a refusal
            return f"cannot resolve host ({type(error).__name__})"
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": self._user_agent,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if signer is not None:
            headers.update(signer(body))
        else:
            headers["webhook-signature"] = sign(secret or self._secret, msg_id, timestamp, body)
        # The destination's slot first: a delivery waiting on a slow receiver holds no shared slot.
        async with self._destination_slot(url, slot_wait_s), self._slots:
            try:
                status = await asyncio.wait_for(self._post(url, headers, body, address), self._timeout_s)
            except asyncio.TimeoutError:
                return f"no answer within {self._timeout_s:g} s"
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as error:
                return type(error).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"

    @contextlib.asynccontextmanager
    async def _destination_slot(self, url: str, wait_s: float | None = None):
        """One of the destination's ``max_per_destination`` slots, waited for at most ``wait_s``
        (_NoSlot); forgotten once nobody uses it."""
        key = _destination_of(url)
        entry = self._destinations.get(key)
        if entry is None:
            entry = self._destinations[key] = [asyncio.Semaphore(self._max_per_destination), 0]
        entry[1] += 1
        try:
            try:
                await asyncio.wait_for(entry[0].acquire(), wait_s)
            except asyncio.TimeoutError:
                raise _NoSlot() from None
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._destinations.pop(key, None)

    async def _post(self, url: str, headers: dict, body: bytes, address: str | None = None) -> int:
        # Sent to the address that was checked (no DNS rebinding gap). Streamed so that a
        # receiver's (possibly huge) answer body is never read: only a small one that says its
        # length is, briefly, so that the connection is kept for the next webhook (an unread body
        # closes it, and a new connection per webhook costs both sides more than the webhook).
        target, pin_headers, extensions = pinned_request(url, address)
        async with self._client.stream("POST", target, content=body, headers={**headers, **pin_headers},
                                       extensions=extensions) as response:
            status = response.status_code
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) <= KEEP_BODY_BYTES:
                try:
                    await asyncio.wait_for(response.aread(), KEEP_BODY_S)
                except (asyncio.TimeoutError, httpx.HTTPError, OSError):
                    pass  # the answer stands; only the connection is not kept
            return status

    async def _check_destination(self, url: str) -> str | None:
        """Raise _Refused unless url is http(s) and, without allow_private, every address is public;
        then return the checked address to connect to (None when any address is allowed)."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as error:
            raise _Refused(f"malformed URL ({error})") from None
        if parts.scheme not in ("http", "https") or not host:
            raise _Refused("not an http(s) URL")
        if self._allow_private:
            return
        port = port or (443 if parts.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        address = non_public_address(sockaddr[0] for *_, sockaddr in infos)
        if address is not None:
            raise _Refused(f"{host} resolves to the non-public address {address}")
        if not infos:
            raise OSError("no address")
        return infos[0][4][0]


def _destination_of(url: str) -> str:
    """Where a POST goes: scheme, host and port (the default port filled in)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
    except ValueError:
        return url


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"
