"""OpenAI's image API as predictions: a request becomes one prediction per four images (consecutive
seeds), made, queued, cancelled and recorded by the same service and lifecycle as Replicate's
creates (``api="openai"``, with what is needed to answer in ``api_data``); the answer waits for
them and is written in OpenAI's shape, or streamed as OpenAI's server-sent events.

A client that goes away before its images are made cancels its predictions.

Its length: one OpenAI request is several predictions, answered together as JSON or as a stream
of events, and canceled together when the client goes away; the wire shapes are in protocol.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from inference.errors import ALL_FLAGGED
from inference.inputs import MAX_OUTPUTS, MAX_SEED

from ..admission import Admission
from ..auth import Caller
from ..middleware import name_request
from ..predictions import NO_SEGMENTER_HERE
from ..protocol import ApiError, PredictionRequest, Problem, Status
from ..records import PredictionRecord
from ..state import AppState
from . import models
from .pictures import check_edit, converted
from .protocol import (
    API,
    EDITS,
    ENGINE_FORMATS,
    GENERATIONS,
    MASK_INPUT,
    CompletedEvent,
    ImageData,
    ImageOptions,
    ImagesResponse,
    OpenAIError,
    PartialImageEvent,
    Usage,
    from_validation,
    invalid,
)
from .worker_side import ran, usage_of

log = logging.getLogger(__name__)
EVENT_PREFIX = {EDITS: "image_edit", GENERATIONS: "image_generation"}
DEFAULT_SIZE = (1024, 1024)  # a generation's size when it asks for "auto"
ADMITTED = Admission(version="hidden", wait=None, cancel_after_s=None)
KEEPALIVE_S = 15.0
WATCH_RENEW_S = 5.0  # a stream that wants previews says so again this often while it waits
MAX_FORM_FILES = 17  # OpenAI takes up to 16 images, and a mask


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(mode="json"), status_code=exc.status, headers=exc.headers)


def from_api_error(exc: ApiError) -> OpenAIError:
    """One of the server's own refusals (overload, quota, full disk) in OpenAI's shape and status."""
    return from_problem(exc.problem, exc.headers)


def from_problem(problem: Problem, headers: dict[str, str] | None = None) -> OpenAIError:
    """An error of this server (a refusal, 404, 405, 408, 413, 429, 5xx) in OpenAI's shape and status."""
    if problem.status == 401:
        return unauthenticated()
    if problem.status == 429:
        return OpenAIError(429, problem.detail, type="requests", code="rate_limit_exceeded", headers=headers)
    if problem.status >= 500:
        return OpenAIError(problem.status, problem.detail, type="server_error", code=None, headers=headers)
    return OpenAIError(400 if problem.status == 422 else problem.status, problem.detail, headers=headers)


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(from_problem(problem, headers))


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """A request FastAPI's validation refused, as OpenAI's 400 naming the first broken parameter."""
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = str(loc[0]) if loc else None
    message = str(first.get("msg", "The request is invalid.")).removeprefix("Value error, ")
    return error_response(OpenAIError(400, f"Invalid value for '{param}': {message}" if param else message,
                                      param=param))


def unauthenticated() -> OpenAIError:
    return OpenAIError(401, "Incorrect API key provided. Pass one of this server's API tokens as "
                            "'Authorization: Bearer <token>'.", code="invalid_api_key")


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64," + base64.b64encode(data).decode()


def selection(options: ImageOptions, endpoint: str) -> dict[str, Any]:
    """An edit's mask_prompt and mask_mode, as the prediction's input keeps them (none when not sent)."""
    if endpoint != EDITS or not options.mask_prompt:
        return {}
    return {"mask_prompt": options.mask_prompt, "mask_mode": options.mask_mode}


def adapter_request(sent_input: dict[str, Any]) -> PredictionRequest:
    """The create of one prediction of an OpenAI request. Its input is this adapter's own, checked
    here (a generation has no image; an edit keeps OpenAI's mask as ``openai_mask``), so it is not
    validated as a Replicate body; the worker validates what the engine is given."""
    request = PredictionRequest.model_construct(input=None, version=None, webhook=None, webhook_events_filter=None,
                                                webhook_completed=None, stream=None)
    request._sent_input = sent_input
    return request


class ClientGone(Exception):
    """The client closed its connection before its images were made."""


@dataclass(frozen=True)
class Sent:
    """An edit's pictures as the client sent them (bytes, not decoded)."""

    image: bytes
    mask: bytes | None


@dataclass(frozen=True)
class Made:
    """A request's predictions, and the exact size of every image it answers."""

    ids: list[str]
    size: tuple[int, int]


class OpenAIImages:
    def __init__(self, state: AppState):
        self.state = state
        self.service = state.service

    # -- reading a request ---------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        caller = self.state.auth.identify(request)
        if caller is None:
            raise unauthenticated()
        return caller

    def options(self, fields: dict[str, Any]) -> ImageOptions:
        try:
            options = ImageOptions.model_validate(fields)
        except ValidationError as exc:
            raise from_validation(exc) from None
        accepted = self.state.settings.openai_models
        if options.model is not None and not models.accepts(accepted, options.model):
            raise OpenAIError(400, f"Invalid value: '{options.model}'. Supported values are: "
                                   f"{', '.join(repr(m) for m in accepted)}.", param="model", code="invalid_value")
        return options

    async def read_edit(self, request: Request) -> tuple[ImageOptions, Sent]:
        """The multipart form of an edit, as the openai clients send it: ``image`` (or ``image[]``,
        of which the first is edited), an optional ``mask``, and the options as text fields. The
        pictures are read as bytes (uploads past 1 MB wait on disk while the form is read), never
        decoded here."""
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise invalid("The body must be multipart/form-data with an 'image' file and a 'prompt'.", None,
                          "invalid_request")
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=64)
        except Exception:
            raise invalid("The body is not a valid multipart/form-data form.", None, "invalid_request") from None
        try:
            images = [part for key in ("image", "image[]") for part in form.getlist(key) if not isinstance(part, str)]
            if not images:
                raise invalid("Missing required parameter: 'image'.", "image", "missing_required_parameter")
            mask = form.get("mask")
            if isinstance(mask, str):
                raise invalid("Invalid 'mask': it must be an image file.", "mask")
            fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
            options = self.options(fields)
            image_bytes = await images[0].read()
            mask_bytes = await mask.read() if mask is not None else None
        finally:
            await form.close()
        return options, Sent(image=image_bytes, mask=mask_bytes)

    async def read_generation(self, request: Request) -> tuple[ImageOptions, None]:
        try:
            fields = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise invalid("The body must be a JSON object.", None, "invalid_json") from None
        if not isinstance(fields, dict):
            raise invalid("The body must be a JSON object.", None, "invalid_json")
        return self.options(fields), None

    # -- making the predictions ----------------------------------------------------------------

    def pictures(self, options: ImageOptions, sent: Sent | None) -> tuple[dict[str, str], tuple[int, int]]:
        """An edit's pictures as the prediction keeps them (as sent, data: URIs of the type their
        headers show), once their headers pass OpenAI's rules; and the size of every output. Nothing
        is decoded: the worker makes the engine's image and mask of them (see worker_side)."""
        if sent is None:
            return {}, options.dimensions or DEFAULT_SIZE
        image, mask = check_edit(sent.image, sent.mask, self.state.settings.max_image_pixels)
        pictures = {"image": data_uri(sent.image, image.content_type)}
        if sent.mask is not None:
            pictures[MASK_INPUT] = data_uri(sent.mask, mask.content_type)
        return pictures, options.dimensions or image.size

    def create(self, caller: Caller, options: ImageOptions, pictures: dict[str, str], size: tuple[int, int],
               endpoint: str) -> Made:
        """One prediction per four images, from consecutive seeds: image i is made from seed + i. A
        refusal (ApiError) cancels those already made."""
        seed = random.randint(0, MAX_SEED - options.n)
        made: list[str] = []
        try:
            for first in range(0, options.n, MAX_OUTPUTS):
                count = min(MAX_OUTPUTS, options.n - first)
                sent_input = {
                    "prompt": options.prompt, **pictures, **selection(options, endpoint),
                    "num_outputs": count, "num_inference_steps": options.steps, "seed": seed + first,
                    "megapixels": "match_input", "output_format": ENGINE_FORMATS[options.output_format],
                    "output_quality": options.output_compression,
                }
                api_data = {"endpoint": endpoint, "size": list(size), "model": options.model,
                            "quality": options.quality, "output_format": options.output_format,
                            "output_compression": options.output_compression,
                            "response_format": options.response_format, "user": options.user, "n": options.n,
                            "first": first, "stream": options.stream, "partial_images": options.partial_images}
                record = self.service.create(adapter_request(sent_input), ADMITTED, caller, api=API,
                                             api_data=api_data)
                made.append(record.id)
        except BaseException:
            self.cancel(made)
            raise
        log.info("OpenAI image %s for model %r, %d image(s) at %dx%d: run by %s as prediction(s) %s", endpoint,
                 options.model or models.OWN_NAME, options.n, size[0], size[1], models.SERVED_BY, ", ".join(made))
        return Made(ids=made, size=size)

    def cancel(self, ids: list[str]) -> None:
        for pid in ids:
            record = self.service.get(pid)
            if record is not None and not record.status.terminal:
                self.service.cancel(pid)

    # -- answering -----------------------------------------------------------------------------

    async def answer(self, request: Request, endpoint: str) -> Response:
        caller = self.caller(request)
        options, sent = await (self.read_edit(request) if endpoint == EDITS else self.read_generation(request))
        if endpoint != EDITS and options.mask_prompt:
            raise invalid("Invalid 'mask_prompt': it selects what an edit repaints; a generation has no image to "
                          "select in.", "mask_prompt")
        if options.mask_prompt and not self.state.settings.segmenter:
            raise invalid(f"Invalid 'mask_prompt': {NO_SEGMENTER_HERE}.", "mask_prompt")
        # Admission before work (AppState.submit): the setup and the queue, then the pictures' headers,
        # then the rate limit, then the predictions are written.
        read: dict[str, Any] = {}

        async def read_headers() -> None:
            read["pictures"], read["size"] = await run_in_threadpool(self.pictures, options, sent)

        made = await self.state.submit(caller, lambda: self.create(caller, options, read["pictures"], read["size"],
                                                                   endpoint), read_headers, count=lambda m: len(m.ids))
        name_request(request, made.ids[0])
        base = self.state.api_base(request)
        if options.stream:
            return EventSourceResponse(self.events(made, options, endpoint), ping=KEEPALIVE_S)
        try:
            records = await self.settled(made.ids, request)
        except ClientGone:
            log.info("an OpenAI image request was closed by its client: predictions %s canceled", ", ".join(made.ids))
            return Response(status_code=499)
        self.check_succeeded(records)
        data = [await run_in_threadpool(self.image_data, record, name, options, base)
                for record in records for name in record.output or []]
        answer = ImagesResponse(created=int(records[0].created_at), data=data, output_format=options.output_format,
                                quality=self.quality_name(options), size="x".join(map(str, made.size)),
                                usage=usage_of(records), mask_url=self.service.mask_url(records[0], base))
        return JSONResponse(answer.model_dump(mode="json"))

    async def settled(self, ids: list[str], request: Request) -> list[PredictionRecord]:
        """The predictions once all have ended; a client that goes away first cancels them."""
        gone = asyncio.create_task(_disconnected(request))
        try:
            while True:
                records = [self.service.get(pid) for pid in ids]
                pending = [r.id for r in records if r is None or not r.status.terminal]
                if not pending:
                    return records
                if self.service.stopping:
                    raise OpenAIError(503, "The server is shutting down; the images will be made after it restarts "
                                           f"(predictions {', '.join(ids)}).", type="server_error")
                waiting = asyncio.create_task(self.service.wait(pending[0], KEEPALIVE_S))
                done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    waiting.cancel()
                    self.cancel(ids)
                    raise ClientGone()
        finally:
            gone.cancel()

    @staticmethod
    def check_succeeded(records: list[PredictionRecord | None]) -> None:
        for record in records:
            if record is None:
                raise OpenAIError(500, "The image request's prediction was deleted.", type="server_error")
            if record.status == Status.FAILED and record.error == ALL_FLAGGED:
                # OpenAI's answer to a refused image: a 400, which its clients do not retry.
                raise OpenAIError(400, f"Your request was rejected by the safety system: {record.error}",
                                  type="image_generation_user_error", code="moderation_blocked")
            if record.status == Status.FAILED:
                raise OpenAIError(500, f"The image could not be made: {record.error}", type="server_error")
            if record.status == Status.CANCELED:
                raise OpenAIError(500, f"The image request was canceled (prediction {record.id}).",
                                  type="server_error", code="canceled")
            if record.data_removed:
                raise OpenAIError(500, "The images were removed by the retention time.", type="server_error")

    @staticmethod
    def quality_name(options: ImageOptions) -> str:
        return "high" if options.quality in ("auto", "standard", "hd") else options.quality

    def image_data(self, record: PredictionRecord, name: str, options: ImageOptions, base: str) -> ImageData:
        if options.response_format == "url":
            return ImageData(url=self.service.output_url(record, name, base))
        return ImageData(b64_json=self.b64(record, name))

    def b64(self, record: PredictionRecord, name: str) -> str:
        data = self.service.files.read_output(record.id, name, record.output_run)
        if data is None:
            raise OpenAIError(500, f"The output {name} of prediction {record.id} is missing.", type="server_error")
        return base64.b64encode(data).decode()

    # -- streaming -----------------------------------------------------------------------------

    async def events(self, made: Made, options: ImageOptions, endpoint: str) -> AsyncIterator[ServerSentEvent]:
        """OpenAI's streamed events: ``<kind>.partial_image`` while each prediction denoises (its
        live previews, up to ``partial_images`` of each prediction, in the request's format and
        size), then ``<kind>.completed`` for each image, with its usage: the first completed event
        carries the request's input tokens and its image's output tokens, each later one its own
        image's, so that the events' usages add up to the request's. A client that goes away
        cancels what is still running; a failure is an ``error`` event in OpenAI's error shape."""
        ids = made.ids
        prefix = EVENT_PREFIX[endpoint]
        shape = {"size": "x".join(map(str, made.size)), "quality": self.quality_name(options),
                 "output_format": options.output_format}
        finished, index, first_image = False, 0, True  # index: of the partial images, all predictions together
        if options.partial_images:
            for pid in ids:  # previews are made only for predictions someone watches (see Lifecycle.watch_previews)
                self.service.lifecycle.watch_previews(pid)
        try:
            for pid in ids:
                record = None
                async for item in self.progress(pid, options.partial_images):
                    if isinstance(item, bytes):
                        data = await run_in_threadpool(converted, item, made.size,
                                                       ENGINE_FORMATS[options.output_format], options.output_compression)
                        event = PartialImageEvent(type=f"{prefix}.partial_image", b64_json=base64.b64encode(data).decode(),
                                                  partial_image_index=index, created_at=int(time.time()),
                                                  **shape)
                        index += 1
                        yield ServerSentEvent(event=event.type, data=event.model_dump_json())
                    else:
                        record = item
                try:
                    self.check_succeeded([record])
                except OpenAIError as exc:
                    yield ServerSentEvent(event="error", data=exc.body.model_dump_json())
                    finished = True
                    return
                facts = ran(record)
                for name in record.output or []:
                    b64 = await run_in_threadpool(self.b64, record, name)
                    text, image = (facts.text_tokens, facts.image_tokens) if first_image else (0, 0)
                    first_image = False
                    usage = Usage.counted(text, image, facts.tokens_per_output)
                    event = CompletedEvent(type=f"{prefix}.completed", b64_json=b64, created_at=int(time.time()),
                                           usage=usage, **shape)
                    yield ServerSentEvent(event=event.type, data=event.model_dump_json())
            finished = True
        finally:
            if not finished:
                self.cancel(ids)

    async def progress(self, prediction_id: str, partial_images: int) -> AsyncIterator[bytes | PredictionRecord | None]:
        """A prediction's new previews (their bytes, at most ``partial_images``) while it runs, then
        its record once it has ended (None if it is gone)."""
        queue = self.service.hub.subscribe(prediction_id)
        sent, last_step = 0, -1
        try:
            while True:
                record = self.service.get(prediction_id)
                if record is None or record.status.terminal:
                    yield record
                    return
                if sent < partial_images:
                    self.service.lifecycle.watch_previews(prediction_id)  # renewed while this stream waits
                    preview = self.service.preview(prediction_id)
                    if preview is not None and preview.step > last_step:
                        last_step, sent = preview.step, sent + 1
                        yield preview.data
                try:
                    await asyncio.wait_for(queue.get(), timeout=WATCH_RENEW_S if sent < partial_images else KEEPALIVE_S)
                except asyncio.TimeoutError:
                    continue
                while not queue.empty():  # an event only says "look again": once is enough
                    queue.get_nowait()
        finally:
            self.service.hub.unsubscribe(prediction_id, queue)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

