"""OpenAI's image API wire format, as pydantic models: the request's options, the answers, the
streamed events, the model objects and the error body; and the names this adapter gives what it
keeps in a prediction."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.inputs import MaskMode
from inference.segment import MAX_PROMPT_CHARS as SELECTION_CHARS

from ..protocol import ModelPage

API = "openai"  # the ``api`` of the predictions this adapter makes
EDITS, GENERATIONS = "edits", "generations"  # the endpoints, as api_data["endpoint"] names them
MASK_INPUT = "openai_mask"  # an edit's mask as sent, in the prediction's input (transparent is edited)
MAX_IMAGES = 10  # n: OpenAI's limit
MAX_PARTIAL_IMAGES = 3
MIN_SIDE, MAX_SIDE = 16, 4096  # a size's sides, in pixels
MAX_PROMPT_CHARS = 32_000  # OpenAI's limit for its GPT image models
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")

Quality = Literal["auto", "low", "medium", "high", "standard", "hd", "xhigh", "max"]
# Denoising steps for each quality: the model's default (28) for auto, high, standard and hd.
QUALITY_STEPS: dict[str, int] = {"low": 12, "medium": 20, "high": 28, "auto": 28, "standard": 28, "hd": 28,
                                 "xhigh": 36, "max": 50}
OutputFormat = Literal["png", "jpeg", "webp"]
ENGINE_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # OpenAI's names -> the engine's


class ImageOptions(BaseModel):
    """The options of an edit (multipart form fields) or a generation (JSON body). Form fields arrive
    as strings, so numbers and booleans are read leniently; options this server has no use for
    (``moderation``, ``style``, ``input_fidelity``, ...) are accepted and ignored, as a drop-in must."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str = "auto"
    quality: Quality = "auto"
    # OpenAI's default: url for the DALL·E models, b64_json for the others (see _default_format).
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat = "png"
    output_compression: int = Field(100, ge=0, le=100)
    # FLUX paints no transparency: "transparent" is accepted (the clients' own examples send it) and
    # answered as what was made, "opaque".
    background: Literal["auto", "opaque", "transparent"] = "auto"
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES)
    user: str | None = None
    # This server's additions to an edit (the SDKs send them with extra_body): what to repaint in words,
    # and how it combines with the mask (or the image's transparency): see inference.inputs.
    mask_prompt: str | None = Field(None, max_length=SELECTION_CHARS)
    mask_mode: MaskMode = "add"

    @field_validator("model", "size", "quality", "response_format", "output_format", "background", "user",
                     "n", "output_compression", "partial_images", "stream", "mask_prompt", "mask_mode", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        """The clients send null (JSON) or nothing for "the default"; null must not be an error."""
        if value is None or value == "":
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        if value == "auto":
            return value
        match = _SIZE.fullmatch(value)
        if not match or not all(MIN_SIDE <= int(side) <= MAX_SIDE for side in match.groups()):
            raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT with sides from {MIN_SIDE} to {MAX_SIDE} "
                             f"pixels (e.g. '1024x1024'), not {value!r}")
        return value

    @model_validator(mode="after")
    def _default_format(self) -> "ImageOptions":
        if self.response_format is None:
            self.response_format = "url" if (self.model or "").startswith("dall-e") else "b64_json"
        return self

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) the outputs will have, or None for ``auto``."""
        if self.size == "auto":
            return None
        width, height = self.size.split("x")
        return int(width), int(height)

    @property
    def steps(self) -> int:
        return QUALITY_STEPS[self.quality]


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_validation(exc: ValidationError) -> OpenAIError:
    """A pydantic error as OpenAI's 400, naming the first broken parameter."""
    first = exc.errors()[0]
    param = str(first["loc"][0]) if first.get("loc") else None
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if first.get("type") == "literal_error" and param:
        return invalid(f"Invalid value: {first.get('input')!r}. Supported values are: "
                       f"{first.get('ctx', {}).get('expected', '')}.", param)
    return invalid(f"Invalid '{param}': {message}." if param else message, param)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _unset(value: Any) -> bool:
    return value is None


class ImageData(BaseModel):
    """One image: base64 (``response_format=b64_json``) or a URL served by this server."""

    b64_json: str | None = Field(None, exclude_if=_unset)
    url: str | None = Field(None, exclude_if=_unset)


class InputTokens(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class OutputTokens(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's token usage of an image request, counted from what this server's model processed:
    text tokens are the prompt's T5 tokens the model read (at most 512); an image of W x H pixels
    is (W/16) x (H/16) image tokens at the size it was generated (FLUX's transformer works on 2x2
    patches of latents 8 times smaller than the picture). Input image tokens are an edit's image
    (a generation has none); output tokens are every image generated."""

    input_tokens: int = 0
    input_tokens_details: InputTokens = Field(default_factory=InputTokens)
    output_tokens: int = 0
    output_tokens_details: OutputTokens = Field(default_factory=OutputTokens)
    total_tokens: int = 0

    @classmethod
    def counted(cls, text_tokens: int, image_tokens: int, output_tokens: int) -> "Usage":
        return cls(input_tokens=text_tokens + image_tokens,
                   input_tokens_details=InputTokens(image_tokens=image_tokens, text_tokens=text_tokens),
                   output_tokens=output_tokens, output_tokens_details=OutputTokens(image_tokens=output_tokens),
                   total_tokens=text_tokens + image_tokens + output_tokens)


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: str
    size: str
    usage: Usage
    # This server's addition: the mask an edit's mask_prompt made, as a URL (absent otherwise). The SDKs
    # keep keys they do not know: answer.model_extra["mask_url"] in Python, answer.mask_url in JavaScript.
    mask_url: str | None = Field(None, exclude_if=lambda v: v is None)


class PartialImageEvent(BaseModel):
    """``image_edit.partial_image`` / ``image_generation.partial_image``: a preview while it denoises."""

    type: str
    b64_json: str
    partial_image_index: int
    created_at: int
    size: str
    quality: str
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat


class CompletedEvent(BaseModel):
    """``image_edit.completed`` / ``image_generation.completed``: one final image."""

    type: str
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    usage: Usage


class OpenAIModel(BaseModel):
    """OpenAI's model object (``models.retrieve``, an entry of ``models.list``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(ModelPage):
    """``GET /v1/models`` for both clients: Replicate's page of models (``results``, ``next``,
    ``previous``) and OpenAI's list (``object: "list"``, ``data``: a model object for each image
    model name accepted) in one body, each client reading its own keys."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]
