"""OpenAI's image API: edits and generations, answered by this server's model (see server.openai_api)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from . import models as openai_models
from .protocol import ErrorResponse, ImagesResponse, OpenAIError, OpenAIModel
from .service import EDITS, GENERATIONS, OpenAIImages, error_response, from_api_error, unauthenticated
from ..protocol import ApiError
from ..state import AppState, get_state
from ..store import DatabaseUnavailable

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 429, 500)}


async def answer(request: Request, state: AppState, endpoint: str) -> Response:
    try:
        return await OpenAIImages(state).answer(request, endpoint)
    except OpenAIError as exc:
        return error_response(exc)
    except ApiError as exc:  # a refusal from below the adapter
        return error_response(from_api_error(exc))
    except DatabaseUnavailable as exc:
        return error_response(OpenAIError(503, "The database is not reachable right now (it may be restarting). "
                                               "Try again in a few seconds.", type="server_error",
                                          headers={"Retry-After": str(exc.retry_after_s)}))
    except Exception:
        log.exception("an OpenAI image request failed")
        return error_response(OpenAIError(500, "An unexpected error occurred; the server log has the details.",
                                          type="server_error"))


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=ERRORS,
             summary="OpenAI: edit an image (multipart: image or image[], mask, prompt, n, size, ...)")
async def edit_image(request: Request, state: AppState = Depends(get_state)):
    return await answer(request, state, EDITS)


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS,
             summary="OpenAI: generate an image (JSON: prompt, n, size, ...)")
async def generate_image(request: Request, state: AppState = Depends(get_state)):
    return await answer(request, state, GENERATIONS)


@router.get("/v1/models/{name}", response_model=OpenAIModel, responses={401: {"model": ErrorResponse},
                                                                        404: {"model": ErrorResponse}},
            summary="OpenAI: an image model name this server answers (every one is served by FLUX.1 Fill [dev])")
async def get_openai_model(name: str, request: Request, state: AppState = Depends(get_state)):
    if state.auth.identify(request) is None:
        return error_response(unauthenticated())
    if not openai_models.accepts(state.settings.openai_models, name):
        return error_response(OpenAIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                                          code="model_not_found"))
    return JSONResponse(openai_models.model_object(name).model_dump(mode="json"))
