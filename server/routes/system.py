"""Health, metrics and the webhook secret."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from inference import __version__

from ..auth import Caller
from ..protocol import Health, WebhookSecret
from ..state import AppState, get_state, optional_auth, require_auth

HIDDEN_SETUP_ERROR = "The model failed to load; the server log has the details."

router = APIRouter(tags=["system"])
public_router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])


@public_router.get("/health", response_model=Health, summary="Readiness and the model loaded")
async def health(caller: Caller | None = Depends(optional_auth), state: AppState = Depends(get_state)):
    # Without a valid token (on a server that has tokens), no paths, options or error texts.
    shown = caller is not None
    model = state.models[0] if state.models else None
    error = state.setup_error if shown or state.setup_error is None else HIDDEN_SETUP_ERROR
    return Health(
        status=state.health(),
        model=model.name if model else None,
        demo=bool(model and model.demo),
        weights=(model.source if model else state.settings.weights) if shown else None,
        devices=[m.device for m in state.models],
        queue_depth=state.store.count_queued(),
        setup_error=error,
        speed=model.extras.get("speed") if model and shown else None,
        version=__version__,
    )


@metrics_router.get("/metrics", summary="Prometheus metrics")
async def metrics(_=Depends(require_auth), state: AppState = Depends(get_state)):
    stats = getattr(state.webhooks, "stats", None)
    body = state.metrics.render(state.store, [m.device for m in state.models], stats)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/webhooks/default/secret", response_model=WebhookSecret,
            summary="The webhook signing secret of the caller's tenant")
async def webhook_secret(caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    return WebhookSecret(key=state.webhook_secret(caller.tenant))
