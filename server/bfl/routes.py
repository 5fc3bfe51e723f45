"""Black Forest Labs' API routes: Fill [pro] and Expand [pro] creates, and get_result (see server.bfl).
A key goes in ``x-key`` (or ``Authorization: Bearer``); errors are answered in BFL's shape (a bad
key is BFL's 403). A pending task's answer says when to ask again (``Retry-After``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from . import adapter as bfl
from ..auth import Caller
from ..bodies import OffLoopJSON
from ..middleware import name_request
from ..state import AppState, get_state, require_auth

router = APIRouter(tags=["bfl"], route_class=OffLoopJSON)  # base64 pictures: parsed off the event loop


async def _create(state: AppState, request: Request, endpoint: str, body, caller: Caller) -> bfl.AsyncResponse:
    answer = await bfl.create(state, endpoint, body, caller, state.api_base(request))
    name_request(request, answer.id)
    return answer


@router.post(f"/v1/{bfl.FILL}", response_model=bfl.AsyncResponse,
             summary="BFL: inpaint an image (FLUX.1 Fill [pro]'s request, run by FLUX.1 Fill [dev])")
async def fill(body: bfl.FillRequest, request: Request, caller: Caller = Depends(require_auth),
               state: AppState = Depends(get_state)):
    return await _create(state, request, bfl.FILL, body, caller)


@router.post(f"/v1/{bfl.EXPAND}", response_model=bfl.AsyncResponse,
             summary="BFL: expand an image by pixels on any side (FLUX.1 Expand [pro]'s request)")
async def expand(body: bfl.ExpandRequest, request: Request, caller: Caller = Depends(require_auth),
                 state: AppState = Depends(get_state)):
    return await _create(state, request, bfl.EXPAND, body, caller)


@router.get("/v1/get_result", response_model=bfl.ResultResponse, summary="BFL: a task's status and result")
async def get_result(request: Request, response: Response, id: str = Query(..., max_length=200),
                     caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    record = state.service.get(id, caller)
    answer = bfl.result(state.service, id, record, state.api_base(request))
    if record is not None:
        name_request(request, record.id)
    if answer.status == bfl.ResultStatus.PENDING:
        response.headers["Retry-After"] = str(bfl.retry_after(state.service, record))
    return answer
