"""The prediction service: create, read, list, cancel, and the one function that moves a status.

Every status change goes through :meth:`PredictionService.transition`, which persists it and then
publishes the event; routes, the worker and the webhook sender never write statuses themselves.

Each prediction belongs to the tenant that made it (:class:`~server.auth.Caller`); another tenant's
prediction is answered as an unknown one. Long input strings are stored apart from the row
(:mod:`server.stored_inputs`); answers about one prediction stream them exactly as sent, list pages
and webhook bodies carry their URLs.
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
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi.responses import Response

from inference.errors import FetchError, InvalidInput
from inference.images import OUTPUT_CONTENT_TYPES, decode_data_uri

from . import stored_inputs
from .admission import Admission
from .auth import ADMIN, Caller
from .bodies import LargeStrings, data_uri_file, text_file
from .events import Hub
from .files import FileStore, disk_guard, is_disk_full, new_id
from .pages import paginate, parse_cursor
from .protocol import (
    MODEL_REF,
    ApiError,
    Metrics,
    Prediction,
    PredictionPage,
    PredictionRequest,
    PredictionUrls,
    Status,
    lone_surrogate_at,
    not_unicode,
)
from .quotas import Quotas
from .settings import Settings
from .store import Store, now
from .stored_inputs import Stored

log = logging.getLogger(__name__)
DEFAULT_PREDICT_S = 10.0  # the run time Retry-After assumes before any prediction has run
DEADLINE_POLL_S = 30.0  # the longest the deadline watcher sleeps without looking
DEADLINE_BATCH = 200  # deadlines looked at in one go


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
    def __init__(self, settings: Settings, store: Store, files: FileStore, hub: Hub):
        self.settings = settings
        self.store = store
        self.files = files
        self.hub = hub
        self.quotas = Quotas(settings, store, files)
        # Keys the input URLs of list pages and webhooks: a prediction's output URL (shared to show a
        # picture) must not also open its inputs.
        self.url_key = bytes.fromhex(store.setting("input_url_key", lambda: secrets.token_hex(32)))
        self.cancel_requested: set[str] = set()
        self.cancel_reasons: dict[str, str] = {}  # why a running prediction is being canceled, for its logs
        self.deadline_added = asyncio.Event()  # a create with Cancel-After: look at the deadlines again
        self.requeue_requested: set[str] = set()
        self.stopping = False  # the server is shutting down: requests waiting on a prediction are answered
        self.work_available = threading.Condition()
        self.webhooks = None  # a WebhookSender, set by the app

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

    def output_strings(self, row: dict[str, Any], request_base: str | None = None,
                       listing: bool = False, body: LargeStrings | None = None) -> list[str] | None:
        """The outputs as URLs or data: URIs (see output_form); with ``body``, data: URIs are
        placeholders that the answer streams from the files."""
        names = row.get("output")
        if names is None or row.get("data_removed"):
            return None
        if self.output_form(listing) == "url":
            base = self.base_for(request_base)
            return [f"{base}/outputs/{row['id']}/{row['output_token']}/{name}" for name in names]
        if body is not None:
            paths = [(self.files.output_path(row["id"], name), name) for name in names]
            return [body.add(data_uri_file(path, OUTPUT_CONTENT_TYPES[name.rsplit(".", 1)[-1]]))
                    for path, name in paths if path is not None]
        uris = [self.files.data_uri(row["id"], name) for name in names]
        return [u for u in uris if u is not None]

    def stored(self, row: dict[str, Any]) -> list[Stored]:
        return [Stored.of(ref) for ref in row.get("input_blobs") or []]

    def input_url(self, row: dict[str, Any], item: Stored, request_base: str | None = None) -> str:
        return f"{self.base_for(request_base)}/inputs/{row['id']}/{self.input_token(row['id'])}/{item.name}"

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
        row = self.store.get_prediction(prediction_id)
        if row is None or row.get("data_removed"):
            return None
        if kind == "outputs":
            if not hmac.compare_digest(token.encode(), row["output_token"].encode()) or name not in (row.get("output") or []):
                return None
            path = self.files.output_path(prediction_id, name)
            return path.read_bytes() if path is not None and path.is_file() else None
        if not hmac.compare_digest(token.encode(), self.input_token(prediction_id).encode()):
            return None
        item = next((s for s in self.stored(row) if s.name == name), None)
        text = self.files.read_input(prediction_id, item.index) if item is not None else None
        if text is None or not text.startswith("data:"):
            return None
        try:
            return decode_data_uri(text, name)
        except FetchError:
            return None

    def shown_input(self, row: dict[str, Any], request_base: str | None = None,
                    body: LargeStrings | None = None) -> dict[str, Any]:
        """The input as answered: exactly as sent, its stored strings streamed into ``body``; or,
        without a body, with their URLs in their place. Empty once retention removed the data."""
        if row.get("data_removed"):
            return {}
        stored = self.stored(row)
        if not stored:
            return row["input"]
        if body is not None:
            return stored_inputs.fill(row["input"], stored,
                                      lambda item: body.add(text_file(self.files.input_path(row["id"], item.index))))
        return stored_inputs.fill(row["input"], stored, lambda item: self.input_url(row, item, request_base))

    def worker_input(self, row: dict[str, Any]) -> dict[str, Any]:
        """The whole input, as sent, for the worker to run; a stored string that is gone fails it in words."""
        def read(item: Stored) -> str:
            text = self.files.read_input(row["id"], item.index)
            if text is None:
                raise InvalidInput.one(item.name, "missing", f"{item.name} is no longer stored on this server")
            return text

        return stored_inputs.fill(row["input"], self.stored(row), read)

    def resolver_for(self, row: dict[str, Any]) -> Callable[[str], bytes | None]:
        """Resolves this server's file URLs in the prediction's input: its own tenant's files only
        (an admin's, or a server without tokens, any)."""
        owner = row.get("owner")

        def resolve(value: str) -> bytes | None:
            found = self.files.resolve(value, lambda file_owner: owner in (None, ADMIN) or file_owner == owner)
            return found if found is not None else self.own_url_bytes(value)

        return resolve

    def render(self, row: dict[str, Any], request_base: str | None = None, listing: bool = False,
               body: LargeStrings | None = None) -> Prediction:
        """The prediction as answered. With ``body`` (not a list page), the input is the one sent and
        its long strings and data: outputs are streamed by the answer; without, long input strings
        are URLs (list pages, webhook bodies)."""
        base = self.base_for(request_base)
        pid = row["id"]
        status = Status(row["status"])
        metrics = None
        if status.terminal and row.get("completed_at"):
            metrics = Metrics(
                predict_time=round(row["predict_time"], 6) if row.get("predict_time") is not None else None,
                total_time=round(row["completed_at"] - row["created_at"], 6),
            )
        return Prediction(
            id=pid,
            model=MODEL_REF,
            version=row["version"],
            input=self.shown_input(row, request_base, None if listing else body),
            logs=row.get("logs") or "",
            output=self.output_strings(row, request_base, listing, body),
            data_removed=bool(row.get("data_removed")),
            error=row.get("error"),
            status=status,
            created_at=iso(row["created_at"]),
            started_at=iso(row.get("started_at")),
            completed_at=iso(row.get("completed_at")),
            urls=PredictionUrls(
                get=f"{base}/v1/predictions/{pid}",
                cancel=f"{base}/v1/predictions/{pid}/cancel",
                web=f"{base}/?prediction={pid}",
                stream=f"{base}/v1/predictions/{pid}/stream",
            ),
            metrics=metrics,
        )

    def respond(self, row: dict[str, Any], request_base: str, status_code: int = 200,
                headers: dict[str, str] | None = None, status: Status | None = None) -> Response:
        """One prediction as an answer (create, get, cancel): the input exactly as sent, streamed."""
        body = LargeStrings()
        prediction = self.render(row, request_base, body=body)
        if status is not None:
            prediction.status = status
        return body.response(prediction.model_dump(mode="json"), status_code, headers)

    def snapshot(self, prediction_id: str) -> dict[str, Any]:
        """A webhook body: the prediction, with long input strings as URLs."""
        row = self.store.get_prediction(prediction_id)
        return self.render(row).model_dump(mode="json") if row else {}

    # -- create / read ------------------------------------------------------------------------

    def create(self, request: PredictionRequest, admission: Admission, caller: Caller) -> dict[str, Any]:
        """Write an admitted prediction to the queue (the input as it was sent, its long strings in
        files of their own) and wake a worker."""
        queued = self.store.count_queued()
        if queued >= self.settings.max_queue:
            raise ApiError(429, f"The server is overloaded: {queued} predictions are waiting. Try again later.",
                           "Too Many Requests", headers={"Retry-After": str(self.seconds_until_a_slot_frees())})
        self.quotas.check_queue(caller, self.seconds_until_a_slot_frees)
        inline, stored, values = stored_inputs.split(request.sent_input)
        self.quotas.check_room(caller, sum(map(stored_inputs.utf8_size, values)))
        webhook = request.webhook or request.webhook_completed
        events = request.webhook_events_filter
        if request.webhook is None and request.webhook_completed is not None:
            events = ["completed"]
        pid = new_id()
        created = now()
        with disk_guard():
            sizes = self.files.write_inputs(pid, values)
            try:
                self.store.insert_prediction(
                    id=pid,
                    status=Status.STARTING.value,
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
                )
            except BaseException:
                self.files.remove_inputs(pid)
                raise
        with self.work_available:
            self.work_available.notify()
        if admission.cancel_after_s is not None:
            self.deadline_added.set()
        return self.store.get_prediction(pid)

    def seconds_until_a_slot_frees(self) -> int:
        """An honest Retry-After for a full queue: the next queued prediction starts (and frees a
        place in the queue) when a running one ends, about one mean run time per worker."""
        mean = self.store.mean_predict_time() or DEFAULT_PREDICT_S
        return max(1, math.ceil(mean / max(1, len(self.settings.gpus))))

    def get(self, prediction_id: str, caller: Caller | None = None) -> dict[str, Any] | None:
        """The prediction's row; None when unknown, or another tenant's when ``caller`` is given."""
        row = self.store.get_prediction(prediction_id)
        if row is None or (caller is not None and not caller.sees(row.get("owner"))):
            return None
        return row

    def page(self, caller: Caller, request_base: str, list_url: str, cursor: str | None, created_after: str | None,
             created_before: str | None) -> Response:
        """A list page of the caller's predictions (an admin's: everyone's); data: outputs, when
        --output-urls data asks for them in pages, are streamed from their files."""
        window = parse_cursor(cursor)
        try:
            ca = parse_iso(created_after) if created_after else None
            cb = parse_iso(created_before) if created_before else None
        except ValueError:
            raise ApiError(400, "created_after and created_before must be ISO 8601 dates.", "Bad Request") from None
        query = {k: v for k, v in (("created_after", created_after), ("created_before", created_before)) if v}
        page = paginate(lambda **kw: self.store.list_predictions(created_after=ca, created_before=cb,
                                                                 owner=caller.scope, **kw),
                        window, list_url, query)
        body = LargeStrings()
        listed = PredictionPage(next=page.next, previous=page.previous,
                                results=[self.render(r, request_base, listing=True, body=body) for r in page.rows])
        return body.response(listed.model_dump(mode="json"))

    async def wait(self, prediction_id: str, timeout: float) -> dict[str, Any]:
        """Wait until the prediction is terminal, ``timeout`` seconds pass or the server begins to
        stop; return its row."""
        queue = self.hub.subscribe(prediction_id)
        try:
            deadline = time.monotonic() + timeout
            while True:
                row = self.store.get_prediction(prediction_id)
                if row is None or Status(row["status"]).terminal or self.stopping:
                    return row
                left = deadline - time.monotonic()
                if left <= 0:
                    return row
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

    def cancel(self, prediction_id: str, reason: str | None = None, caller: Caller | None = None) -> dict[str, Any] | None:
        """Cancel a queued prediction at once, a running one at its next denoising step. ``reason``
        goes in its logs (a user's cancel needs none). Another tenant's prediction is unknown (None)."""
        row = self.get(prediction_id, caller)
        if row is None:
            return None
        status = Status(row["status"])
        if status == Status.STARTING:
            logs = (row.get("logs") or "") + (f"{reason}\n" if reason else "")
            if self.transition(prediction_id, Status.CANCELED, only_if=(Status.STARTING,), logs=logs):
                return self.store.get_prediction(prediction_id)
            status = Status(self.store.get_prediction(prediction_id)["status"])
        if status == Status.PROCESSING:
            if reason:
                self.cancel_reasons.setdefault(prediction_id, reason)
            self.cancel_requested.add(prediction_id)
            self.store.request_cancel(prediction_id, now())  # a restart before it stops ends it canceled
        return self.store.get_prediction(prediction_id)

    async def watch_deadlines(self) -> None:
        """Cancel each prediction whose Cancel-After deadline passes, queued or running. Runs on the
        event loop for the server's life; the database is the record of the deadlines."""
        while True:
            try:
                wait = self.enforce_deadlines(now())
            except Exception:
                log.exception("checking Cancel-After deadlines failed")
                wait = DEADLINE_POLL_S
            self.deadline_added.clear()
            try:
                await asyncio.wait_for(self.deadline_added.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def enforce_deadlines(self, at: float) -> float:
        """Cancel the predictions due at ``at``; return the seconds until the next deadline."""
        rows = self.store.deadlines(limit=DEADLINE_BATCH)
        for row in rows:
            if row["id"] in self.cancel_requested:
                continue  # already being stopped
            if row["cancel_at"] > at:
                return min(DEADLINE_POLL_S, max(0.01, row["cancel_at"] - at))
            after = f"{row['cancel_at'] - row['created_at']:g} s"
            if row["status"] == Status.STARTING.value:
                reason = f"Canceled: the Cancel-After deadline ({after} after creation) passed before the prediction started."
            else:
                reason = f"Canceled: the Cancel-After deadline ({after} after creation) passed while the prediction was running."
            self.cancel(row["id"], reason)
        return 0.0 if len(rows) == DEADLINE_BATCH else DEADLINE_POLL_S  # a full batch: more may be due

    # -- the lifecycle ------------------------------------------------------------------------

    def transition(self, prediction_id: str, status: Status, *, only_if: tuple[Status, ...] | None = None,
                   **fields: Any) -> bool:
        """Move a prediction to ``status`` (persisted first), then tell listeners."""
        if status.terminal:
            fields.setdefault("completed_at", now())
        if fields.get("output"):
            fields.setdefault("output_bytes", self.files.outputs_size(prediction_id, fields["output"]))
        changed = self.store.update_prediction(
            prediction_id,
            only_if_status=tuple(s.value for s in only_if) if only_if else None,
            status=status.value,
            **fields,
        )
        if not changed:
            return False
        if status.terminal:
            self.cancel_requested.discard(prediction_id)
            self.cancel_reasons.pop(prediction_id, None)
            if fields.get("output"):
                self.hub.publish(prediction_id, "output")
            self.hub.publish(prediction_id, "completed")
        elif status == Status.PROCESSING:
            self.hub.publish(prediction_id, "start")
        return True

    def append_logs(self, prediction_id: str, logs: str) -> None:
        self.store.update_prediction(prediction_id, logs=logs)
        self.hub.publish(prediction_id, "logs")

    def recover(self) -> list[str]:
        """At startup: move long inputs of predictions written before they were stored apart out of
        their rows, drop the stored inputs of creates that never wrote their row (a crash between
        the two); then what was running when the server stopped runs again, unless it was asked to
        stop (it ends canceled) or it has been interrupted ``--max-attempts`` times already (it fails:
        a prediction that takes its worker down with it must not do so after every restart)."""
        self.store_inputs_apart()
        for pid in self.files.stored_input_ids():
            if self.store.get_delivery(pid) is None:
                self.files.remove_inputs(pid)
        for row in self.store.interrupted():
            pid, logs = row["id"], row["logs"] or ""
            if row["cancel_requested_at"] is not None:
                self.transition(pid, Status.CANCELED, only_if=(Status.PROCESSING,),
                                logs=logs + "The server restarted after this prediction was canceled; it does not run again.\n")
                log.warning("prediction %s was canceled before a restart; it ends canceled", pid)
            elif row["attempts"] >= self.settings.max_attempts:
                error = interrupted_too_often(row["attempts"])
                self.transition(pid, Status.FAILED, only_if=(Status.PROCESSING,), error=error,
                                logs=logs + f"Error: {error}\n")
                log.warning("prediction %s was interrupted %d times; it fails", pid, row["attempts"])
        ids = self.store.requeue_interrupted()
        for pid in ids:
            log.warning("prediction %s was interrupted by a restart; it runs again", pid)
        return ids

    def store_inputs_apart(self) -> int:
        """Rows written before inputs were stored apart: their long strings go to files, one row at a
        time, and the database is compacted once if any moved."""
        ids = self.store.inline_inputs(stored_inputs.INLINE_LIMIT)
        for pid in ids:
            row = self.store.get_prediction(pid)
            if not isinstance(row["input"], dict):
                self.store.update_prediction(pid, input_blobs=[])
                continue
            inline, stored, values = stored_inputs.split(row["input"])
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
            cutoff = now() - self.settings.retention_hours * 3600
            for pid in self.store.expired_predictions(cutoff):
                self.files.remove_outputs(pid)
                self.files.remove_inputs(pid)
                self.store.remove_data(pid)
                removed += 1
        for f in self.store.expired_files(now()):
            self.files.delete_upload(f["id"])
        return removed


def interrupted_too_often(attempts: int) -> str:
    return (f"This prediction was interrupted {attempts} times while it ran (the server stopped or was killed "
            "each time), so it is not run again.")


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
