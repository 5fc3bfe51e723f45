"""Cog's container HTTP API routes (see server.cog), as mounted at a path or at the root."""

from __future__ import annotations

import hashlib
import threading

from fastapi import APIRouter, Body, Depends, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import catalog
from ..admission import admit
from ..auth import Caller
from ..bodies import LargeStrings, OffLoopJSON
from ..middleware import name_request
from ..predictions import PredictionService
from ..protocol import ApiError, not_found
from ..records import PredictionRecord
from ..routes.system import HIDDEN_SETUP_ERROR
from ..state import AppState, get_state, optional_auth, require_auth
from ..store import DatabaseUnavailable
from .adapter import API, InvalidRequest, kept_data, prediction_request, render
from .protocol import RESPOND_ASYNC, CogHealth, CogIndex, CogPrediction, CogRequest, CogSetup, timestamp, valid_id

WAIT_ROUND_S = 30.0  # a synchronous request looks at its prediction at least this often
NOT_STREAMING = ("This model does not support streaming responses. Add @cog.streaming to predict() to enable SSE.")
PREFER = Header(None, description="respond-async: answer 202 at once instead of when the prediction ends.")
# Creates with a client's id are serialized per id on this node: one makes it, the others find it.
_ID_LOCKS = [threading.Lock() for _ in range(64)]


def _lock_for(prediction_id: str) -> threading.Lock:
    return _ID_LOCKS[hashlib.sha256(prediction_id.encode()).digest()[0] % len(_ID_LOCKS)]


def _respond_async(prefer: str | None) -> bool:
    return any(p.split(";", 1)[0].strip().lower() == RESPOND_ASYNC for p in (prefer or "").split(","))


def _wants_stream(request: Request) -> bool:
    accept = request.headers.get("accept") or ""
    return any(part.split(";", 1)[0].strip() == "text/event-stream" for part in accept.split(","))


def _bad_id(where: tuple[str, ...]) -> RequestValidationError:
    return RequestValidationError([{"loc": where, "type": "value_error",
                                    "msg": "a prediction id is 1 to 128 letters, digits, '-' or '_', "
                                           "starting with a letter or digit"}])


def _made(service: PredictionService, body: CogRequest, caller: Caller, prediction_id: str | None,
          admission, request) -> tuple[PredictionRecord, bool]:
    """The prediction, written now (True), or the one that has the client's id already (False)."""
    if prediction_id is None:
        return service.create(request, admission, caller, api=API, api_data=kept_data(body)), True
    with _lock_for(prediction_id):
        existing = service.get(prediction_id)
        if existing is not None:
            return _mine(existing, caller), False
        return service.create(request, admission, caller, api=API, api_data=kept_data(body),
                              prediction_id=prediction_id), True


def _mine(record: PredictionRecord, caller: Caller) -> PredictionRecord:
    if not caller.sees(record.owner):
        raise ApiError(409, f"The prediction id {record.id} is taken; choose another.", "Conflict")
    return record


async def _until_done(service: PredictionService, record: PredictionRecord) -> PredictionRecord:
    """Wait for the prediction to end (or the server to begin stopping: it then stays queued)."""
    while not record.terminal and not service.stopping:
        seen = await service.wait(record.id, WAIT_ROUND_S, last=record)
        if seen is None:
            break
        record = seen
    return record


async def _answer(service: PredictionService, record: PredictionRecord, respond_async: bool) -> Response:
    if respond_async:
        status = 202
    else:
        record = await _until_done(service, record)
        status = 200 if record.terminal else 202
    body = LargeStrings()
    return body.response(render(service, record, body), status)


async def _create(state: AppState, request: Request, body: CogRequest | None, caller: Caller,
                  prediction_id: str | None, prefer: str | None) -> Response:
    if _wants_stream(request):
        return JSONResponse({"error": NOT_STREAMING}, status_code=406)
    body = body or CogRequest()
    service = state.service
    if prediction_id is not None:  # a retry finds its prediction, whatever its body says
        found = await run_in_threadpool(service.get, prediction_id)
        if found is not None:
            record = _mine(found, caller)
            name_request(request, record.id)
            return await _answer(service, record, _respond_async(prefer))
    try:
        sent = prediction_request(body)
    except InvalidRequest as exc:
        raise RequestValidationError(exc.errors) from None
    admission = admit(sent, "hidden", None, None)  # the checks of Replicate's creates, nothing written before
    record, _ = await state.submit(caller, lambda: _made(service, body, caller, prediction_id, admission, sent),
                                   count=lambda made: int(made[1]))
    name_request(request, record.id)
    return await _answer(service, record, _respond_async(prefer))


def router(at: str) -> APIRouter:
    """Cog's routes; under a path (``at``) also its discovery document and schema, which at the
    root would clash with this server's web page and its own schema."""
    r = APIRouter(tags=["cog"], route_class=OffLoopJSON)  # data URIs: parsed off the event loop

    @r.post("/predictions", response_model=CogPrediction, summary="Cog: run a prediction (sync; "
            "Prefer: respond-async answers 202 at once)", responses={202: {"model": CogPrediction}})
    async def create(request: Request, body: CogRequest | None = Body(None), prefer: str | None = PREFER,
                     caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
        if body is not None and body.id is not None and not valid_id(body.id):
            raise _bad_id(("body", "id"))
        return await _create(state, request, body, caller, body.id if body else None, prefer)

    @r.put("/predictions/{prediction_id}", response_model=CogPrediction,
           summary="Cog: run a prediction with the client's id (idempotent: the same id again answers the "
                   "prediction it made)", responses={202: {"model": CogPrediction}})
    async def create_idempotent(request: Request, prediction_id: str = Path(..., title="Prediction ID"),
                                body: CogRequest | None = Body(None), prefer: str | None = PREFER,
                                caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
        if body is not None and body.id is not None and body.id != prediction_id:
            raise RequestValidationError([{"loc": ("body", "id"), "type": "value_error",
                                           "msg": "prediction ID must match the ID supplied in the URL"}])
        if not valid_id(prediction_id):
            raise _bad_id(("path", "prediction_id"))
        return await _create(state, request, body, caller, prediction_id, prefer)

    @r.get("/predictions/{prediction_id}", response_model=CogPrediction,
           summary="The prediction as it stands (this server's addition: Cog's own server has no GET)")
    async def get_prediction(request: Request, prediction_id: str, caller: Caller = Depends(require_auth),
                             state: AppState = Depends(get_state)):
        record = await run_in_threadpool(state.service.get, prediction_id, caller)
        if record is None:
            raise not_found()
        name_request(request, record.id)
        body = LargeStrings()
        return body.response(render(state.service, record, body))

    @r.post("/predictions/{prediction_id}/cancel", summary="Cog: cancel a prediction (200 {} or 404 {})")
    async def cancel(request: Request, prediction_id: str, caller: Caller = Depends(require_auth),
                     state: AppState = Depends(get_state)):
        record = await run_in_threadpool(state.service.cancel, prediction_id, caller)
        if record is None:
            return JSONResponse({}, status_code=404)
        name_request(request, record.id)
        return JSONResponse({}, status_code=200)

    @r.get("/health-check", response_model=CogHealth, summary="Cog: the server's state (always 200)")
    async def health_check(caller: Caller | None = Depends(optional_auth), state: AppState = Depends(get_state)):
        return await _health(state, caller)

    if at:
        @r.get("", response_model=CogIndex, summary="Cog: the discovery document")
        async def index(request: Request):
            return CogIndex.at(request.url.path.rstrip("/"), catalog.COG_VERSION)

        @r.get("/openapi.json", summary="Cog: the model's schema (Input, Output), as its Cog image gives it")
        async def openapi():
            return catalog.cog_schema()

    return r


async def _health(state: AppState, caller: Caller | None) -> CogHealth:
    """Cog's states: STARTING while the model loads, READY, BUSY while every worker runs a
    prediction (more are queued, not refused), SETUP_FAILED, and DEFUNCT while the database is out
    of reach (nothing can be queued or read; READY again once it is back)."""
    try:
        reachable = state.store.available and await run_in_threadpool(state.store.count_queued) is not None
    except DatabaseUnavailable:
        reachable = False
    status = state.health() if reachable else "DEFUNCT"
    if state.setup_started_at is None:
        return CogHealth(status=status, setup={})
    error = state.setup_error
    if error is not None and caller is None:
        error = HIDDEN_SETUP_ERROR
    setup_status = "failed" if state.phase == "SETUP_FAILED" else (
        "succeeded" if state.setup_completed_at is not None else "starting")
    return CogHealth(status=status, setup=CogSetup(started_at=timestamp(state.setup_started_at),
                                                   completed_at=timestamp(state.setup_completed_at),
                                                   status=setup_status, logs=error or ""))

