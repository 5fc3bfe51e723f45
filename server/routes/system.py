"""Health, metrics, the model version (with its OpenAPI schema) and the webhook secret."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Depends, Response

from inference import __version__
from inference.inputs import PredictionInput

from ..protocol import Health, ModelVersion, WebhookSecret, not_found
from ..routes.predictions import check_model
from ..state import AppState, get_state, require_auth

router = APIRouter(tags=["system"])
public_router = APIRouter(tags=["system"])


def cog_schema() -> dict:
    """The model's schema in Cog's shape: what Replicate's version objects carry."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {
            "schemas": {
                "Input": PredictionInput.model_json_schema(),
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"},
                "Status": {"enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"},
            }
        },
    }


VERSION_ID = hashlib.sha256(json.dumps(cog_schema(), sort_keys=True).encode()).hexdigest()


@public_router.get("/health", response_model=Health, summary="Readiness and the model loaded")
async def health(state: AppState = Depends(get_state)):
    model = state.models[0] if state.models else None
    return Health(
        status=state.health(),
        model=model.name if model else None,
        demo=bool(model and model.demo),
        weights=model.source if model else state.settings.weights,
        devices=[m.device for m in state.models],
        queue_depth=state.store.count_queued(),
        setup_error=state.setup_error,
        speed=model.extras.get("speed") if model else None,
        version=__version__,
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(_=Depends(require_auth), state: AppState = Depends(get_state)):
    stats = getattr(state.webhooks, "stats", None)
    body = state.metrics.render(state.store, [m.device for m in state.models], stats)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models/{owner}/{name}/versions/{version_id}", response_model=ModelVersion, summary="A model version")
async def get_version(owner: str, name: str, version_id: str, _=Depends(require_auth)):
    check_model(owner, name)
    if not version_id:
        raise not_found()
    return ModelVersion(id=version_id, created_at="2024-11-21T00:00:00.000Z", cog_version="0.13.0",
                        openapi_schema=cog_schema())


@router.get("/v1/webhooks/default/secret", response_model=WebhookSecret, summary="The webhook signing secret")
async def webhook_secret(_=Depends(require_auth), state: AppState = Depends(get_state)):
    return WebhookSecret(key=state.webhook_secret)
