"""OpenAI's image API (``/v1/images/edits``, ``/v1/images/generations``, ``/v1/models/{name}``) on
this server's engine.

A thin adapter: a request becomes one or more predictions in the same store, queue and lifecycle as
Replicate's (recorded with ``api="openai"``), and their outputs are answered in OpenAI's shapes.

- ``protocol``: the wire format (pydantic models) and OpenAI's error body.
- ``pictures``: the pictures checked from their headers on the API node.
- ``service``: a request as predictions, their outcomes as OpenAI's answer (JSON or streamed events).
- ``worker_side``: the pictures read, scaled and masked on the worker; the outputs fitted to the size.
- ``models``: the image model names accepted; ``routes``: the routes.

Every error on these routes comes in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..apis import ErrorShape
from ..settings import Settings
from . import protocol, routes, service
from .worker_side import OpenAIWorkerSide


class OpenAIApi:
    name = protocol.API
    errors = ErrorShape(problem=service.problem_response, validation=service.validation_response)
    in_schema = True  # its routes are in /openapi.json, beside Replicate's

    def mount(self, settings: Settings) -> str | None:
        return ""  # at the root, as api.openai.com serves them

    def router(self, at: str) -> APIRouter:
        return routes.router

    def worker_side(self, settings: Settings) -> OpenAIWorkerSide:
        return OpenAIWorkerSide(settings.max_image_pixels)

    def webhook_style(self, state: Any) -> None:
        return None  # OpenAI's image API has no webhooks


API = OpenAIApi()
