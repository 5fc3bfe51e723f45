"""Prediction routes: create (model, version, deployment), get, list, cancel, stream, preview."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from ..admission import admit
from ..auth import Caller
from ..bodies import OffLoopJSON
from ..catalog import check_model
from ..events import TooManyWatchers
from ..middleware import name_request
from ..protocol import ApiError, Prediction, PredictionPage, PredictionRequest, Status, not_found
from ..state import AppState, get_state, optional_auth, require_auth
from ..streaming import prediction_events
from . import answers

router = APIRouter(tags=["predictions"], route_class=OffLoopJSON)
stream_router = APIRouter(tags=["predictions"], route_class=OffLoopJSON)
CANCEL_AFTER = Header(None, alias="Cancel-After",
                      description="Cancel the prediction when this much time has passed since it was created "
                                  "(30s, 5m, 2h30m, or seconds); at least 5 s.")
CANCEL_WAIT_S = 1.0
PREFER = Header(None, description="wait or wait=N (1..60): hold the request until the prediction ends or N s pass.")


def known_model(owner: str, name: str) -> None:
    """A dependency: an unknown model is 404 before its body is validated."""
    check_model(owner, name)


async def create(state: AppState, request: Request, body: PredictionRequest, version: str | None, caller: Caller,
                 prefer: str | None, cancel_after: str | None) -> Response:
    admission = admit(body, version, prefer, cancel_after)  # nothing is written unless every check passes
    base = state.api_base(request)
    record = await state.submit(caller, lambda: state.service.create(body, admission, caller))
    name_request(request, record.id)
    headers = {}
    if admission.wait is not None:
        headers["Preference-Applied"] = admission.wait.applied
        # Answer before the client's read timeout (N + 0.5 s).
        record = await state.service.wait(record.id, max(0.5, admission.wait.seconds - 0.5), last=record)
    # Clients return early on any non-terminal status but starting.
    status = None if record.status.terminal else Status.STARTING
    return answers.respond(state.service, record, base, 201, headers, status)


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201, response_model=Prediction,
             summary="Create a prediction for the model")
async def create_for_model(owner: str, name: str, body: PredictionRequest, request: Request,
                           prefer: str | None = PREFER, cancel_after: str | None = CANCEL_AFTER,
                           caller=Depends(require_auth), _model=Depends(known_model),
                           state: AppState = Depends(get_state)):
    return await create(state, request, body, "hidden", caller, prefer, cancel_after)


@router.post("/v1/deployments/{owner}/{name}/predictions", status_code=201, response_model=Prediction,
             summary="Create a prediction through a deployment name")
async def create_for_deployment(owner: str, name: str, body: PredictionRequest, request: Request,
                                prefer: str | None = PREFER, cancel_after: str | None = CANCEL_AFTER,
                                caller=Depends(require_auth), state: AppState = Depends(get_state)):
    return await create(state, request, body, "hidden", caller, prefer, cancel_after)


@router.post("/v1/predictions", status_code=201, response_model=Prediction, summary="Create a prediction for a version")
async def create_for_version(body: PredictionRequest, request: Request, prefer: str | None = PREFER,
                             cancel_after: str | None = CANCEL_AFTER, caller=Depends(require_auth),
                             state: AppState = Depends(get_state)):
    return await create(state, request, body, None, caller, prefer, cancel_after)


@router.get("/v1/predictions", response_model=PredictionPage, summary="List predictions, newest first")
async def list_predictions(request: Request, cursor: str | None = Query(None),
                           created_after: str | None = Query(None), created_before: str | None = Query(None),
                           caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    base = state.api_base(request)
    return answers.page(state.service, caller, base, f"{base}/v1/predictions", cursor, created_after, created_before)


@router.get("/v1/predictions/{prediction_id}", response_model=Prediction, summary="Get a prediction")
async def get_prediction(prediction_id: str, request: Request, caller: Caller = Depends(require_auth),
                         state: AppState = Depends(get_state)):
    record = state.service.get(prediction_id, caller)
    if record is None:
        raise not_found()
    name_request(request, record.id)
    return answers.respond(state.service, record, state.api_base(request))


@router.post("/v1/predictions/{prediction_id}/cancel", response_model=Prediction, summary="Cancel a prediction")
async def cancel_prediction(prediction_id: str, request: Request, caller: Caller = Depends(require_auth),
                            state: AppState = Depends(get_state)):
    record = await run_in_threadpool(state.service.cancel, prediction_id, caller)
    if record is None:
        raise not_found()
    name_request(request, record.id)
    if record.status == Status.PROCESSING:
        # It stops at its next denoising step: answer then, or after CANCEL_WAIT_S with the prediction
        # as it is (still processing), never later.
        record = await state.service.wait(prediction_id, CANCEL_WAIT_S, last=record)
    return answers.respond(state.service, record, state.api_base(request))


@stream_router.get("/v1/predictions/{prediction_id}/stream", summary="Server-sent events of a prediction",
                   response_class=EventSourceResponse)
async def stream_prediction(prediction_id: str, caller: Caller | None = Depends(optional_auth),
                            previews: bool = Query(False, description="Also send `preview` events while the "
                                                   "prediction runs (this server's own; the official clients "
                                                   "know only output, logs, error and done)."),
                            state: AppState = Depends(get_state)):
    # No auth needed, as Replicate's stream URLs: the JS and Go clients fetch them without a token,
    # and the prediction id (130 random bits) is the capability. Another tenant's token is refused.
    if state.service.get(prediction_id, caller) is None:
        raise not_found()
    try:
        queue = state.hub.subscribe(prediction_id, limit=state.settings.max_stream_watchers)
    except TooManyWatchers:
        raise ApiError(429, f"This prediction already has {state.settings.max_stream_watchers} streams open on this "
                            "server; close one, or poll GET /v1/predictions/{id}.", "Too Many Requests",
                       headers={"Retry-After": "5"}) from None
    return EventSourceResponse(prediction_events(state.service, prediction_id, previews, queue), ping=15)


@stream_router.get("/v1/predictions/{prediction_id}/preview", summary="The latest preview of a running prediction",
                   response_class=Response, responses={200: {"content": {"image/webp": {}}}})
async def get_preview(prediction_id: str, caller: Caller | None = Depends(optional_auth),
                      state: AppState = Depends(get_state)):
    # As the stream that carries the same previews: the prediction id is the capability.
    preview = state.service.preview(prediction_id, caller)
    if preview is None:
        raise ApiError(404, "This prediction has no preview: it is not running, or no step has made one yet.")
    return Response(preview.data, media_type=preview.content_type, headers={
        "Cache-Control": "no-store", "Preview-Step": str(preview.step), "Preview-Total": str(preview.total)})
