"""The seam an API's package plugs into, beside Replicate's: its routes and where they are
mounted, the shape of its errors, how a worker runs its predictions and how their webhooks look.

A package gives one :class:`Api`; :func:`server.app.create_app` registers each one of ``APIS``
(one line there per API). The app then mounts the routes, answers every error on them (a
validation error, 404 and 405 under the mount, the middleware's 413 and 408, 429, 5xx) in the
API's shape, hands the predictions it makes (recorded with its ``name`` as their ``api``) to its
worker side, and sends their webhooks in its style. Nothing here knows any one API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from fastapi import APIRouter
from starlette.responses import Response
from starlette.routing import compile_path

from .adapters import WorkerSide
from .protocol import Problem
from .settings import Settings
from .webhooks import WebhookStyle


@dataclass(frozen=True)
class ErrorShape:
    """How an API answers errors: ``problem(problem, headers)`` for any error of this server,
    ``validation(errors)`` for a request that failed FastAPI's validation (pydantic's errors)."""

    problem: Callable[[Problem, dict[str, str] | None], Response]
    validation: Callable[[list[dict[str, Any]]], Response]


class Api(Protocol):
    """An API's package, as the app registers it."""

    name: str  # the ``api`` of the predictions it makes
    errors: ErrorShape
    in_schema: bool  # its routes are listed in this server's /openapi.json

    def router(self, at: str) -> APIRouter:
        """Its routes, as mounted at ``at`` ("" for the root)."""

    def mount(self, settings: Settings) -> str | None:
        """The path its routes are under ("" for the root), or None when it is not served."""

    def worker_side(self, settings: Settings) -> WorkerSide | None:
        """How a worker runs its predictions; None: as sent, as Replicate's."""

    def webhook_style(self, state: Any) -> WebhookStyle | None:
        """How its predictions' webhooks look (``state``: the app's AppState); None: Replicate's."""


@dataclass(frozen=True)
class Mounted:
    """An API as mounted on one app: the paths whose errors are answered in its shape."""

    api: Api
    prefixes: tuple[str, ...]  # everything under these is its (a mount at the root owns only its routes)
    routes: tuple[re.Pattern, ...]

    def owns(self, path: str) -> bool:
        path = path.rstrip("/") or "/"
        if any(path == p or path.startswith(p + "/") for p in self.prefixes):
            return True
        return any(r.match(path) for r in self.routes)


def mount(app, api: Api, settings: Settings) -> Mounted | None:
    """Include ``api``'s routes at its mount (and under --prefix too); None when it is off. They
    stay out of this server's schema (/openapi.json describes Replicate's API and this server's
    own routes) unless the API says ``in_schema``: an API's own documents describe it."""
    where = api.mount(settings)
    if where is None:
        return None
    router = api.router(where)
    places = [where] + ([settings.prefix + where] if settings.prefix else [])
    for index, place in enumerate(places):
        app.include_router(router, prefix=place, include_in_schema=api.in_schema and index == 0)
    if where:  # under a path of its own: everything there is its
        return Mounted(api, tuple(places), ())
    # At the root: only its routes (at the root and under the prefix) are its.
    return Mounted(api, (), tuple(compile_path(place + route.path)[0] for place in places for route in router.routes))


def shape_of(scope) -> ErrorShape | None:
    """The error shape of the API whose path this request is on (None: this server's own,
    problem+json). Works in middleware too: Starlette puts the app in the scope first."""
    app = scope.get("app")
    path = scope.get("path", "")
    for mounted in getattr(getattr(app, "state", None), "apis", ()) or ():
        if mounted.owns(path):
            return mounted.api.errors
    return None
