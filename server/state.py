"""What the running app holds: built once in the lifespan, handed to routes by dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from . import catalog
from .auth import Auth, Caller
from .events import Hub
from .files import FileStore
from .metrics import ServerMetrics
from .predictions import PredictionService
from .protocol import ApiError, Deployment, ModelObject
from .settings import Settings
from .store import Store

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    store: Store
    files: FileStore
    hub: Hub
    service: PredictionService
    auth: Auth
    metrics: ServerMetrics
    phase: str = "STARTING"  # STARTING, READY, SETUP_FAILED
    setup_error: str | None = None
    setup_started_at: float | None = None  # when loading the model began (the API node alone: when it started)
    setup_completed_at: float | None = None  # when it ended, loaded or failed
    models: list = field(default_factory=list)  # LoadedModel per device
    workers: list = field(default_factory=list)
    webhooks: object | None = None
    segmenter: object | None = None  # inference.segment.Segmenter, when --segmenter is set and loaded
    mask_gate: object | None = None  # server.routes.masks: the requests waiting for the segmenter
    secrets: dict = field(default_factory=dict)  # owner -> its webhook signing secret, once read

    def webhook_secret(self, owner: str | None) -> str:
        """The signing secret of one tenant's webhooks (made on first use, kept in the database). The
        implicit tenant of a server without tokens keeps the one secret servers had before tenants."""
        from .webhooks import new_secret

        if owner not in self.secrets:
            key = "webhook_secret" if owner is None else f"webhook_secret:{owner}"
            self.secrets[owner] = self.store.setting(key, new_secret)
        return self.secrets[owner]

    async def submit(self, caller: Caller, create: Callable[[], T], prepare: Callable[[], Awaitable[None]] | None = None,
                     count: Callable[[T], int] = lambda _: 1) -> T:
        """A create, as every API makes one, its request already valid: the model must have loaded
        (503), then ``prepare``, an adapter's work before the create (reading the pictures'
        headers), runs once the queue has room for the caller (429: refused before any work), then
        the caller's rate limit is charged, then ``create()`` runs off the event loop (it writes
        files, and checks the queue again as it writes). What it made is counted (``count``: how
        many predictions), and so is a refusal."""
        try:
            if self.phase == "SETUP_FAILED":
                raise ApiError(503, f"The model failed to load: {self.setup_error}", "Service Unavailable")
            if prepare is not None:
                self.service.check_queue(caller)
                await prepare()
            self.auth.charge(caller)
            made = await run_in_threadpool(create)
        except ApiError:
            self.metrics.refused.inc()
            raise
        self.metrics.created.inc(count(made))
        return made

    def api_base(self, request: Request) -> str:
        """The base URL the client used: scheme, host and, when it came through it, the prefix; with
        --public-url, that URL (behind a proxy the request's own Host is the proxy's upstream)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        base = str(request.base_url).rstrip("/")
        prefix = self.settings.prefix
        if prefix and (request.url.path == prefix or request.url.path.startswith(prefix + "/")):
            base += prefix
        return base

    def model_object(self, request: Request, caller: Caller) -> ModelObject:
        return catalog.model(self.api_base(request), self.store.count_predictions(caller.scope))

    def deployment(self, owner: str, name: str) -> Deployment:
        hardware = ",".join(m.device for m in self.models) or ",".join(self.settings.gpus) or "cpu"
        return catalog.deployment(owner, name, hardware, max(1, len(self.workers)))

    def health(self) -> str:
        if self.phase != "READY":
            return self.phase
        return "BUSY" if any(w.current for w in self.workers) else "READY"


def get_state(request: Request) -> AppState:
    return request.app.state.flux


def require_auth(request: Request) -> Caller:
    """The caller (a dependency): 401 without a valid token on a server that has tokens."""
    state: AppState = request.app.state.flux
    return state.auth.check(request)


def optional_auth(request: Request) -> Caller | None:
    """The caller of a valid token, or None, on routes that answer without one."""
    state: AppState = request.app.state.flux
    return state.auth.identify(request)
