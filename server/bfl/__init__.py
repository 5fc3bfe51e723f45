"""Black Forest Labs' API (api.bfl.ai): FLUX.1 Fill [pro] and Expand [pro] requests answered by this
server's model, ``get_result``, and BFL-style webhooks (see :mod:`server.bfl.adapter`).

- ``adapter``: a request as a prediction, a prediction as ``get_result``'s answer and its webhook.
- ``pictures``: the pictures checked from their headers on the API node, read and sized on the worker.
- ``routes``: ``POST /v1/flux-pro-1.0-fill``, ``POST /v1/flux-pro-1.0-expand``, ``GET /v1/get_result``.

Errors on these routes come in BFL's shape (``{"detail": ...}``; a bad key is its 403).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..apis import ErrorShape
from ..settings import Settings
from ..webhooks import WebhookStyle
from . import adapter, pictures, routes


class BflApi:
    name = adapter.API
    errors = ErrorShape(problem=adapter.problem_response, validation=adapter.validation_response)
    in_schema = True  # its routes are in /openapi.json, beside Replicate's

    def mount(self, settings: Settings) -> str | None:
        return ""  # at the root, as api.bfl.ai serves them

    def router(self, at: str) -> APIRouter:
        return routes.router

    def worker_side(self, settings: Settings) -> pictures.BFLWorkerSide:
        return pictures.BFLWorkerSide(settings.max_image_pixels)

    def webhook_style(self, state: Any) -> WebhookStyle:
        return adapter.webhook_style(state.service)


API = BflApi()
