"""The prediction service: create, read, list, cancel, and the one function that moves a status.

Every status change goes through :meth:`PredictionService.transition`, which persists it and then
publishes the event; routes, the worker and the webhook sender never write statuses themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Any

from .admission import Admission
from .events import Hub
from .files import FileStore, new_id
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
from .settings import Settings
from .store import Store, now

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


class PredictionService:
    def __init__(self, settings: Settings, store: Store, files: FileStore, hub: Hub):
        self.settings = settings
        self.store = store
        self.files = files
        self.hub = hub
        self.cancel_requested: set[str] = set()
        self.cancel_reasons: dict[str, str] = {}  # why a running prediction is being canceled, for its logs
        self.deadline_added = asyncio.Event()  # a create with Cancel-After: look at the deadlines again
        self.requeue_requested: set[str] = set()
        self.stopping = False  # the server is shutting down: requests waiting on a prediction are answered
        self.work_available = threading.Condition()
        self.webhooks = None  # a WebhookSender, set by the app

    # -- rendering ----------------------------------------------------------------------------

    def base_for(self, row: dict[str, Any], request_base: str | None = None) -> str:
        return (self.settings.public_url or request_base or row.get("base_url") or "").rstrip("/")

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
                       listing: bool = False) -> list[str] | None:
        names = row.get("output")
        if names is None or row.get("data_removed"):
            return None
        if self.output_form(listing) == "url":
            base = self.base_for(row, request_base)
            return [f"{base}/outputs/{row['id']}/{row['output_token']}/{name}" for name in names]
        uris = [self.files.data_uri(row["id"], name) for name in names]
        return [u for u in uris if u is not None]

    def render(self, row: dict[str, Any], request_base: str | None = None, listing: bool = False) -> Prediction:
        base = self.base_for(row, request_base)
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
            input=row["input"],
            logs=row.get("logs") or "",
            output=self.output_strings(row, request_base, listing),
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

    def snapshot(self, prediction_id: str) -> dict[str, Any]:
        row = self.store.get_prediction(prediction_id)
        return self.render(row).model_dump(mode="json") if row else {}

    # -- create / read ------------------------------------------------------------------------

    def create(self, request: PredictionRequest, admission: Admission, request_base: str,
               owner: str | None) -> dict[str, Any]:
        """Write an admitted prediction to the queue (the input as it was sent) and wake a worker."""
        queued = self.store.count_queued()
        if queued >= self.settings.max_queue:
            raise ApiError(429, f"The server is overloaded: {queued} predictions are waiting. Try again later.",
                           "Too Many Requests", headers={"Retry-After": str(self.seconds_until_a_slot_frees())})
        webhook = request.webhook or request.webhook_completed
        events = request.webhook_events_filter
        if request.webhook is None and request.webhook_completed is not None:
            events = ["completed"]
        pid = new_id()
        created = now()
        self.store.insert_prediction(
            id=pid,
            status=Status.STARTING.value,
            version=admission.version,
            input=request.sent_input,
            logs="",
            created_at=created,
            webhook=webhook,
            webhook_events=list(events) if events is not None else None,
            base_url=request_base,
            output_token=secrets.token_urlsafe(24),
            owner=owner,
            cancel_at=created + admission.cancel_after_s if admission.cancel_after_s is not None else None,
        )
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

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        return self.store.get_prediction(prediction_id)

    def page(self, request_base: str, list_url: str, cursor: str | None, created_after: str | None,
             created_before: str | None) -> PredictionPage:
        window = parse_cursor(cursor)
        try:
            ca = parse_iso(created_after) if created_after else None
            cb = parse_iso(created_before) if created_before else None
        except ValueError:
            raise ApiError(400, "created_after and created_before must be ISO 8601 dates.", "Bad Request") from None
        query = {k: v for k, v in (("created_after", created_after), ("created_before", created_before)) if v}
        page = paginate(lambda **kw: self.store.list_predictions(created_after=ca, created_before=cb, **kw),
                        window, list_url, query)
        return PredictionPage(next=page.next, previous=page.previous,
                              results=[self.render(r, request_base, listing=True) for r in page.rows])

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

    def cancel(self, prediction_id: str, reason: str | None = None) -> dict[str, Any] | None:
        """Cancel a queued prediction at once, a running one at its next denoising step. ``reason``
        goes in its logs (a user's cancel needs none)."""
        row = self.store.get_prediction(prediction_id)
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
        """At startup: what was running when the server stopped runs again, unless it was asked to
        stop (it ends canceled) or it has been interrupted ``--max-attempts`` times already (it fails:
        a prediction that takes its worker down with it must not do so after every restart)."""
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

    def expire(self) -> int:
        """Delete outputs past the retention time and uploads past their expiry."""
        removed = 0
        if self.settings.retention_hours > 0:
            cutoff = now() - self.settings.retention_hours * 3600
            for row in self.store.expired_predictions(cutoff):
                self.files.remove_outputs(row["id"])
                self.store.update_prediction(row["id"], data_removed=1, output=None)
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
