"""Cog's container HTTP API: what `cog serve` and a model's Cog image answer on port 5000, served
on this server's durable queue for the same inputs as Replicate's flux-fill-dev.

Mounted at --cog-api (default /cog; / for the root, as a Cog image serves it; off):

- ``POST /predictions``: answers when the prediction ends (200, failed and canceled too);
  ``Prefer: respond-async`` answers 202 at once. A body ``id`` makes it idempotent as PUT is.
- ``PUT /predictions/{id}``: the same, with the client's id. The same id again answers the
  prediction it made (no second one): at once with ``respond-async`` (202), else when it ends.
- ``POST /predictions/{id}/cancel``: 200 ``{}``, or 404 ``{}`` for an unknown id.
- ``GET /predictions/{id}``: this server's addition (Cog's has none): the prediction as it stands.
- ``GET /health-check``: always 200: STARTING, READY, BUSY, SETUP_FAILED or DEFUNCT, and ``setup``.
- Under a path also ``GET /`` (the discovery document) and ``GET /openapi.json`` (the model's Cog
  schema); at the root those stay this server's web page and schema.

Where Cog answers 409 when its one slot is taken, here every request is queued and answered in
turn. Webhooks carry the prediction in Cog's shape on the events of ``webhook_events_filter``
(start, output, logs, completed). ``Accept: text/event-stream`` is 406, as Cog answers it for a
model that does not stream. Errors come in Cog's shape (server.cog.protocol).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..apis import ErrorShape
from ..settings import Settings
from ..webhooks import WebhookStyle
from . import adapter, protocol, routes


class CogApi:
    name = adapter.API
    errors = ErrorShape(problem=protocol.problem_response, validation=protocol.validation_error)
    in_schema = False  # Cog's schema is its own document, <mount>/openapi.json

    def mount(self, settings: Settings) -> str | None:
        return None if settings.cog_api == "off" else settings.cog_api

    def router(self, at: str) -> APIRouter:
        return routes.router(at)

    def worker_side(self, settings: Settings) -> adapter.CogWorkerSide:
        return adapter.CogWorkerSide(settings.cog_upload_url)

    def webhook_style(self, state: Any) -> WebhookStyle:
        return adapter.webhook_style(state.service)


API = CogApi()
