"""The models API for the one model served: the model, its versions, and deployments of it.

``GET /v1/models`` answers Replicate's clients and OpenAI's with one body (see ModelList); OpenAI's
``GET /v1/models/{name}`` is in OpenAI's package (server.openai_api.routes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import catalog
from ..auth import Caller
from ..openai_api import models as openai_models
from ..openai_api.protocol import ModelList
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
