"""The prediction service: what every API's routes ask of predictions (create, read, list, wait,
cancel), and their inputs and outputs as URLs or data: URIs for any API's answer (Replicate's
answers: :mod:`server.replicate.answers`). Statuses are moved by :mod:`server.lifecycle` alone; this service
checks and writes a create's inputs, then hands it to the lifecycle.

Each prediction belongs to the tenant that made it (:class:`~server.auth.Caller`); another tenant's
prediction is answered as an unknown one. Long input strings are stored apart from the record
(:mod:`server.stored_inputs`); answers about one prediction stream them exactly as sent, list pages
and webhook bodies carry their URLs.

Its length: the create's checks and writes, reads, waits, cancels, recovery and retention are the
service's one job (what routes ask of predictions); rendering an answer is each API's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit


from inference.engine import MASK_NAME
from inference.errors import FetchError, InvalidInput
from inference.images import OUTPUT_CONTENT_TYPES, decode_data_uri

from . import stored_inputs
from .adapters import EngineJob, FileReader, WorkerSide
from .admission import Admission
from .auth import ADMIN, Caller
from .bodies import LargeStrings, data_uri_file, text_file
from .events import COMPLETED, Hub
from .files import FileStore, disk_guard, is_disk_full, new_id
from .lifecycle import Lifecycle
from .protocol import ApiError, InvalidField, PredictionRequest, lone_surrogate_at, not_unicode, validation_failed
from .quotas import Quotas
from .records import PredictionRecord, PreviewRecord
from .settings import Settings
from .store import DatabaseUnavailable, QuotaExceeded, Store
from .stored_inputs import Stored
from .streaming import StreamReads

NO_SEGMENTER_HERE = ("this server has no segmenter to select a mask by words (mask_prompt): start it with --segmenter "
                     "(tiny: the demo models; or a SAM folder and a Grounding DINO folder, see weights.md), or send a "
                     "mask")

log = logging.getLogger(__name__)
ORPHAN_INPUTS_S = 3600.0  # on a shared database, stored inputs without a row this old are a crash's
DEFAULT_PREDICT_S = 10.0  # the run time Retry-After assumes before any prediction has run
RETENTION_BATCH = 1000  # predictions a retention sweep reads at a time


def has_mask(record: PredictionRecord) -> bool:
    """Whether a mask_prompt's mask is kept beside the prediction's outputs (its run succeeded)."""
    return bool((record.input or {}).get("mask_prompt")) and record.output is not None and not record.data_removed


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(value: str) -> float:
    text = value.strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


# This server's output and input URLs, under any prefix: /outputs/<id>/<token>/<name>, /inputs/...
_OWN_URL = re.compile(r"/(outputs|inputs)/([A-Za-z0-9]+)/([A-Za-z0-9_-]+)/([A-Za-z0-9._-]+)$")


class PredictionService:
    def __init__(self, settings: Settings, store: Store, files: FileStore, hub: Hub,
                 lifecycle: Lifecycle | None = None):
        self.settings = settings
        self.store = store
        self.files = files
        self.hub = hub
        self.lifecycle = lifecycle or Lifecycle(settings, store, files, hub)
        self.quotas = Quotas(settings, store, files)
        # Keys the input URLs of list pages and webhooks: a prediction's output URL (shared to show a
        # picture) must not also open its inputs.
        self.url_key = bytes.fromhex(store.setting("input_url_key", lambda: secrets.token_hex(32)))
        self.stopping = False  # the server is shutting down: requests waiting on a prediction are answered
        self.stream_reads = StreamReads(self)  # what this node's streams and waiting requests read, once per event
        # The other APIs' adapters, by the ``api`` of the predictions they make: how a worker runs them
        # (see server.adapters). Registered by the app; Replicate's predictions have none.
        self.adapters: dict[str, WorkerSide] = {}

    # -- rendering ----------------------------------------------------------------------------

    def base_for(self, request_base: str | None = None) -> str:
        """The base of the URLs in an answer: --public-url, else the request's own base. An answer
        made without a request (a webhook body) uses the address the server is bound to; nothing
        taken from a request's Host is ever stored."""
        return (self.settings.public_url or request_base or self.settings.bind_url).rstrip("/")

    def output_form(self, listing: bool) -> str:
        """"url" or "data": how outputs are written in a response (see --output-urls). The clients
        read files only from https: and data: strings, so a single prediction on plain http carries
        data: URIs; a list page carries URLs, which keeps a page of 100 predictions small."""
        mode = self.settings.output_urls
        if mode != "auto":
            return mode
        public = self.settings.public_url
        if public and public.startswith("https:"):
            return "url"
        return "url" if listing else "data"

    def output_strings(self, record: PredictionRecord, request_base: str | None = None,
                       listing: bool = False, body: LargeStrings | None = None) -> list[str] | None:
        """The outputs as URLs or data: URIs (see output_form); with ``body``, data: URIs are
        placeholders that the answer streams from the files."""
        names = record.output
        if names is None or record.data_removed:
            return None
        if self.output_form(listing) == "url":
            base = self.base_for(request_base)
            return [self.output_url(record, name, base) for name in names]
        if body is not None:
            paths = [(self.files.output_path(record.id, name, record.output_run), name) for name in names]
            return [body.add(data_uri_file(path, OUTPUT_CONTENT_TYPES[name.rsplit(".", 1)[-1]]))
                    for path, name in paths if path is not None]
        uris = [self.files.data_uri(record.id, name, record.output_run) for name in names]
        return [u for u in uris if u is not None]

    def serves_output(self, record: PredictionRecord, name: str) -> bool:
        """Whether ``name`` is a file of the prediction's outputs: an output, or the mask its mask_prompt made."""
        return name in (record.output or []) or (name == MASK_NAME and has_mask(record))

    def mask_url(self, record: PredictionRecord, request_base: str | None = None) -> str | None:
        """Where the mask a mask_prompt made is served, once its run succeeded (None otherwise)."""
        return self.output_url(record, MASK_NAME, self.base_for(request_base)) if has_mask(record) else None

    def output_url(self, record: PredictionRecord, name: str, base: str) -> str:
        """Where this server serves one output: no token, an unguessable URL (server.replicate.files)."""
        return f"{base}/outputs/{record.id}/{record.output_token}/{name}"

    def stored(self, record: PredictionRecord) -> list[Stored]:
        return [Stored.of(ref) for ref in record.input_blobs]

    def input_url(self, record: PredictionRecord, item: Stored, request_base: str | None = None) -> str:
        return f"{self.base_for(request_base)}/inputs/{record.id}/{self.input_token(record.id)}/{item.name}"

    def input_token(self, prediction_id: str) -> str:
        """The unguessable part of a prediction's input URLs: its own, not its outputs'."""
        return hmac.new(self.url_key, f"{prediction_id}/inputs".encode(), hashlib.sha256).hexdigest()[:32]

    def own_url_bytes(self, value: str) -> bytes | None:
        """The bytes behind one of this server's output or input URLs (a list page's links, say), read
        where they lie rather than fetched from this server, which refuses its own fetches; None for
        anything else. Both kinds are capabilities: whoever holds the URL may read it."""
        match = _OWN_URL.search(urlsplit(value).path)
        if not match:
            return None
        kind, prediction_id, token, name = match.groups()
        record = self.store.get_prediction(prediction_id)
        if record is None or record.data_removed:
            return None
        if kind == "outputs":
            if not hmac.compare_digest(token.encode(), record.output_token.encode()) or not self.serves_output(record, name):
                return None
            path = self.files.output_path(prediction_id, name, record.output_run)
            return path.read_bytes() if path is not None and path.is_file() else None
        if not hmac.compare_digest(token.encode(), self.input_token(prediction_id).encode()):
            return None
        item = next((s for s in self.stored(record) if s.name == name), None)
        text = self.files.read_input(prediction_id, item.index) if item is not None else None
        if text is None or not text.startswith("data:"):
            return None
        try:
            return decode_data_uri(text, name)
        except FetchError:
            return None

    def shown_input(self, record: PredictionRecord, request_base: str | None = None,
                    body: LargeStrings | None = None) -> dict[str, Any]:
        """The input as answered: exactly as sent, its stored strings streamed into ``body``; or,
        without a body, with their URLs in their place. Empty once retention removed the data."""
        if record.data_removed:
            return {}
        stored = self.stored(record)
        if not stored:
            return record.input
        if body is not None:
            return stored_inputs.fill(record.input, stored,
                                      lambda item: body.add(text_file(self.files.input_path(record.id, item.index))))
        return stored_inputs.fill(record.input, stored, lambda item: self.input_url(record, item, request_base))

    def worker_input(self, record: PredictionRecord) -> dict[str, Any]:
        """The whole input, as sent, for the worker to run; a stored string that is gone fails it in words."""
        def read(item: Stored) -> str:
            text = self.files.read_input(record.id, item.index)
            if text is None:
                raise InvalidInput.one(item.name, "missing", f"{item.name} is no longer stored on this server")
            return text

        return stored_inputs.fill(record.input, self.stored(record), read)

    def job(self, record: PredictionRecord, read: FileReader, log: Callable[[str], None]) -> EngineJob:
        """A claimed prediction as the worker runs it: its input as sent, or, for a prediction another
        API's adapter made, what that adapter prepares from it (on the worker: see server.adapters)."""
        sent = self.worker_input(record)
        adapter = self.adapters.get(record.api) if record.api else None
        if adapter is None:
            return EngineJob(input=sent)
        return adapter.prepare(record, sent, read, log)

    def keep_facts(self, run: PredictionRecord, facts: dict[str, Any]) -> None:
        """Facts of a run an adapter keeps (OpenAI's usage), merged into its ``api_data`` while the
        run holds the prediction."""
        if facts:
            self.store.update_prediction(run.id, held_by=run.lease, api_data={**(run.api_data or {}), **facts})

    def resolver_for(self, record: PredictionRecord) -> Callable[[str], bytes | None]:
        """Resolves this server's file URLs in the prediction's input: its own tenant's files only
        (an admin's, or a server without tokens, any)."""
        return self.resolver_of(record.owner)

    def resolver_of(self, owner: str | None) -> Callable[[str], bytes | None]:
        """Resolves this server's file URLs as ``owner`` may read them: its own files only (an
        admin, or the one tenant of a server without tokens, any)."""

        def resolve(value: str) -> bytes | None:
            found = self.files.resolve(value, lambda file_owner: owner in (None, ADMIN) or file_owner == owner)
            return found if found is not None else self.own_url_bytes(value)

        return resolve

    # -- create / read ------------------------------------------------------------------------

    def create(self, request: PredictionRequest, admission: Admission, caller: Caller, *,
               api: str | None = None, api_data: dict[str, Any] | None = None,
               prediction_id: str | None = None) -> PredictionRecord:
        """Write an admitted prediction to the queue (the input as it was sent, its long strings in
        files of their own) and wake a worker. ``api`` and ``api_data``: the other API (OpenAI's,
        BFL's) whose adapter made the request, and what it keeps to answer in that API's shape.
        ``prediction_id``: the id the client chose (Cog's API, its form checked there); a new one
        when None. An id already taken is 409 and nothing is written."""
        if request.sent_input.get("mask_prompt") and not self.settings.segmenter:
            raise validation_failed([InvalidField(type="unavailable", field="input.mask_prompt",
                                                  description=NO_SEGMENTER_HERE)])
        if prediction_id is not None and self.store.get_prediction(prediction_id) is not None:
            raise ApiError(409, f"A prediction with the id {prediction_id} exists already.", "Conflict")
        self.check_queue(caller)
        inline, stored, values = stored_inputs.split(request.sent_input)
        self.quotas.check_room(caller, sum(map(stored_inputs.utf8_size, values)))
        webhook = request.webhook or request.webhook_completed
        events = request.webhook_events_filter
        if request.webhook is None and request.webhook_completed is not None:
            events = [COMPLETED]
        pid = prediction_id or new_id()
        created = self.store.now()
        with disk_guard():
            sizes = self.files.write_inputs(pid, values)
            # Checked again as the row is written, under the tenant's lock: creates racing on other
            # nodes cannot pass its limits together.
            limits = self.quotas.limits(caller, adds_queued=1, adds_bytes=sum(sizes))
            try:
                return self.lifecycle.create(
                    limits=limits,
                    id=pid,
                    version=admission.version,
                    input=inline,
                    input_blobs=[item.ref() for item in stored],
                    input_bytes=sum(sizes),
                    logs="",
                    created_at=created,
                    webhook=webhook,
                    webhook_events=list(events) if events is not None else None,
                    output_token=secrets.token_urlsafe(24),
                    owner=caller.tenant,
                    cancel_at=created + admission.cancel_after_s if admission.cancel_after_s is not None else None,
                    api=api,
                    api_data=api_data,
                )
            except QuotaExceeded as exc:
                self.files.remove_inputs(pid)
                raise self.quotas.refusal(exc, limits, self.seconds_until_a_slot_frees) from None
            except BaseException:
                # A chosen id another node took meanwhile: its files are that prediction's now.
                if prediction_id is None or self.store.get_prediction(pid) is None:
                    self.files.remove_inputs(pid)
                raise

    def check_queue(self, caller: Caller) -> None:
        """Room in the queue for one more of ``caller``'s predictions: the server's (--max-queue), then
        the tenant's; 429 with a Retry-After otherwise. Adapters ask it before they read a picture."""
        queued = self.store.count_queued()
        if queued >= self.settings.max_queue:
            raise ApiError(429, f"The server is overloaded: {queued} predictions are waiting. Try again later.",
                           "Too Many Requests", headers={"Retry-After": str(self.seconds_until_a_slot_frees())})
        self.quotas.check_queue(caller, self.seconds_until_a_slot_frees)

    def seconds_until_a_slot_frees(self) -> int:
        """An honest Retry-After for a full queue: the next queued prediction starts (and frees a
        place in the queue) when a running one ends, about one mean run time per worker."""
        mean = self.store.mean_predict_time() or DEFAULT_PREDICT_S
        return max(1, math.ceil(mean / max(1, len(self.settings.gpus))))

    def get(self, prediction_id: str, caller: Caller | None = None) -> PredictionRecord | None:
        """The prediction's record; None when unknown, or another tenant's when ``caller`` is given."""
        record = self.store.get_prediction(prediction_id)
        if record is None or (caller is not None and not caller.sees(record.owner)):
            return None
        return record

    def preview(self, prediction_id: str, caller: Caller | None = None) -> PreviewRecord | None:
        """The latest preview of a running prediction the caller may see; None if there is none. A
        reader is a watcher: the next previews are made for it (while it keeps asking)."""
        record = self.get(prediction_id, caller)
        if record is None:
            return None
        if not record.terminal:
            self.lifecycle.watch_previews(prediction_id, seconds=10.0)
        return self.store.get_preview(prediction_id)

    async def wait(self, prediction_id: str, timeout: float,
                   last: PredictionRecord | None = None) -> PredictionRecord | None:
        """Wait until the prediction is terminal, ``timeout`` seconds pass or the server begins to
        stop; return its record (read once per event for every waiting request of this node). While
        the database is away, the record last read (``last`` at first) is the answer."""
        queue = self.hub.subscribe(prediction_id)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    record = (await self.stream_reads.seen.get(prediction_id)).record
                    last = record
                except DatabaseUnavailable:
                    record = last
                    if record is None:
                        raise
                if record is None or record.status.terminal or self.stopping:
                    return record
                left = deadline - time.monotonic()
                if left <= 0:
                    return record
                try:
                    await asyncio.wait_for(queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.hub.unsubscribe(prediction_id, queue)

    def stop_waiting(self) -> None:
        """On the loop, when a shutdown begins: answer every request waiting on a prediction now
        (``Prefer: wait`` gets the prediction as it stands), rather than when the server is gone."""
        self.stopping = True
        self.hub.wake_all()

    # -- cancel -------------------------------------------------------------------------------

    def cancel(self, prediction_id: str, caller: Caller | None = None) -> PredictionRecord | None:
        """Cancel a queued prediction at once, a running one at its next denoising step (see
        Lifecycle.cancel). Another tenant's prediction is unknown (None)."""
        if self.get(prediction_id, caller) is None:
            return None
        return self.lifecycle.cancel(prediction_id)

    # -- at startup and in the background -----------------------------------------------------

    def recover(self) -> list[str]:
        """At startup: move long inputs of predictions written before they were stored apart out of
        their rows, drop the stored inputs of creates that never wrote their row (a crash between
        the two); then the lifecycle settles what was running when the server stopped (see
        Lifecycle.recover). The ids queued again."""
        self.store_inputs_apart()
        # On a shared database another node may be between writing a create's inputs and its row.
        settled = time.time() - ORPHAN_INPUTS_S if self.store.shared else None
        for pid in self.files.stored_input_ids():
            if self.store.get_prediction(pid) is None and (settled is None or self.files.inputs_written_at(pid) < settled):
                self.files.remove_inputs(pid)
        return self.lifecycle.recover()

    def store_inputs_apart(self) -> int:
        """Rows written before inputs were stored apart: their long strings go to files, one record at a
        time, and the database is compacted once if any moved."""
        ids = self.store.inline_inputs(stored_inputs.INLINE_LIMIT)
        for pid in ids:
            record = self.store.get_prediction(pid)
            if not isinstance(record.input, dict):
                self.store.update_prediction(pid, input_blobs=[])
                continue
            inline, stored, values = stored_inputs.split(record.input)
            try:
                sizes = self.files.write_inputs(pid, values)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                # The rest stay in their rows, where they work as before; the next start goes on.
                log.warning("too little disk to move the long inputs out of the database; %d rows keep theirs",
                            len(ids) - ids.index(pid))
                break
            self.store.update_prediction(pid, input=inline, input_blobs=[item.ref() for item in stored],
                                         input_bytes=sum(sizes))
        if ids:
            log.info("moved the long inputs of %d predictions out of the database", len(ids))
            try:
                self.store.vacuum()
            except Exception as exc:  # e.g. too little disk to rewrite it: it stays as large, and works
                log.warning("could not compact the database: %s", exc)
        return len(ids)

    def expire(self) -> int:
        """Delete outputs and stored inputs past the retention time (the input is then {}, as on
        Replicate) and uploads past their expiry."""
        removed = 0
        if self.settings.retention_hours > 0:
            cutoff = self.store.now() - self.settings.retention_hours * 3600
            while True:  # a batch at a time: each statement stays small however many are due
                due = self.store.expired_predictions(cutoff, limit=RETENTION_BATCH)
                for pid in due:
                    self.files.remove_outputs(pid)
                    self.files.remove_inputs(pid)
                    self.store.remove_data(pid)
                    removed += 1
                if len(due) < RETENTION_BATCH:
                    break
        for f in self.store.expired_files(self.store.now()):
            self.files.delete_upload(f.id)
        self.files.sweep()  # copies of files another node removed (files kept in the database)
        self.store.drop_stale_previews()
        return removed


def decode_metadata(raw: str | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ApiError(422, "metadata must be a JSON object", "Input validation failed") from None
    if not isinstance(value, dict):
        raise ApiError(422, "metadata must be a JSON object", "Input validation failed")
    bad = lone_surrogate_at(value, "metadata")
    if bad:
        raise not_unicode(bad)
    return value
