"""Cog's wire format: the request body, the prediction as answered, the health check, and errors in
the shape Cog's server (FastAPI) answers them: ``{"detail": ...}``, a validation error's detail a
list of ``{"loc", "msg", "type"}``."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..protocol import Problem, Status, WebhookEvent

# A prediction id a client may choose: Cog suggests 26 base32 characters; ids name folders here.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
_ID = re.compile(ID_PATTERN)
RESPOND_ASYNC = "respond-async"
PredictionStatus = Literal[tuple(status.value for status in Status)]  # Cog's statuses are this server's
HealthStatus = Literal["STARTING", "READY", "BUSY", "SETUP_FAILED", "DEFUNCT"]


class CogRequest(BaseModel):
    """The body of ``POST /predictions`` and ``PUT /predictions/{id}``, as Cog reads it. The input
    is validated as Replicate's flux-fill-dev input (server.protocol.PredictionRequest); unknown
    keys are ignored, as Cog ignores them."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any] | None = Field(None, description="The model's input (the same as Replicate's flux-fill-dev).")
    id: str | None = Field(None, description="The prediction's id, chosen by the client (e.g. 26 base32 characters).")
    webhook: str | None = Field(None, description="URL to POST the prediction to on the events below.")
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None, description="Events that trigger the webhook (start, output, logs, completed); all when absent.")
    output_file_prefix: str | None = Field(None, description="Deprecated in Cog: outputs are PUT (multipart, field "
                                                             "`file`) to this prefix + their file name, and answered "
                                                             "as those URLs.")
    created_at: str | None = Field(None, description="Accepted, as Cog accepts it; the server's own time is kept.")
    context: dict[str, str] | None = Field(None, description="Accepted, as Cog accepts it; unused by this model.")


class CogMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    predict_time: float | None = None


class CogPrediction(BaseModel):
    """A prediction as Cog answers it (its PredictionResponse)."""

    input: dict[str, Any]
    output: list[str] | None = None
    id: str
    version: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    logs: str = ""
    error: str | None = None
    status: PredictionStatus
    metrics: CogMetrics | None = None


class CogSetup(BaseModel):
    started_at: str | None = None
    completed_at: str | None = None
    status: Literal["starting", "succeeded", "failed"] | None = None
    logs: str = ""


class CogHealth(BaseModel):
    """``GET /health-check``: always 200; ``status`` tells."""

    status: HealthStatus
    setup: CogSetup | dict = Field(default_factory=dict)


class CogIndex(BaseModel):
    """``GET /``: Cog's discovery document (under a path: its URLs are under it too)."""

    cog_version: str
    docs_url: str
    openapi_url: str
    healthcheck_url: str
    predictions_url: str
    predictions_idempotent_url: str
    predictions_cancel_url: str

    @classmethod
    def at(cls, here: str, cog_version: str) -> "CogIndex":
        return cls(cog_version=cog_version, docs_url="/docs", openapi_url=f"{here}/openapi.json",
                   healthcheck_url=f"{here}/health-check", predictions_url=f"{here}/predictions",
                   predictions_idempotent_url=f"{here}/predictions/{{prediction_id}}",
                   predictions_cancel_url=f"{here}/predictions/{{prediction_id}}/cancel")


def timestamp(ts: float | None) -> str | None:
    """A time as Cog writes it (Python's isoformat, in UTC): 2025-01-01T00:00:00.000000+00:00."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds")


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """A 422 as Cog's server (FastAPI) writes it; the value sent is not echoed (it may be an image)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in errors]
    return JSONResponse(jsonable_encoder({"detail": detail}), status_code=422)


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """Any error of this server (404, 409, 413, 408, 429, 503, 5xx) on Cog's routes: ``{"detail": text}``;
    a 422 that names its fields lists them as a validation error does."""
    if problem.status == 422 and problem.invalid_fields:
        detail = [{"loc": ["body", *f.field.split(".")], "msg": f.description, "type": f.type}
                  for f in problem.invalid_fields]
        return JSONResponse({"detail": detail}, status_code=422, headers=headers)
    return JSONResponse({"detail": problem.detail}, status_code=problem.status, headers=headers)
