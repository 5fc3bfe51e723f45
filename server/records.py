"""Typed records of what the store keeps: a prediction, an uploaded file, a running prediction's preview.

The store backends turn their rows into these and nothing else reads rows; every other module
reads attributes, so a renamed or retyped column fails in one place, not in six.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .events import COMPLETED
from .protocol import Status


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    status: Status
    version: str
    input: dict[str, Any]  # as sent, its long strings replaced (see server.stored_inputs)
    created_at: float
    output_token: str
    seq: int = 0
    logs: str = ""
    output: list[str] | None = None  # file names under the prediction's output folder
    error: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    predict_time: float | None = None
    webhook: str | None = None
    webhook_events: list[str] | None = None
    data_removed: bool = False
    attempts: int = 0
    owner: str | None = None
    cancel_at: float | None = None  # the Cancel-After deadline
    input_blobs: list[list] = field(default_factory=list)  # refs of the long strings stored apart
    input_bytes: int = 0
    output_bytes: int = 0
    cancel_requested_at: float | None = None  # a cancel asked while it ran
    cancel_reason: str | None = None  # why (a deadline's words), for the logs of whichever node stops it
    lease: str | None = None  # the claim's token: only its holder may record an outcome
    lease_expires_at: float | None = None  # unless renewed by then, the run is taken as dead
    webhook_due: float | None = None  # a final webhook is owed, from then (the database's clock)
    webhook_lease: str | None = None  # the node sending the owed final webhook now (see server.outbox)
    webhook_lease_until: float | None = None  # unless renewed by then, any node may send it
    webhook_attempts: int = 0  # failed attempts at the final webhook so far
    webhook_error: str | None = None  # why its last attempt failed
    output_run: str | None = None  # the run whose files the outputs are (outputs/<id>/<run>/): None before runs had folders
    api: str | None = None  # the API that created it: None (Replicate's), "openai" or "bfl"
    api_data: dict[str, Any] | None = None  # what that API's adapter keeps of the request (never shown by Replicate's)
    seed: int | None = None  # the seed its first output was made from (output i: seed + i), once it succeeded
    step: int | None = None  # denoising steps done by its run so far (of ``steps``), while it runs and after
    steps: int | None = None  # the denoising steps its run makes in all (outputs and tiles included)

    @property
    def wants_completed_webhook(self) -> bool:
        return bool(self.webhook) and (self.webhook_events is None or COMPLETED in self.webhook_events)

    @property
    def terminal(self) -> bool:
        return self.status.terminal


@dataclass(frozen=True)
class FileRecord:
    id: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    metadata: dict[str, Any]
    created_at: float
    path: str
    seq: int = 0
    expires_at: float | None = None
    owner: str | None = None


@dataclass(frozen=True)
class PreviewRecord:
    """The latest preview of a running prediction: an encoded image of the picture as it forms,
    after ``step`` of ``total`` denoising steps. Kept only while the prediction runs."""

    prediction_id: str
    step: int
    total: int
    content_type: str
    data: bytes
    created_at: float
