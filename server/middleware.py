"""ASGI middleware: the body size and time limits, HEAD on every GET route, paths with a trailing
slash, the refusal of this server's own fetches, and the ``x-request-id`` of every answer.

Each is a plain ASGI wrapper (no BaseHTTPMiddleware), so streamed responses stay streamed.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.routing import Match, Router

from .fetching import HEADER
from .files import describe_bytes
from .protocol import Problem

PROBLEM = "application/problem+json"
FETCH_HEADER = HEADER.encode()


def problem_response(problem: Problem, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(problem.model_dump(mode="json", exclude_none=True), status_code=problem.status,
                        media_type=PROBLEM, headers=headers)


def refusal(scope, problem: Problem, headers: dict | None = None) -> JSONResponse:
    """A middleware's refusal in the shape the route's clients read: an API's own (see server.apis)
    on its routes, problem+json everywhere else."""
    from .apis import shape_of

    if shape := shape_of(scope):
        return shape.problem(problem, headers)
    return problem_response(problem, headers)


class BodyLimit:
    """Refuse request bodies over the limit (413) before they are read into memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = Problem(title="Payload Too Large", detail=f"The request body is larger than {describe_bytes(self.limit)}.", status=413)
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await refusal(scope, too_big)(scope, receive, send)
        seen, exceeded, answered = 0, False, False

        async def limited():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded(message):
            # A chunked body (no Content-Length) goes over the limit inside the app, which turns the
            # error into its own answer (FastAPI: 400 "error parsing the body"): drop it, answer 413.
            nonlocal answered
            if exceeded:
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:  # _TooLarge, or whatever the app made of it
            if not exceeded:
                raise
        if exceeded and not answered:
            await refusal(scope, too_big)(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyTimeout:
    """A request's whole body must arrive within ``timeout_s`` of its headers. A slower one (a
    client sending a byte now and then) is answered 408 and its connection closed, so it holds a
    connection, and the part it sent, no longer than that."""

    def __init__(self, app, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done, timed_out, answered = False, False, False

        async def timed():
            nonlocal body_done, timed_out
            if body_done:  # after the body: only a disconnect is left to wait for, however long
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                timed_out = True
                raise _SlowBody() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded(message):
            # The app turns the error into its own answer (FastAPI: 400 "error parsing the body"): drop it.
            nonlocal answered
            if timed_out:
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, timed, guarded)
        except Exception:  # _SlowBody, or whatever the app made of it
            if not timed_out:
                raise
        if timed_out and not answered:
            slow = Problem(title="Request Timeout", status=408,
                           detail=f"The request body did not arrive within {self.timeout_s:g} s.")
            await refusal(scope, slow, {"connection": "close"})(scope, receive, send)


class _SlowBody(Exception):
    pass


class HeadAsGet:
    """HEAD is answered on every GET route with the GET's status and headers and no body.

    FastAPI routes declared with GET answer HEAD with 405. Here a HEAD runs as a GET; once its
    headers are sent the answer is complete, and the app is told the client has gone, so that a
    streamed answer (server-sent events) stops instead of running on for nobody."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        answered = False

        async def head_receive():
            return {"type": "http.disconnect"} if answered else await receive()

        async def head_send(message):
            nonlocal answered
            if answered or message["type"] != "http.response.start":
                return
            answered = True
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app(dict(scope, method="GET"), head_receive, head_send)


class TrailingSlash:
    """A path with a trailing slash is served as the same path without it, directly: the Python
    client does not follow the 307 a router would answer. Paths that exist with their slash (the
    web page under a prefix, "/replicate/") are left alone."""

    def __init__(self, app, router: Router):
        self.app, self.router = app, router

    def _known(self, scope) -> bool:
        return any(route.matches(scope)[0] != Match.NONE for route in self.router.routes)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/") and not self._known(scope):
            trimmed = path.rstrip("/") or "/"
            candidate = dict(scope, path=trimmed, raw_path=trimmed.encode())
            if self._known(candidate):
                scope = candidate
        await self.app(scope, receive, send)


class RefuseOwnFetches:
    """508 for a request that carries this server's own fetch mark: an input URL led back here
    (see :mod:`server.fetching`). Output files and stored inputs are still served: they are plain
    files, and a prediction's output URL may rightly be the next one's input (the worker reads such
    URLs where they lie; this covers a redirect to one)."""

    def __init__(self, app, own, prefix: str = ""):
        self.app, self.own = app, own
        self.outputs = tuple(f"{p}/{kind}/" for p in {"", prefix} for kind in ("outputs", "inputs"))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope.get("headers") or ():
                if name == FETCH_HEADER:
                    mark = value.decode("latin-1")
                    path = scope.get("path", "")
                    if self.own.is_ours(mark) and not path.startswith(self.outputs):
                        self.own.refused(mark, path)
                        loop = Problem(title="Loop Detected", status=508,
                                       detail="This request is this server's own fetch of an input URL that led back "
                                              "to it; a prediction's inputs are never fetched from the server that runs it.")
                        return await problem_response(loop)(scope, receive, send)
        await self.app(scope, receive, send)


REQUEST_ID = "request_id"  # the key of the answer's id in the request's state


def name_request(request: Request, prediction_id: str) -> None:
    """The answer to this request is about this prediction (it made it, read it or canceled it): its
    ``x-request-id`` is the prediction's id, which the clients show in their logs and errors."""
    request.state.request_id = prediction_id


class RequestId:
    """Every answer carries ``x-request-id`` (the openai clients read it as ``request_id``, and logs
    and support tickets quote it): the id of the prediction the request made or read when a route
    named one (:func:`name_request`), else a fresh ``req_<32 hex>``. Outermost, so that the
    refusals of the other middleware carry one too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # the dict behind request.state, shared by the copies of scope
        state.pop(REQUEST_ID, None)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["x-request-id"] = state.get(REQUEST_ID) or f"req_{secrets.token_hex(16)}"
            await send(message)

        await self.app(scope, receive, send_with_id)
