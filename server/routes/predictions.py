"""Prediction routes: create (model, version, deployment), get, list, cancel, stream."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from ..protocol import (
    MODEL_NAME,
    MODEL_OWNER,
    ApiError,
    InvalidField,
    Prediction,
    PredictionPage,
    PredictionRequest,
    Status,
    lone_surrogate_at,
    not_found,
    not_unicode,
    validation_failed,
)
from ..state import AppState, get_state, require_auth
from ..streaming import prediction_events

router = APIRouter(tags=["predictions"])
stream_router = APIRouter(tags=["predictions"])
_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$")


def parse_prefer(prefer: str | None) -> int | None:
    """``Prefer: wait`` is 60 s; ``wait=N`` is N in 1..60."""
    if not prefer:
        return None
    for part in prefer.split(","):
        match = _WAIT.match(part)
        if match:
            return max(1, min(60, int(match.group(1)))) if match.group(1) else 60
    return None


def check_model(owner: str, name: str) -> None:
    if (owner, name) != (MODEL_OWNER, MODEL_NAME):
        raise not_found()


def known_model(owner: str, name: str) -> None:
    """A dependency: an unknown model is 404 before its body is validated."""
    check_model(owner, name)


def version_from(value: str | None) -> str:
    """The prediction's ``version`` field from the body's: "hidden" for a model ref, else the id."""
    if not value:
        raise validation_failed([InvalidField(type="required", field="version", description="version is required")])
    ref, _, version_id = value.partition(":")
    if "/" in ref:
        owner, _, name = ref.partition("/")
        check_model(owner, name)
        return version_id or "hidden"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value):
        raise validation_failed([InvalidField(type="format", field="version", description="version is not valid")])
    return value


async def create(state: AppState, request: Request, body: PredictionRequest, version: str, owner: str | None,
                 prefer: str | None) -> JSONResponse:
    bad = lone_surrogate_at(body.model_dump(exclude_none=True))
    if bad:
        raise not_unicode(bad)
    state.auth.charge(owner)
    if state.phase == "SETUP_FAILED":
        raise ApiError(503, f"The model failed to load: {state.setup_error}", "Service Unavailable")
    base = state.api_base(request)
    try:
        row = state.service.create(body, version, base, owner)
    except ApiError:
        state.metrics.refused.inc()
        raise
    state.metrics.created.inc()
    wait = parse_prefer(prefer)
    headers = {}
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}" if prefer and "=" in prefer else "wait"
        # Answer before the client's read timeout (N + 0.5 s).
        row = await state.service.wait(row["id"], max(0.5, wait - 0.5))
    prediction = state.service.render(row, base)
    if not prediction.status.terminal:
        prediction.status = Status.STARTING  # clients return early on any other non-terminal status
    return JSONResponse(prediction.model_dump(mode="json"), status_code=201, headers=headers)


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201, response_model=Prediction,
             summary="Create a prediction for the model")
async def create_for_model(owner: str, name: str, body: PredictionRequest, request: Request,
                           prefer: str | None = Header(None), caller=Depends(require_auth),
                           _model=Depends(known_model), state: AppState = Depends(get_state)):
    return await create(state, request, body, "hidden", caller, prefer)


@router.post("/v1/deployments/{owner}/{name}/predictions", status_code=201, response_model=Prediction,
             summary="Create a prediction through a deployment name")
async def create_for_deployment(owner: str, name: str, body: PredictionRequest, request: Request,
                                prefer: str | None = Header(None), caller=Depends(require_auth),
                                state: AppState = Depends(get_state)):
    return await create(state, request, body, "hidden", caller, prefer)


@router.post("/v1/predictions", status_code=201, response_model=Prediction, summary="Create a prediction for a version")
async def create_for_version(body: PredictionRequest, request: Request, prefer: str | None = Header(None),
                             caller=Depends(require_auth), state: AppState = Depends(get_state)):
    return await create(state, request, body, version_from(body.version), caller, prefer)


@router.get("/v1/predictions", response_model=PredictionPage, summary="List predictions, newest first")
async def list_predictions(request: Request, cursor: str | None = Query(None),
                           created_after: str | None = Query(None), created_before: str | None = Query(None),
                           _=Depends(require_auth), state: AppState = Depends(get_state)):
    base = state.api_base(request)
    return state.service.page(base, f"{base}/v1/predictions", cursor, created_after, created_before)


@router.get("/v1/predictions/{prediction_id}", response_model=Prediction, summary="Get a prediction")
async def get_prediction(prediction_id: str, request: Request, _=Depends(require_auth),
                         state: AppState = Depends(get_state)):
    row = state.service.get(prediction_id)
    if row is None:
        raise not_found()
    return state.service.render(row, state.api_base(request))


@router.post("/v1/predictions/{prediction_id}/cancel", response_model=Prediction, summary="Cancel a prediction")
async def cancel_prediction(prediction_id: str, request: Request, _=Depends(require_auth),
                            state: AppState = Depends(get_state)):
    row = state.service.cancel(prediction_id)
    if row is None:
        raise not_found()
    if row["status"] == Status.PROCESSING.value:
        row = await state.service.wait(prediction_id, 2.0)  # it stops at the next denoising step
    return state.service.render(row, state.api_base(request))


@stream_router.get("/v1/predictions/{prediction_id}/stream", summary="Server-sent events of a prediction",
                   response_class=EventSourceResponse)
async def stream_prediction(prediction_id: str, state: AppState = Depends(get_state)):
    # No auth, as Replicate's stream URLs: the JS and Go clients fetch them without a token, and the
    # prediction id (130 random bits) is the capability.
    if state.service.get(prediction_id) is None:
        raise not_found()
    return EventSourceResponse(prediction_events(state.service, prediction_id), ping=15)
