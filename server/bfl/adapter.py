"""Black Forest Labs' API (api.bfl.ai) on this server's predictions: FLUX.1 Fill [pro] and Expand
[pro] requests, ``get_result`` answers and BFL-style webhooks.

A BFL request is translated into this model's input and written as any prediction (``api="bfl"``):
it queues, cancels, survives restarts and shows in ``GET /v1/predictions`` and the web page. What
only BFL's answers need (the endpoint, the request's own values, the webhook secret) is kept in the
record's ``api_data``, which Replicate's answers never show.

- Guidance: Fill [pro]'s scale is twice FLUX.1 Fill [dev]'s (pro's default 60, range 1.5 to 100; dev's
  default 30), so ``guidance = bfl_guidance / 2``, clamped to dev's 0 to 100.
- Sizes, exactly as BFL's: Fill's output is the input's size, Expand's the input's plus the sides
  (``top``/``bottom``/``left``/``right`` are ``expand_*``). The engine generates at sides floored to
  a multiple of 32 (at most 1440 px, ``megapixels: match_input``) and the worker scales the outputs
  back to that size (server.bfl.pictures). A mask must have the image's size (422 naming it).
- Admission before work: the setup and the queue are checked first, then the pictures' headers (a
  base64 image is read for its header only, never decoded on the API node), then the rate limit is
  charged; a picture given as a URL is checked by the worker that fetches it, and fails the task in
  words.
- The create's ``cost`` is in this server's own unit, megapixel-steps: the megapixels the engine
  generates times the denoising steps, divided by 50 (a 1 MP fill at BFL's default 50 steps costs
  1.0); ``input_mp`` and ``output_mp`` are the input's and the output's megapixels. All three are
  null when the image is a URL (its size is known once a worker fetches it).
- ``safety_tolerance`` and ``prompt_upsampling`` are accepted and kept, but change nothing: the safety
  checker is the server's, and there is no prompt upsampler offline.
- Errors in BFL's shape: 403 ``{"detail": "Not authenticated - Invalid Authentication"}`` for a
  missing or wrong key, FastAPI's 422 ``{"detail": [{"loc", "msg", "type"}]}`` for a bad value.
- Statuses: ``Pending`` (queued or running, with a ``Retry-After``), ``Ready``, ``Error`` (failed or
  canceled), ``Content Moderated`` (every output flagged by the safety checker), ``Task not found``
  (unknown, another tenant's, or removed by retention).
- Webhooks: the final ``get_result`` body plus a ``timestamp``, POSTed once the prediction ends and
  signed, when the request gave a ``webhook_secret``, with ``X-BFL-Signature: sha256=<hex HMAC-SHA256
  of the body>``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from typing import TYPE_CHECKING, Any, Literal

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from inference.errors import ALL_FLAGGED
from inference.inputs import MAX_EXPAND, MAX_SEED, MaskMode, describe_errors
from inference.segment import MAX_PROMPT_CHARS as SELECTION_CHARS

from ..admission import admit
from ..auth import Caller
from ..events import COMPLETED
from ..predictions import PredictionService, iso
from ..protocol import (
    ApiError,
    InvalidField,
    PredictionRequest,
    Problem,
    Status,
    lone_surrogate_at,
    not_unicode,
    validation_failed,
)
from ..records import PredictionRecord
from ..webhooks import Signer, WebhookStyle, sign_bfl
from .pictures import check_pictures

if TYPE_CHECKING:
    from ..state import AppState

API = "bfl"
FILL = "flux-pro-1.0-fill"
EXPAND = "flux-pro-1.0-expand"
SIGNATURE_HEADER = "X-BFL-Signature"
NOT_AUTHENTICATED = "Not authenticated - Invalid Authentication"  # BFL's 403 detail for a bad or missing x-key
DEV_GUIDANCE_RANGE = (0.0, 100.0)
PENDING_RETRY_CAP_S = 10
_SNIFF_CHARS = 64  # base64 characters decoded to tell an image's type: 48 bytes
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"))


# -- wire shapes ------------------------------------------------------------------------------------


class _Common(BaseModel):
    """The inputs Fill [pro] and Expand [pro] share, with BFL's names, defaults and limits."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field("", description="What to generate in the repainted (or added) area.")
    steps: int | None = Field(50, ge=15, le=50, description="Number of denoising steps.")
    prompt_upsampling: bool | None = Field(False, description="Accepted; this server has no prompt upsampler.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; random when not set.")
    guidance: float | None = Field(60, ge=1.5, le=100,
                                   description="Fill [pro]'s guidance; FLUX.1 Fill [dev] runs at half of it.")
    output_format: Literal["jpeg", "png"] | None = Field("jpeg", description="Format of the output image.")
    safety_tolerance: int | None = Field(2, ge=0, le=6, description="Accepted; the server's safety checker decides.")
    webhook_url: str | None = Field(None, min_length=1, max_length=2083,
                                    description="URL to POST the result to when the task ends.")
    webhook_secret: str | None = Field(None, description="Signs the webhook: X-BFL-Signature: sha256=<hex HMAC>.")


class FillRequest(_Common):
    """POST /v1/flux-pro-1.0-fill (BFL's FluxProFillInputs)."""

    model_config = ConfigDict(extra="ignore", title="FluxProFillInputs")

    image: str = Field(..., description="The image to inpaint: base64, or an http(s) URL. Its alpha is the "
                                        "mask when no mask is given.")
    mask: str | None = Field(None, description="Black keeps, white repaints: base64, or an http(s) URL.")
    # This server's additions (BFL's Fill has none like them): what to repaint in words, combined with
    # the mask (or the image's alpha) by mask_mode.
    mask_prompt: str | None = Field(None, max_length=SELECTION_CHARS,
                                    description="What to repaint, in words (\"the red car\"), instead of or with a "
                                                "mask; needs a server started with --segmenter.")
    mask_mode: MaskMode = Field("add", description="How mask_prompt's selection combines with the mask: add, "
                                                   "replace, subtract or intersect.")


class ExpandRequest(_Common):
    """POST /v1/flux-pro-1.0-expand (BFL's FluxProExpandInputs)."""

    model_config = ConfigDict(extra="ignore", title="FluxProExpandInputs")

    image: str = Field(..., description="The image to expand: base64, or an http(s) URL.")
    top: int | None = Field(0, ge=0, le=MAX_EXPAND, description="Pixels added above the image.")
    bottom: int | None = Field(0, ge=0, le=MAX_EXPAND, description="Pixels added below the image.")
    left: int | None = Field(0, ge=0, le=MAX_EXPAND, description="Pixels added left of the image.")
    right: int | None = Field(0, ge=0, le=MAX_EXPAND, description="Pixels added right of the image.")


class AsyncResponse(BaseModel):
    """The create's answer (BFL's AsyncResponse). ``cost`` is in megapixel-steps (see the module's
    docstring), not BFL's credits; it, ``input_mp`` and ``output_mp`` are null for a URL image."""

    id: str
    polling_url: str
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


class ResultStatus(str, enum.Enum):
    """BFL's StatusResponse."""

    TASK_NOT_FOUND = "Task not found"
    PENDING = "Pending"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"
    READY = "Ready"
    ERROR = "Error"


class ResultResponse(BaseModel):
    """GET /v1/get_result (BFL's ResultResponse). ``progress`` is the share of denoising steps done,
    0 to 1."""

    id: str
    status: ResultStatus
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None
    preview: dict[str, Any] | None = None


# -- errors in BFL's shape --------------------------------------------------------------------------


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """A 422 as FastAPI (and so BFL) writes it: ``{"detail": [{"loc", "msg", "type"}, ...]}``. The
    value sent is not echoed (it may be a whole image)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in errors]
    return JSONResponse(jsonable_encoder({"detail": detail}), status_code=422)


# The fields of this model's input, and of the create request, as BFL names them.
_BFL_NAMES = {"input.num_inference_steps": "steps", "input.expand_top": "top", "input.expand_bottom": "bottom",
              "input.expand_left": "left", "input.expand_right": "right", "webhook": "webhook_url"}


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error of this server (422 with fields, 429, 503, ...) in BFL's shape; a missing or wrong
    key is BFL's 403, in BFL's words (its clients tell a bad key by them)."""
    if problem.status == 401:
        return JSONResponse({"detail": NOT_AUTHENTICATED}, status_code=403, headers=headers)
    if problem.status == 422 and problem.invalid_fields:
        detail = [{"loc": ["body", _BFL_NAMES.get(f.field, f.field.removeprefix("input."))],
                   "msg": f.description, "type": f.type} for f in problem.invalid_fields]
        return JSONResponse({"detail": detail}, status_code=422, headers=headers)
    return JSONResponse({"detail": problem.detail}, status_code=problem.status, headers=headers)


def _invalid(field: str, message: str, kind: str = "value_error") -> ApiError:
    return validation_failed([InvalidField(type=kind, field=field, description=message)])


# -- requests to predictions ------------------------------------------------------------------------


def file_input(value: str, field: str) -> str:
    """A BFL image field as this model's file input: an http(s) URL (or a data: URI) as it is, plain
    base64 as a data: URI of the type its first bytes show (PNG, JPEG, WebP or GIF)."""
    text = value.strip()
    if text.lower().startswith(("http://", "https://", "data:")):
        return text
    head = re.sub(r"\s+", "", text[: _SNIFF_CHARS * 2])[:_SNIFF_CHARS]
    try:
        start = base64.b64decode(head[: len(head) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        start = b""
    mime = next((m for magic, m in _MAGIC if start.startswith(magic)), None)
    if mime is None and start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise _invalid(f"input.{field}", f"{field} must be a base64-encoded PNG, JPEG, WebP or GIF image, "
                                         "or an http(s) URL")
    return f"data:{mime};base64,{text}"


def dev_guidance(bfl_guidance: float) -> float:
    """Fill [pro]'s guidance as FLUX.1 Fill [dev]'s: half of it, clamped to dev's range."""
    low, high = DEV_GUIDANCE_RANGE
    return min(high, max(low, bfl_guidance / 2))


def model_input(body: FillRequest | ExpandRequest) -> dict[str, Any]:
    """This model's input for a BFL request (only the values it sets; the rest are the defaults)."""
    data: dict[str, Any] = {
        "prompt": body.prompt or "",
        "image": file_input(body.image, "image"),
        "num_inference_steps": body.steps if body.steps is not None else 50,
        "guidance": dev_guidance(body.guidance if body.guidance is not None else 60),
        "output_format": "png" if body.output_format == "png" else "jpg",
        "megapixels": "match_input",
    }
    if body.seed is not None:
        data["seed"] = body.seed
    if isinstance(body, FillRequest) and body.mask:
        data["mask"] = file_input(body.mask, "mask")
    if isinstance(body, FillRequest) and body.mask_prompt:
        data.update(mask_prompt=body.mask_prompt, mask_mode=body.mask_mode)
    if isinstance(body, ExpandRequest):
        for side in ("top", "bottom", "left", "right"):
            if getattr(body, side):
                data[f"expand_{side}"] = getattr(body, side)
    return data


def kept_data(endpoint: str, body: FillRequest | ExpandRequest) -> dict[str, Any]:
    """What the record keeps for BFL's answers: the endpoint, the request's values but its images,
    and the webhook secret (never shown)."""
    request = body.model_dump(exclude={"image", "mask", "webhook_secret"})
    return {"endpoint": endpoint, "request": request, "webhook_secret": body.webhook_secret}


async def create(state: AppState, endpoint: str, body: FillRequest | ExpandRequest, caller: Caller,
                 base: str) -> AsyncResponse:
    """Write a BFL request as a prediction; its id, polling URL, cost and sizes. Raises ApiError
    (the caller answers it in BFL's shape) when a value or the server refuses it; nothing is
    written then. As every API's create (AppState.submit): the queue is checked before a picture
    is read, the pictures are read for their headers only, and the caller's rate limit is charged
    once the request is valid."""
    service = state.service
    bad = lone_surrogate_at(body.model_dump(exclude={"image", "mask"}))
    if bad:
        raise not_unicode(bad)
    try:
        request = PredictionRequest.model_validate({
            "input": model_input(body),
            "webhook": body.webhook_url,
            "webhook_events_filter": [COMPLETED] if body.webhook_url else None,
        })
    except ValidationError as exc:  # a rule of this model's input that BFL's inputs do not have
        errors = [dict(e, loc=tuple(e["loc"][1:])) for e in exc.errors()]
        raise validation_failed([InvalidField(type=fe.type, field=fe.field, description=fe.description)
                                 for fe in describe_errors(errors, "input.")]) from None
    admission = admit(request, "hidden", None, None)
    measured: dict[str, Any] = {}

    async def read_headers() -> None:
        measured.update(await run_in_threadpool(check_pictures, request.sent_input,
                                                service.settings.max_image_pixels) or {})

    record = await state.submit(caller, lambda: service.create(request, admission, caller, api=API,
                                                               api_data=kept_data(endpoint, body)), read_headers)
    return AsyncResponse(id=record.id, polling_url=f"{base}/v1/get_result?id={record.id}", **measured)


# -- predictions to results -------------------------------------------------------------------------


def progress(record: PredictionRecord) -> float | None:
    """The share of denoising steps done, as the run recorded them."""
    if record.status == Status.SUCCEEDED:
        return 1.0
    if record.step is None or not record.steps:
        return 0.0 if record.status in (Status.STARTING, Status.PROCESSING) else None
    return round(record.step / record.steps, 4)


def retry_after(service: PredictionService, record: PredictionRecord) -> int:
    """Seconds a client polling a pending task waits before it asks again: 1 while it runs (its
    progress moves every step), about a run's length per worker while it is queued (capped at 10 s:
    BFL's examples poll every half second)."""
    if record.status == Status.PROCESSING:
        return 1
    return max(1, min(PENDING_RETRY_CAP_S, service.seconds_until_a_slot_frees()))


def result(service: PredictionService, prediction_id: str, record: PredictionRecord | None,
           request_base: str | None = None) -> ResultResponse:
    """A prediction as BFL's get_result answers it."""
    if record is None or record.data_removed:
        return ResultResponse(id=prediction_id, status=ResultStatus.TASK_NOT_FOUND)
    status = record.status
    if not status.terminal:
        return ResultResponse(id=record.id, status=ResultStatus.PENDING, progress=progress(record))
    request = (record.api_data or {}).get("request") or {}
    if status == Status.SUCCEEDED and record.output:
        base = service.base_for(request_base)
        sample = f"{base}/outputs/{record.id}/{record.output_token}/{record.output[0]}"
        return ResultResponse(id=record.id, status=ResultStatus.READY, progress=1.0, result={
            "sample": sample,
            **({"mask": mask} if (mask := service.mask_url(record, request_base)) else {}),
            "prompt": request.get("prompt", record.input.get("prompt")),
            "seed": record.seed,
            "start_time": record.started_at,
            "end_time": record.completed_at,
            "duration": round(record.completed_at - record.started_at, 6)
            if record.started_at and record.completed_at else None,
        })
    error = record.error or ("The task was canceled" if status == Status.CANCELED else "The task failed")
    if status == Status.FAILED and error == ALL_FLAGGED:
        return ResultResponse(id=record.id, status=ResultStatus.CONTENT_MODERATED,
                              details={"Moderation Reasons": ["NSFW"], "error": error})
    kind = status.value  # "canceled" or "failed"
    return ResultResponse(id=record.id, status=ResultStatus.ERROR, details={"error": error, "reason": kind})


def webhook_body(service: PredictionService, record: PredictionRecord) -> dict[str, Any]:
    """The final webhook of a BFL prediction: its get_result body and when it ended; a failure also
    carries ``error`` and ``message``, as BFL's do."""
    body = result(service, record.id, record).model_dump(mode="json")
    body["timestamp"] = iso(record.completed_at)
    if body["status"] != ResultStatus.READY.value and body.get("details"):
        body["error"] = body["details"].get("reason", "failed")
        body["message"] = body["details"].get("error")
    return body


def signer(record: PredictionRecord) -> Signer | None:
    """The X-BFL-Signature header of a body, with the request's webhook_secret; no header without one."""
    secret = (record.api_data or {}).get("webhook_secret")
    if not secret:
        return lambda _body: {}
    return lambda body: {SIGNATURE_HEADER: sign_bfl(secret, body)}


def webhook_style(service: PredictionService) -> WebhookStyle:
    return WebhookStyle(snapshot=lambda record: webhook_body(service, record), signer=signer)
