"""The models API for the one model served: the model, its versions, and deployments of it.

``GET /v1/models`` answers Replicate's clients and OpenAI's with one body (see ModelList), and
``GET /v1/models/{name}`` is OpenAI's model object for each image model name this server accepts
(all served by FLUX.1 Fill [dev]), beside Replicate's ``/v1/models/{owner}/{name}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .. import catalog
from ..auth import Caller
from ..openai_api import models as openai_models
from ..openai_api.protocol import ErrorResponse, ModelList, OpenAIError, OpenAIModel
from ..openai_api.service import error_response, unauthenticated
from ..protocol import Deployment, ModelObject, ModelVersion, VersionPage, not_found
from ..state import AppState, get_state, require_auth

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList,
            summary="List models: the one served here (Replicate's results) and the image model names it answers "
                    "(OpenAI's data)")
async def list_models(request: Request, caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    names = openai_models.listed(state.settings.openai_models)
    return ModelList(next=None, previous=None, results=[state.model_object(request, caller)],
                     data=[openai_models.model_object(name) for name in names])


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


@router.get("/v1/models/{owner}/{name}", response_model=ModelObject, summary="Get the model")
async def get_model(owner: str, name: str, request: Request, caller: Caller = Depends(require_auth),
                    state: AppState = Depends(get_state)):
    catalog.check_model(owner, name)
    return state.model_object(request, caller)


@router.get("/v1/models/{owner}/{name}/versions", response_model=VersionPage, summary="List the model's versions")
async def list_versions(owner: str, name: str, _=Depends(require_auth)):
    catalog.check_model(owner, name)
    return VersionPage(next=None, previous=None, results=[catalog.version()])


@router.get("/v1/models/{owner}/{name}/versions/{version_id}", response_model=ModelVersion,
            summary="A model version, with its input schema")
async def get_version(owner: str, name: str, version_id: str, _=Depends(require_auth)):
    catalog.check_model(owner, name)
    if version_id != catalog.VERSION_ID:
        raise not_found()
    return catalog.version()


@router.get("/v1/deployments/{owner}/{name}", response_model=Deployment, summary="A deployment: every name runs this model")
async def get_deployment(owner: str, name: str, _=Depends(require_auth), state: AppState = Depends(get_state)):
    return state.deployment(owner, name)
