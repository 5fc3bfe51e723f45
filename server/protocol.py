"""Replicate's wire format, as pydantic models: requests, responses and problem+json errors."""

from __future__ import annotations

import enum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from inference.inputs import PredictionInput

from .events import COMPLETED, LOGS, OUTPUT, START

MODEL_OWNER = "black-forest-labs"
MODEL_NAME = "flux-fill-dev"
MODEL_REF = f"{MODEL_OWNER}/{MODEL_NAME}"
WebhookEvent = Literal[START, OUTPUT, LOGS, COMPLETED]  # the order Replicate's schema lists them in
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)


class Status(str, enum.Enum):
    """The prediction lifecycle. ``starting`` -> ``processing`` -> one of the terminal states."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)


class PredictionRequest(BaseModel):
    """Body of the create routes. Unknown top-level keys are refused. The input is validated as
    ``PredictionInput`` (unknown keys are ignored by the engine) and kept exactly as sent."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: PredictionInput = Field(..., description="The model's input.")
    version: str | None = Field(None, description="Model version: owner/name, owner/name:id or a bare id (POST /v1/predictions).")
    webhook: str | None = Field(None, description="URL to POST the prediction to on the events below.")
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None, description="Events that trigger the webhook; all when absent."
    )
    webhook_completed: str | None = Field(None, description="Legacy: a webhook called on completion only.")
    stream: bool | None = Field(None, description="Accepted for compatibility; urls.stream is always served.")
    _sent_input: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_the_input_as_sent(cls, data: Any, handler):
        request = handler(data)
        sent = data.get("input") if isinstance(data, dict) else None
        request._sent_input = sent if isinstance(sent, dict) else request.input.model_dump(mode="json", exclude_unset=True)
        return request

    @property
    def sent_input(self) -> dict[str, Any]:
        """The input exactly as the client sent it: what the prediction echoes and the worker re-validates."""
        return self._sent_input


class PredictionUrls(BaseModel):
    model_config = ConfigDict(extra="allow")  # mask: the mask a mask_prompt made, once the prediction succeeded

    get: str
    cancel: str
    web: str
    stream: str


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    predict_time: float | None = None
    total_time: float | None = None


def _unset(value: Any) -> bool:
    return value is None


class Prediction(BaseModel):
    """A prediction as GET /v1/predictions/{id} returns it. ``started_at``, ``completed_at`` and
    ``metrics`` are left out until they have a value, as Replicate does (never null)."""

    id: str
    model: str = MODEL_REF
    version: str = "hidden"
    input: dict[str, Any]
    logs: str = ""
    output: list[str] | None = None
    data_removed: bool = False
    error: str | None = None
    status: Status
    created_at: str
    started_at: str | None = Field(None, exclude_if=_unset)
    completed_at: str | None = Field(None, exclude_if=_unset)
    urls: PredictionUrls
    metrics: Metrics | None = Field(None, exclude_if=_unset)
    # This server's own: the API that created the prediction ("replicate", "openai", "bfl", "cog").
    # The official clients ignore keys they do not know; the web page's history shows it.
    api: str = "replicate"


class PredictionPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[Prediction]


class FileChecksums(BaseModel):
    sha256: str
    md5: str


class FileUrls(BaseModel):
    get: str


class FileObject(BaseModel):
    id: str
    name: str
    content_type: str
    size: int
    etag: str
    checksums: FileChecksums
    metadata: dict[str, Any]
    created_at: str
    expires_at: str | None
    urls: FileUrls


class FilePage(BaseModel):
    next: str | None
    previous: str | None
    results: list[FileObject]


class ModelVersion(BaseModel):
    id: str
    created_at: str
    cog_version: str
    openapi_schema: dict[str, Any]


class VersionPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[ModelVersion]


class ModelObject(BaseModel):
    """A model as GET /v1/models/{owner}/{name} returns it."""

    url: str
    owner: str
    name: str
    description: str | None
    visibility: Literal["public", "private"]
    github_url: str | None
    paper_url: str | None
    license_url: str | None
    run_count: int
    cover_image_url: str | None
    default_example: Prediction | None
    latest_version: ModelVersion | None


class ModelPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[ModelObject]


class Account(BaseModel):
    type: Literal["user", "organization"]
    username: str
    name: str
    github_url: str | None


class DeploymentConfiguration(BaseModel):
    hardware: str
    min_instances: int
    max_instances: int


class DeploymentRelease(BaseModel):
    number: int
    model: str
    version: str
    created_at: str
    created_by: Account
    configuration: DeploymentConfiguration


class Deployment(BaseModel):
    """A deployment as GET /v1/deployments/{owner}/{name} returns it."""

    owner: str
    name: str
    current_release: DeploymentRelease


class WebhookSecret(BaseModel):
    key: str


class ServedModel(BaseModel):
    """What a worker of a shared database loaded, as it recorded it there."""

    name: str
    demo: bool = False
    weights: str | None = None  # shown with a token, on a server that has tokens
    device: str | None = None


class Health(BaseModel):
    # UNAVAILABLE: the database is away (restarting, crashed, cut off); the API answers 503 until it is back.
    status: Literal["STARTING", "READY", "BUSY", "SETUP_FAILED", "UNAVAILABLE"]
    model: str | None = None
    demo: bool = False
    notice: str | None = None  # a demo model's sentence: what its outputs are
    weights: str | None = None
    devices: list[str] = []
    queue_depth: int = 0
    setup_error: str | None = None
    speed: dict | None = None  # the speed options in force on the first device
    database: Literal["available", "unavailable"] = "available"
    # On an API node (serve --no-workers), which loads no model: what the workers recorded in the
    # database, the latest first; model, demo and notice above are then theirs.
    workers: list[ServedModel] | None = None
    # Masks without a brush: "points" (clicks and boxes, POST /v1/masks on this node) and "text"
    # (mask_prompt); empty without --segmenter. On an API node: "text" when --segmenter is set.
    selects: list[Literal["points", "text"]] = []
    version: str


class InvalidField(BaseModel):
    type: str
    field: str
    description: str


class Problem(BaseModel):
    """application/problem+json."""

    model_config = ConfigDict(extra="allow")

    title: str | None = None
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None


class ApiError(Exception):
    """An error answered as problem+json; routes raise it, one handler renders it."""

    def __init__(self, status: int, detail: str, title: str | None = None, *, headers: dict[str, str] | None = None,
                 invalid_fields: list[InvalidField] | None = None):
        super().__init__(detail)
        self.problem = Problem(title=title, detail=detail, status=status, invalid_fields=invalid_fields)
        self.headers = headers or {}


def not_found() -> ApiError:
    return ApiError(404, "The requested resource could not be found.")


def disk_full() -> ApiError:
    return ApiError(507, "The server's disk is full: nothing was stored. Try again later.", "Insufficient Storage")


def unauthenticated() -> ApiError:
    return ApiError(401, "You did not pass a valid authentication token", "Unauthenticated",
                    headers={"WWW-Authenticate": "Bearer"})


def validation_failed(fields: list[InvalidField]) -> ApiError:
    detail = "\n".join(f"- {f.field}: {f.description}" for f in fields)
    return ApiError(422, detail, "Input validation failed", invalid_fields=fields)


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The field of the first string holding a lone surrogate, or None. JSON's "\\ud800" escape
    decodes to one; such a string can be neither stored nor answered as UTF-8, so it is refused."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_at(key, path) or lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for item in value:
            found = lone_surrogate_at(item, path)
            if found:
                return found
    return None


def not_unicode(field: str) -> ApiError:
    return validation_failed([InvalidField(type="format", field=field,
                                           description=f"{field} is not valid Unicode text (it holds a lone surrogate)")])
