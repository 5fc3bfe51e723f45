"""``POST /v1/masks``: a click, a box or a sentence made a mask, by the segmenter of this node.

The segmenter (:mod:`inference.segment`) lives where the workers do: a node that runs workers with
``--segmenter`` answers; an API node (``--no-workers``) or a server without ``--segmenter`` says so.
It is the page's click to select, and a tool's: points, boxes or text in, a PNG mask out (or JSON
with ``Accept: application/json``). The caller's own uploaded files are readable by URL, as in a
prediction's input; the picture is bounded by --max-image-pixels, the requests waiting for the
segmenter by ``MAX_WAITING``, and a wait by ``WAIT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import json

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from typing_extensions import Annotated

from inference import images as imageio
from inference.errors import InvalidInput
from inference.segment import DEFAULT_THRESHOLD, MAX_BOXES, MAX_POINTS, MAX_PROMPT_CHARS

from ..auth import Caller
from ..fetching import fetch_policy
from ..protocol import ApiError, InvalidField, validation_failed
from ..state import AppState, get_state, require_auth

MAX_WAITING = 8  # requests waiting for the segmenter on one node before 429
WAIT_S = 30.0  # the longest one waits for it before 503

router = APIRouter(tags=["masks"])

Point = Annotated[list[float], Field(min_length=3, max_length=3)]
Box = Annotated[list[float], Field(min_length=4, max_length=4)]


class MaskRequest(BaseModel):
    """Points and boxes (SAM), or a sentence (Grounding DINO's boxes, then SAM), on one picture."""

    model_config = ConfigDict(extra="forbid", title="MaskRequest")

    image: str = Field(..., description="The picture: a data: URI, an https URL or a file URL of this server.",
                       json_schema_extra={"format": "uri"})
    points: list[Point] = Field(default_factory=list, max_length=MAX_POINTS,
                                description="[x, y, label] in the picture's pixels: label 1 selects the object "
                                            "there, 0 keeps that spot out. The points (and the first box) select "
                                            "one object.")
    boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES,
                             description="[x0, y0, x1, y1] in the picture's pixels: the object in each box.")
    text: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                             description="What to select, in words (\"the red car\"): the mask_prompt of a prediction.")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.01, le=0.99,
                             description="With text: how sure the detector must be of a region.")

    def problems(self) -> list[InvalidField]:
        """What makes the request unanswerable, each naming its field."""
        found = []
        if self.text is not None and not self.text.strip():
            found.append(InvalidField(type="required", field="text", description="text is empty"))
        if self.text and (self.points or self.boxes):
            found.append(InvalidField(type="invalid", field="text", description="give text, or points and boxes, not both"))
        if self.text is None and not self.points and not self.boxes:
            found.append(InvalidField(type="required", field="points",
                                      description="give points, boxes or text to select by"))
        for i, (_x, _y, label) in enumerate(self.points):
            if label not in (0, 1):
                found.append(InvalidField(type="enum", field=f"points.{i}",
                                          description="a point's label is 1 (select) or 0 (keep out)"))
        for i, (x0, y0, x1, y1) in enumerate(self.boxes):
            if x1 <= x0 or y1 <= y0:
                found.append(InvalidField(type="invalid", field=f"boxes.{i}",
                                          description="a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0"))
        return found


class _Gate:
    """One node's requests for its segmenter: at most MAX_WAITING wait, each at most WAIT_S."""

    def __init__(self) -> None:
        self.turn = asyncio.Semaphore(1)
        self.waiting = 0


def _gate(state: AppState) -> _Gate:
    if state.mask_gate is None:
        state.mask_gate = _Gate()
    return state.mask_gate


def _segmenter(state: AppState):
    if state.segmenter is not None:
        return state.segmenter
    if not state.settings.workers:
        detail = ("This node runs no models (--no-workers): POST /v1/masks is answered by a `flux-fill serve` "
                  "node that runs its workers with --segmenter (a `flux-fill worker` node answers only /health and "
                  "/metrics); mask_prompt is run by the workers.")
    elif not state.settings.segmenter:
        detail = ("This server has no segmenter: start it with --segmenter (tiny: the demo models; or a SAM folder "
                  "and a Grounding DINO folder, see weights.md).")
    elif state.phase == "SETUP_FAILED":
        detail = f"The models failed to load: {state.setup_error}"
    else:
        raise ApiError(503, "The segmenter is still loading. Try again in a few seconds.", "Service Unavailable",
                       headers={"Retry-After": "5"})
    raise ApiError(503, detail, "Service Unavailable")


@router.post("/v1/masks", summary="A mask from points, boxes or text (the segmenter of this node)",
             response_class=Response,
             responses={200: {"content": {"image/png": {}, "application/json": {}},
                              "description": "The mask: white selected, the picture's size."}})
async def make_mask(body: MaskRequest, request: Request, caller: Caller = Depends(require_auth),
                    state: AppState = Depends(get_state)):
    if problems := body.problems():
        raise validation_failed(problems)
    segmenter = _segmenter(state)
    gate = _gate(state)
    settings = state.settings
    resolve = state.service.resolver_of(None if caller.sees_everything else caller.tenant)

    def picture():
        data = imageio.read_file_string(body.image, "image", policy=fetch_policy(settings), resolver=resolve)
        return imageio.to_rgb(imageio.open_image(data, "image", settings.max_image_pixels))

    # Counted from the start: a request waits while its picture is fetched and read too, so no more
    # than MAX_WAITING pictures are held (or fetched) at once for the segmenter.
    if gate.waiting >= MAX_WAITING:
        raise ApiError(429, f"{gate.waiting} mask requests are waiting for this node's segmenter. Try again shortly.",
                       "Too Many Requests", headers={"Retry-After": "1"})
    gate.waiting += 1
    try:
        try:
            image = await run_in_threadpool(picture)
        except InvalidInput as exc:
            raise validation_failed([InvalidField(type=e.type, field=e.field, description=e.description)
                                     for e in exc.errors]) from None
        try:
            await asyncio.wait_for(gate.turn.acquire(), WAIT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, f"The segmenter was busy for {WAIT_S:g} s. Try again shortly.", "Service Unavailable",
                           headers={"Retry-After": "5"}) from None
    finally:
        gate.waiting -= 1
    try:
        if body.text:
            found = await run_in_threadpool(segmenter.find, image, body.text, body.threshold)
        else:
            points = [(x, y, int(label)) for x, y, label in body.points]
            boxes = [tuple(b) for b in body.boxes]
            found = await run_in_threadpool(segmenter.select, image, points, boxes)
    except InvalidInput as exc:  # the segmenter's words name mask_prompt; here the field is text
        raise validation_failed([InvalidField(type=e.type, field="text" if e.field == "mask_prompt" else e.field,
                                              description=e.description) for e in exc.errors]) from None
    finally:
        gate.turn.release()
    png = imageio.encode_image(found.mask, "png", 100)
    facts = {"coverage": round(found.coverage, 6), "width": image.width, "height": image.height,
             "boxes": [[round(v, 2) for v in b] for b in found.boxes], "scores": [round(s, 4) for s in found.scores],
             "demo": segmenter.demo}
    if "application/json" in request.headers.get("accept", ""):
        return Response(json.dumps({"mask": "data:image/png;base64," + base64.b64encode(png).decode(), **facts}),
                        media_type="application/json")
    headers = {"X-Mask-Coverage": str(facts["coverage"]), "X-Mask-Regions": str(len(found.boxes)),
               "Cache-Control": "no-store"}
    return Response(png, media_type="image/png", headers=headers)
