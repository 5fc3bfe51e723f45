"""Predictions as Replicate's API answers them: one prediction (create, get, cancel), a list page,
and the body of a webhook."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from ..auth import Caller
from ..bodies import LargeStrings
from ..pages import paginate, parse_cursor
from ..predictions import PredictionService, iso, parse_iso
from ..protocol import MODEL_REF, ApiError, Metrics, Prediction, PredictionPage, PredictionUrls, Status
from ..records import PredictionRecord


def render(service: PredictionService, record: PredictionRecord, request_base: str | None = None,
           listing: bool = False, body: LargeStrings | None = None) -> Prediction:
    """The prediction as answered. With ``body`` (not a list page), the input is the one sent and
    its long strings and data: outputs are streamed by the answer; without, long input strings
    are URLs (list pages, webhook bodies)."""
    base = service.base_for(request_base)
    pid = record.id
    status = record.status
    metrics = None
    if status.terminal and record.completed_at:
        metrics = Metrics(
            predict_time=round(record.predict_time, 6) if record.predict_time is not None else None,
            total_time=round(record.completed_at - record.created_at, 6),
        )
    return Prediction(
        id=pid,
        model=MODEL_REF,
        version=record.version,
        input=service.shown_input(record, request_base, None if listing else body),
        logs=record.logs,
        output=service.output_strings(record, request_base, listing, body),
        data_removed=bool(record.data_removed),
        error=record.error,
        status=status,
        created_at=iso(record.created_at),
        started_at=iso(record.started_at),
        completed_at=iso(record.completed_at),
        urls=PredictionUrls(
            get=f"{base}/v1/predictions/{pid}",
            cancel=f"{base}/v1/predictions/{pid}/cancel",
            web=f"{base}/?prediction={pid}",
            stream=f"{base}/v1/predictions/{pid}/stream",
            **({"mask": mask} if (mask := service.mask_url(record, request_base)) else {}),
        ),
        metrics=metrics,
        api=record.api or "replicate",
    )


def respond(service: PredictionService, record: PredictionRecord, request_base: str, status_code: int = 200,
            headers: dict[str, str] | None = None, status: Status | None = None) -> Response:
    """One prediction as an answer (create, get, cancel): the input exactly as sent, streamed."""
    body = LargeStrings()
    prediction = render(service, record, request_base, body=body)
    if status is not None:
        prediction.status = status
        if status is Status.STARTING:  # shown as it was queued, even if a worker took it since
            prediction.started_at = None
    return body.response(prediction.model_dump(mode="json"), status_code, headers)


def webhook_body(service: PredictionService, record: PredictionRecord) -> dict[str, Any]:
    """A webhook body: the prediction, with long input strings as URLs."""
    return render(service, record).model_dump(mode="json")


def page(service: PredictionService, caller: Caller, request_base: str, list_url: str, cursor: str | None,
         created_after: str | None, created_before: str | None) -> Response:
    """A list page of the caller's predictions (an admin's: everyone's); data: outputs, when
    --output-urls data asks for them in pages, are streamed from their files."""
    window = parse_cursor(cursor)
    try:
        ca = parse_iso(created_after) if created_after else None
        cb = parse_iso(created_before) if created_before else None
    except ValueError:
        raise ApiError(400, "created_after and created_before must be ISO 8601 dates.", "Bad Request") from None
    query = {k: v for k, v in (("created_after", created_after), ("created_before", created_before)) if v}
    listed_page = paginate(lambda **kw: service.store.list_predictions(created_after=ca, created_before=cb,
                                                                       owner=caller.scope, **kw),
                           window, list_url, query)
    body = LargeStrings()
    listed = PredictionPage(next=listed_page.next, previous=listed_page.previous,
                            results=[render(service, r, request_base, listing=True, body=body)
                                     for r in listed_page.rows])
    return body.response(listed.model_dump(mode="json"))
