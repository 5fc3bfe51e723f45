"""JSON bodies in and out of the event loop's way: answers that carry strings read from files,
without holding them in memory, and requests whose large JSON is parsed on a worker thread.

A prediction answered exactly as sent may carry a 90 MB input data URI, and four PNG outputs as
data URIs. Building that JSON in memory costs several times its size per request. Here the JSON is
built with a placeholder for each such string; the answer streams the JSON around them and each
string straight from its file, a chunk at a time (escaped as JSON escapes it, or base64-encoded).
The bytes are those ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` would give.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

CHUNK = 1 << 20  # characters of text, or bytes of a file to base64 (a multiple of 3)
_B64_CHUNK = 3 * (CHUNK // 3)
Source = Callable[[], Iterator[bytes]]  # yields one JSON string token, quotes included


def dumps(content: Any) -> str:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def text_file(path: Path) -> Source:
    """The UTF-8 text of a file as a JSON string; a file gone meanwhile is the empty string."""
    def tokens() -> Iterator[bytes]:
        try:
            fh = open(path, encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            yield b'""'
            return
        with fh:
            yield b'"'
            while chunk := fh.read(CHUNK):
                yield dumps(chunk)[1:-1].encode("utf-8")
            yield b'"'
    return tokens


def data_uri_file(path: Path, media_type: str) -> Source:
    """A file as a ``data:<type>;base64,...`` JSON string."""
    def tokens() -> Iterator[bytes]:
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            yield b'""'
            return
        with fh:
            yield f'"data:{media_type};base64,'.encode()
            while chunk := fh.read(_B64_CHUNK):
                yield base64.b64encode(chunk)
            yield b'"'
    return tokens


class LargeStrings:
    """Placeholders for strings streamed from files when the answer is written.

    ``add(source)`` gives a placeholder string to put in the content; ``response(content)`` answers
    the content with each placeholder replaced by what its source yields."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(16)
        self.sources: list[Source] = []

    def add(self, source: Source) -> str:
        self.sources.append(source)
        return f"\x00{self.tag}:{len(self.sources) - 1}\x00"

    def response(self, content: Any, status_code: int = 200, headers: dict | None = None) -> Response:
        text = dumps(content)
        if not self.sources:
            return Response(text.encode("utf-8"), status_code, headers, media_type="application/json")
        # "\x00" is written "\u0000" by json.dumps: the placeholder cannot be confused with a client's text
        # unless the client guessed this answer's random tag.
        pieces = re.split(r'"\\u0000' + self.tag + r':(\d+)\\u0000"', text)

        def body() -> Iterator[bytes]:
            for i, piece in enumerate(pieces):
                if i % 2 == 0:
                    if piece:
                        yield piece.encode("utf-8")
                else:
                    yield from self.sources[int(piece)]()

        return StreamingResponse(body(), status_code, headers, media_type="application/json")


OFF_LOOP_BYTES = 256 * 1024  # request bodies at least this large are parsed off the event loop


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            # Parsing a 60 MB data URI takes a good part of a second: never on the event loop.
            self._json = await run_in_threadpool(json.loads, body) if len(body) >= OFF_LOOP_BYTES else json.loads(body)
        return self._json


class OffLoopJSON(APIRoute):
    """A route whose JSON body, when large, is parsed on a worker thread (FastAPI parses it on the
    event loop), so a create carrying tens of megabytes of data URIs keeps no other request waiting.
    Validation, errors and the OpenAPI schema are FastAPI's own."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def off_loop(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive, request._send))

        return off_loop
