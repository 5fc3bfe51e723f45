"""Cog's requests to this server's predictions, and predictions back to Cog's answers.

- A request's input is Replicate's flux-fill-dev input, validated by the same model
  (``PredictionRequest``) and admitted by the same checks (server.admission); its errors are
  answered as Cog's 422 (``loc`` under ``body``).
- A prediction made here is recorded with ``api="cog"``; ``api_data`` keeps the
  ``output_file_prefix`` and, once uploaded, the outputs' URLs.
- Outputs are data: URIs (Cog's default) or, with --cog-upload-url (or a request's
  ``output_file_prefix``), the URLs they were uploaded to by the worker that made them, before
  the prediction is recorded as succeeded; a failed upload fails the prediction.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import ValidationError

from inference.engine import LogFn, Output
from inference.errors import InvalidInput
from inference.images import OUTPUT_CONTENT_TYPES

from ..adapters import EngineJob, FileReader
from ..bodies import LargeStrings, data_uri_file
from ..predictions import PredictionService
from ..protocol import PredictionRequest
from ..records import PredictionRecord
from ..webhooks import WebhookStyle
from .protocol import CogMetrics, CogPrediction, CogRequest, timestamp

log = logging.getLogger(__name__)
API = "cog"
UPLOAD_TIMEOUT = httpx.Timeout(15.0, connect=10.0)  # Cog's: 10 s to connect, 15 s to read


class InvalidRequest(Exception):
    """The request's input or webhook failed Replicate's input model: pydantic's errors, their
    ``loc`` from the body's top."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("invalid request")
        self.errors = errors


def prediction_request(body: CogRequest) -> PredictionRequest:
    """The request as Replicate's create request (the same validation, the input kept as sent)."""
    data = {"input": body.input if body.input is not None else {}}
    if body.webhook is not None:
        data["webhook"] = body.webhook
    if body.webhook_events_filter is not None:
        data["webhook_events_filter"] = body.webhook_events_filter
    try:
        return PredictionRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest([dict(e, loc=("body", *e["loc"])) for e in exc.errors()]) from None


def kept_data(body: CogRequest) -> dict[str, Any] | None:
    return {"output_file_prefix": body.output_file_prefix} if body.output_file_prefix else None


def render(service: PredictionService, record: PredictionRecord, body: LargeStrings | None = None) -> dict[str, Any]:
    """The prediction as Cog answers it. With ``body`` (an answer), the input is the one sent and
    data: outputs are streamed from their files; without (a webhook), long input strings are URLs."""
    metrics = None
    if record.terminal and record.predict_time is not None:
        metrics = CogMetrics(predict_time=round(record.predict_time, 6))
    return CogPrediction(
        input=service.shown_input(record, None, body),
        output=outputs(service, record, body),
        id=record.id,
        created_at=timestamp(record.created_at),
        started_at=timestamp(record.started_at),
        completed_at=timestamp(record.completed_at),
        logs=record.logs or "",
        error=record.error,
        status=record.status.value,
        metrics=metrics,
    ).model_dump(mode="json")


def outputs(service: PredictionService, record: PredictionRecord, body: LargeStrings | None) -> list[str] | None:
    if not record.output or record.data_removed:
        return None
    uploaded = (record.api_data or {}).get("uploaded")
    if uploaded:
        return list(uploaded)
    found = []
    for name in record.output:
        if body is None:
            uri = service.files.data_uri(record.id, name, record.output_run)
            if uri is not None:
                found.append(uri)
            continue
        path = service.files.output_path(record.id, name, record.output_run)
        if path is not None:
            found.append(body.add(data_uri_file(path, OUTPUT_CONTENT_TYPES[name.rsplit(".", 1)[-1]])))
    return found


def webhook_style(service: PredictionService) -> WebhookStyle:
    """Cog's webhooks: the prediction as Cog answers it, on each event the request's filter lets
    through (signed as this server signs every webhook; Cog's receivers need not check it)."""
    return WebhookStyle(snapshot=lambda record: render(service, record), signer=lambda _record: None)


def upload(out: Output, url: str, prediction_id: str, multipart: bool = False) -> str:
    """PUT one output where Cog puts it; the URL it is then at (the response's Location, else the
    URL put to, without its query)."""
    headers = {"X-Prediction-ID": prediction_id}
    try:
        with httpx.Client(timeout=UPLOAD_TIMEOUT, follow_redirects=True) as client:
            if multipart:  # output_file_prefix, as Cog's older servers send it
                resp = client.put(url, files={"file": (out.name, out.data, out.content_type)}, headers=headers)
            else:
                resp = client.put(url, content=out.data, headers={**headers, "Content-Type": out.content_type})
            resp.raise_for_status()
    except httpx.HTTPError as exc:  # the prediction fails in these words (as an input error: no traceback)
        raise InvalidInput.one("output", "upload", f"output {out.name} could not be uploaded to {url}: "
                               f"{(str(exc) or type(exc).__name__).splitlines()[0]}") from exc
    if multipart:
        return url
    final = resp.headers.get("location") or str(resp.url)
    return urlunsplit(urlsplit(final)._replace(query=""))


class CogWorkerSide:
    """On the worker: the input runs as sent; with an upload URL (the server's, or the request's
    ``output_file_prefix``) the outputs are uploaded and their URLs kept in ``api_data``."""

    def __init__(self, upload_url: str | None):
        self.upload_url = upload_url

    def prepare(self, record: PredictionRecord, sent: dict[str, Any], read: FileReader, log: LogFn) -> EngineJob:
        prefix = (record.api_data or {}).get("output_file_prefix")
        if prefix:
            def where(name: str) -> str:
                return prefix + os.path.basename(name)
        elif self.upload_url:
            base = self.upload_url if self.upload_url.endswith("/") else self.upload_url + "/"

            def where(name: str) -> str:
                return base + name
        else:
            return EngineJob(input=sent)

        def uploaded(made: list[Output]) -> dict[str, Any]:
            urls = [upload(out, where(out.name), record.id, multipart=bool(prefix)) for out in made]
            log(f"Uploaded {len(urls)} output(s)")
            return {"uploaded": urls}

        return EngineJob(input=sent, facts=uploaded)
