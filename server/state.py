"""What the running app holds: built once in the lifespan, handed to routes by dependency."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from . import catalog
from .auth import Auth
from .events import Hub
from .files import FileStore
from .metrics import ServerMetrics
from .predictions import PredictionService
from .protocol import Deployment, ModelObject
from .settings import Settings
from .store import Store


@dataclass
class AppState:
    settings: Settings
    store: Store
    files: FileStore
    hub: Hub
    service: PredictionService
    auth: Auth
    metrics: ServerMetrics
    webhook_secret: str
    phase: str = "STARTING"  # STARTING, READY, SETUP_FAILED
    setup_error: str | None = None
    models: list = field(default_factory=list)  # LoadedModel per device
    workers: list = field(default_factory=list)
    webhooks: object | None = None

    def api_base(self, request: Request) -> str:
        """The base URL the client used: scheme, host and, when it came through it, the prefix."""
        base = str(request.base_url).rstrip("/")
        prefix = self.settings.prefix
        if prefix and (request.url.path == prefix or request.url.path.startswith(prefix + "/")):
            base += prefix
        return base

    def model_object(self, request: Request) -> ModelObject:
        return catalog.model(self.api_base(request), self.store.count_predictions())

    def deployment(self, owner: str, name: str) -> Deployment:
        hardware = ",".join(m.device for m in self.models) or ",".join(self.settings.gpus) or "cpu"
        return catalog.deployment(owner, name, hardware, max(1, len(self.workers)))

    def health(self) -> str:
        if self.phase != "READY":
            return self.phase
        return "BUSY" if any(w.current for w in self.workers) else "READY"


def get_state(request: Request) -> AppState:
    return request.app.state.flux


def require_auth(request: Request) -> str | None:
    state: AppState = request.app.state.flux
    return state.auth.check(request)
