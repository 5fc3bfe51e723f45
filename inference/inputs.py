"""The prediction input: every input of the hosted flux-fill-dev, its defaults and limits, and ours.

This one model is the source of the API's input schema (``/openapi.json``), the CLI's flags and the
web page's form. Unknown keys are dropped, as the hosted model does.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FieldError, InvalidInput
from .images import OutputFormat
from .segment import DEFAULT_THRESHOLD, MASK_MODES, MAX_PROMPT_CHARS
from .sizing import MATCH_INPUT_MAX_SIDE, MULTIPLE, Megapixels

Outpaint = Literal[
    "None",
    "Zoom out 1.5x",
    "Zoom out 2x",
    "Make square",
    "Left outpaint",
    "Right outpaint",
    "Top outpaint",
    "Bottom outpaint",
]

OUTPAINT_PRESETS: tuple[str, ...] = get_args(Outpaint)
MaskMode = Literal["add", "replace", "subtract", "intersect"]
assert get_args(MaskMode) == MASK_MODES

MAX_SEED = 2**63 - 1
MAX_EXPAND = 2048  # pixels added on one side by expand_*, as FLUX.1 Expand [pro] allows
EXPAND_SIDES = ("expand_top", "expand_bottom", "expand_left", "expand_right")
MAX_OUTPUTS = 4  # num_outputs' maximum, and so the largest batch worth denoising at once


class PredictionInput(BaseModel):
    """Inputs of black-forest-labs/flux-fill-dev, plus this server's optional additions."""

    # Types are checked as Replicate's JSON-schema validation checks them (strict): a string is never
    # a number, a boolean never an integer; an integer is a number.
    model_config = ConfigDict(extra="ignore", title="Input", strict=True)

    prompt: str = Field(
        ...,
        description="Text prompt for the repainted area. T5 reads its first 512 tokens.",
        json_schema_extra={"x-order": 0},
    )
    image: str = Field(
        ...,
        description="The image to inpaint: a file (data: URI, https URL or uploaded file URL). "
        "If it has an alpha channel and no mask is given, transparent pixels are repainted.",
        json_schema_extra={"format": "uri", "x-order": 1},
    )
    mask: str | None = Field(
        None,
        description="A black-and-white image of the image's size: white repaints, black keeps. "
        "Grey values are kept soft.",
        json_schema_extra={"format": "uri", "x-order": 2},
    )
    mask_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Select what to repaint by words instead of (or with) a mask: e.g. \"the red car\" or \"sky\". "
        "Needs a server started with --segmenter. The selection is combined with mask by mask_mode; its coverage "
        "is logged and the mask used is kept beside the outputs.",
        json_schema_extra={"x-order": 3},
    )
    mask_mode: MaskMode = Field(
        "add",
        description="How mask_prompt's selection combines with mask (or the image's transparency): add (either), "
        "replace (the selection alone), subtract (the mask less the selection), intersect (both).",
    )
    mask_prompt_threshold: float = Field(
        DEFAULT_THRESHOLD,
        ge=0.01,
        le=0.99,
        description="How sure the detector must be of a region mask_prompt names; lower finds more.",
    )
    num_outputs: int = Field(1, ge=1, le=MAX_OUTPUTS, description="Number of outputs to generate.")
    num_inference_steps: int = Field(
        28, ge=1, le=50, description="Number of denoising steps. More is slower and can be better."
    )
    guidance: float = Field(30, ge=0, le=100, description="Guidance for the generated image.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Random seed. Output i is made from seed + i. Random when not set.",
    )
    megapixels: Megapixels = Field(
        "1",
        description="Approximate number of megapixels of the generated image; match_input keeps the "
        f"input's size (capped at {MATCH_INPUT_MAX_SIDE} px a side). Sides are floored to a multiple of {MULTIPLE}.",
    )
    output_format: OutputFormat = Field("webp", description="Format of the output images.")
    output_quality: int = Field(
        80, ge=0, le=100, description="Quality when saving webp or jpg, 0 to 100. Ignored for png."
    )
    lora_weights: str | None = Field(
        None,
        description="A FLUX.1 [dev] LoRA: a name in the server's LoRA folder, an https URL to a "
        ".safetensors file, or a Hugging Face repo id available offline.",
    )
    lora_scale: float = Field(
        1,
        ge=-1,
        le=3,
        description="How strongly the LoRA applies. With go_fast on, it is multiplied by 1.5.",
    )
    disable_safety_checker: bool = Field(False, description="Disable the safety checker for generated images.")
    go_fast: bool = Field(
        False,
        description="Run faster (fp8 and compiled kernels) when the server enables it; lora_scale is "
        "multiplied by 1.5 as on the hosted model.",
    )

    # This server's additions: the defaults keep the hosted behaviour.
    preserve_unmasked: bool = Field(
        False,
        description="Paste the original pixels back outside the (grown, feathered) mask, so nothing "
        "outside the mask changes.",
    )
    mask_grow: int = Field(
        0, ge=0, le=256, description="Grow the mask by this many pixels (of the input image) before generating."
    )
    mask_blur: int = Field(
        0, ge=0, le=256, description="Feather the edge of the composite by this many pixels (with preserve_unmasked)."
    )
    crop_to_mask: bool = Field(
        False,
        description="Generate only around the mask, at the megapixels budget, and stitch the result "
        "into the full-resolution image. The output keeps the input's size.",
    )
    crop_margin: int = Field(
        128,
        ge=0,
        le=2048,
        description="With crop_to_mask: pixels of context kept around the mask's bounding box.",
    )
    outpaint: Outpaint = Field(
        "None",
        description="Extend the image outward: the canvas presets of FLUX.1 Fill [pro].",
    )

    expand_top: int = Field(
        0, ge=0, le=MAX_EXPAND,
        description="Extend the image upward by this many pixels (of the input image); the new area is generated.",
    )
    expand_bottom: int = Field(
        0, ge=0, le=MAX_EXPAND,
        description="Extend the image downward by this many pixels (of the input image); the new area is generated.",
    )
    expand_left: int = Field(
        0, ge=0, le=MAX_EXPAND,
        description="Extend the image to the left by this many pixels (of the input image); the new area is generated.",
    )
    expand_right: int = Field(
        0, ge=0, le=MAX_EXPAND,
        description="Extend the image to the right by this many pixels (of the input image); the new area is generated.",
    )

    @field_validator("num_outputs", "num_inference_steps", "seed", "output_quality", "mask_grow", "mask_blur",
                     "crop_margin", *EXPAND_SIDES, mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """JSON Schema counts 2.0 as an integer (2.5 and "2" are not)."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @model_validator(mode="after")
    def _combinations(self) -> "PredictionInput":
        if self.crop_to_mask and self.outpaint != "None":
            raise ValueError("crop_to_mask cannot be combined with outpaint")
        if self.expands and self.outpaint != "None":
            raise ValueError("expand_top/bottom/left/right cannot be combined with an outpaint preset")
        if self.expands and self.crop_to_mask:
            raise ValueError("crop_to_mask cannot be combined with expand_top/bottom/left/right")
        return self

    @property
    def expands(self) -> bool:
        """Some side is extended by expand_top/bottom/left/right."""
        return any(getattr(self, side) for side in EXPAND_SIDES)

    @property
    def extends_canvas(self) -> bool:
        """The picture is put on a larger canvas: an outpaint preset, or expand_* pixels."""
        return self.outpaint != "None" or self.expands

    def effective_lora_scale(self) -> float:
        return self.lora_scale * 1.5 if self.go_fast else self.lora_scale


_TYPE_NAMES = {
    "missing": "required",
    "greater_than_equal": "minimum",
    "greater_than": "minimum",
    "less_than_equal": "maximum",
    "less_than": "maximum",
    "literal_error": "enum",
    "enum": "enum",
    "int_type": "invalid_type",
    "int_parsing": "invalid_type",
    "int_from_float": "invalid_type",
    "float_type": "invalid_type",
    "float_parsing": "invalid_type",
    "bool_type": "invalid_type",
    "bool_parsing": "invalid_type",
    "string_type": "invalid_type",
}


_EXPECTED = {"int_type": "integer", "int_from_float": "integer", "float_type": "number", "bool_type": "boolean",
             "string_type": "string", "literal_error": "string", "model_type": "object", "dict_type": "object",
             "list_type": "array"}


def json_type(value: Any) -> str:
    """The JSON type of a decoded JSON value, named as JSON Schema names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, (list, tuple)) else "object"


def _describe(field: str, err: dict[str, Any]) -> tuple[str, str]:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    rule = _TYPE_NAMES.get(kind, "invalid")
    given = err.get("input")
    if kind in _EXPECTED and not (kind == "literal_error" and isinstance(given, str)):
        return "invalid_type", f"Invalid type. Expected: {_EXPECTED[kind]}, given: {json_type(given)}"
    if kind == "missing":
        return rule, f"{field} is required"
    if kind in ("greater_than_equal", "greater_than"):
        limit = ctx.get("ge", ctx.get("gt"))
        return rule, f"Must be greater than or equal to {limit}"
    if kind in ("less_than_equal", "less_than"):
        limit = ctx.get("le", ctx.get("lt"))
        return rule, f"Must be less than or equal to {limit}"
    if kind == "literal_error":
        return rule, f"{field} must be one of the following: {ctx.get('expected', '')}"
    if kind == "extra_forbidden":
        return "additional_property_not_allowed", "Additional property is not allowed"
    msg = str(err.get("msg", "is invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return rule, msg


def describe_errors(errors: list[dict[str, Any]], prefix: str = "") -> list[FieldError]:
    """Turn pydantic error dicts (locations relative to the input) into FieldErrors."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
        name = loc[0] if loc else ""
        field = f"{prefix}{name}" if name else (prefix.rstrip(".") or "input")
        rule, description = _describe(name or field, err)
        out.append(FieldError(field, rule, description))
    return out


def parse_input(data: Any) -> PredictionInput:
    """Validate raw input, raising :class:`InvalidInput` with one entry per broken rule."""
    if not isinstance(data, dict):
        raise InvalidInput.one("input", "invalid_type", "input must be an object")
    try:
        return PredictionInput.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_errors(exc.errors())) from None
