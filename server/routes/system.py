"""Health, metrics and the webhook secret."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from inference import __version__

from ..auth import Caller
from ..protocol import ApiError, Health, ServedModel, WebhookSecret
from ..state import AppState, get_state, optional_auth, require_auth
from ..store import DatabaseUnavailable

HIDDEN_SETUP_ERROR = "The model failed to load; the server log has the details."

router = APIRouter(tags=["system"])
public_router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])


@public_router.get("/health", response_model=Health, summary="Readiness and the model loaded")
async def health(caller: Caller | None = Depends(optional_auth), state: AppState = Depends(get_state)):
    # Without a valid token (on a server that has tokens), no paths, options or error texts. Never
    # waits on the database (off the event loop, and at once while it is known to be away): a
    # node whose database is away answers 200 with status UNAVAILABLE, so an orchestrator's
    # liveness check does not restart it (and its running predictions) during a database restart.
    shown = caller is not None
    model = state.models[0] if state.models else None
    error = state.setup_error if shown or state.setup_error is None else HIDDEN_SETUP_ERROR
    served = None
    try:
        queued = await run_in_threadpool(state.store.count_queued) if state.store.available else None
        if not state.settings.workers and state.store.shared and queued is not None:
            served = await run_in_threadpool(state.store.served_models)
    except DatabaseUnavailable:
        queued = None
    workers = [ServedModel(name=m["name"], demo=bool(m.get("demo")), weights=m.get("weights") if shown else None,
                           device=m.get("device")) for m in served] if served is not None else None
    latest = served[0] if served else None
    return Health(
        status=state.health() if queued is not None else "UNAVAILABLE",
        model=model.name if model else latest["name"] if latest else None,
        demo=bool(model.demo) if model else any(w.demo for w in workers or []),
        notice=model.notice if model else next((m.get("notice") for m in served or [] if m.get("notice")), None),
        workers=workers,
        weights=(model.source if model else state.settings.weights if state.settings.workers
                 else latest.get("weights") if latest else None) if shown else None,
        devices=[m.device for m in state.models],
        queue_depth=queued or 0,
        setup_error=error,
        speed=model.extras.get("speed") if model and shown else None,
        database="available" if queued is not None else "unavailable",
        selects=selects(state),
        version=__version__,
    )


def selects(state: AppState) -> list[str]:
    """What this node selects masks by (Health.selects)."""
    segmenter = state.segmenter
    if segmenter is not None:
        return ["points", "text"] if segmenter.reads_text else ["points"]
    return ["text"] if state.settings.segmenter and not state.settings.workers else []


@metrics_router.get("/metrics", summary="Prometheus metrics")
async def metrics(caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    # The whole server's counts: on a server with tokens, an admin's to read, not a tenant's.
    if state.settings.auth_enabled and not caller.admin:
        raise ApiError(403, "The metrics are the whole server's: they need an admin token (--admin-token).",
                       "Forbidden")
    stats = getattr(state.webhooks, "stats", None)
    body = await run_in_threadpool(state.metrics.render, state.store, [m.device for m in state.models], stats)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/webhooks/default/secret", response_model=WebhookSecret,
            summary="The webhook signing secret of the caller's tenant")
async def webhook_secret(caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    return WebhookSecret(key=state.webhook_secret(caller.tenant))
