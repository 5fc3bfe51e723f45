"""Replicate's predictions API, as its official clients (Python and JavaScript) use it.

- ``routes``: create (model, version, deployment), get, list, cancel, the SSE stream, the preview.
- ``answers``: a prediction, a list page and a webhook body in Replicate's shape.
- ``files``: the files API (``/v1/files``), and the output and input URLs every API answers with.
- ``models``: the model, its versions and deployments (``GET /v1/models`` answers OpenAI's
  clients too).

Its wire format is :mod:`server.protocol`; its errors are problem+json, as are those of the
server's own routes (health, metrics, the page).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from inference.inputs import describe_errors

from ..apis import ErrorShape
from ..middleware import problem_response
from ..protocol import InvalidField, validation_failed
from ..settings import Settings
from . import files, models, routes

API = None  # the ``api`` of its predictions: none, the server's own


def validation_response(errors: list[dict[str, Any]]):
    """A request FastAPI's validation refused, as Replicate's 422 with its invalid fields named as
    the input's (``input.prompt``)."""
    fields = []
    for err in errors:
        loc = [p for p in err.get("loc", ()) if not isinstance(p, int)]
        if loc and loc[0] == "body":
            loc = loc[1:]
        if loc and loc[0] == "input":
            prefix, rest = "input.", loc[1:]
        else:
            prefix, rest = "", loc
        err = dict(err, loc=tuple(rest))
        if err.get("type") == "json_invalid" or (not rest and not prefix):
            fields.append(InvalidField(type="format", field="body", description="the body must be a JSON object"))
            continue
        for fe in describe_errors([err], prefix):
            fields.append(InvalidField(type=fe.type, field=fe.field, description=fe.description))
    return problem_response(validation_failed(fields).problem)


class ReplicateApi:
    name = API
    errors = ErrorShape(problem=problem_response, validation=validation_response)
    in_schema = True

    def mount(self, settings: Settings) -> str | None:
        return ""

    def router(self, at: str) -> APIRouter:
        router = APIRouter()
        for part in (routes.router, routes.stream_router, files.router, models.router):
            router.routes.extend(part.routes)  # as they are (each keeps its route class)
        return router

    def worker_side(self, settings: Settings) -> None:
        return None  # its input is the engine's, as sent

    def webhook_style(self, state: Any) -> None:
        return None  # the lifecycle's default, answers.webhook_body


REPLICATE = ReplicateApi()
