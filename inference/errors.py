"""Errors the engine raises, as types the server maps to its wire format in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One rule one input broke: ``field`` is the input's name, ``type`` a short rule name
    (``required``, ``minimum``, ``enum``, ``format``...), ``description`` one clear sentence."""

    field: str
    type: str
    description: str


class InvalidInput(ValueError):
    """The input breaks one or more rules; nothing was run."""

    def __init__(self, errors: list[FieldError] | FieldError):
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        super().__init__("; ".join(f"{e.field}: {e.description}" for e in self.errors))

    @classmethod
    def one(cls, field: str, type: str, description: str) -> "InvalidInput":
        return cls(FieldError(field, type, description))


class FetchError(InvalidInput):
    """A file input could not be fetched or decoded."""


class WeightsError(RuntimeError):
    """The configured weights are missing or broken; the message names what is missing."""


class LoraError(InvalidInput):
    """A LoRA could not be resolved or loaded."""


class Cancelled(Exception):
    """The prediction was canceled between two denoising steps."""


# A prediction's error when the safety checker flagged every output: the hosted model's words,
# which the other APIs' adapters also read (BFL's "Content Moderated", OpenAI's moderation_blocked).
ALL_FLAGGED = "All generated images contained NSFW content. Try running it again with a different prompt."


class SafetyError(RuntimeError):
    """Every output was flagged by the safety checker."""


class NonFiniteOutput(RuntimeError):
    """The model produced NaN or infinite values: no image is made from them."""

    def __init__(self, stage: str):
        self.stage = stage
        super().__init__(
            f"The model produced NaN or infinite values while {stage}, so no image was made. The weights are "
            "broken or were loaded wrongly (the server log says which weights are loaded)."
        )
