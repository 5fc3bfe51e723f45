"""Health, metrics and the webhook secret."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from inference import __version__

from ..protocol import Health, WebhookSecret
from ..state import AppState, get_state, require_auth

router = APIRouter(tags=["system"])
public_router = APIRouter(tags=["system"])


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


@router.get("/v1/webhooks/default/secret", response_model=WebhookSecret, summary="The webhook signing secret")
async def webhook_secret(_=Depends(require_auth), state: AppState = Depends(get_state)):
    return WebhookSecret(key=state.webhook_secret)
