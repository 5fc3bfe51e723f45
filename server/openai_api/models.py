"""The image model names OpenAI's clients send, the ones this server accepts, and OpenAI's model
objects for them (``GET /v1/models``, ``GET /v1/models/{name}``). Every accepted name is served
by FLUX.1 Fill [dev]: the name says which API a client speaks, not which model runs.

The operator's ``--openai-models`` are names or shell-style patterns (``gpt-image-*``); the
default accepts every image model name of the current SDKs and any later one of the same families.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

from .protocol import OpenAIModel

# The image model names of the openai SDKs (ImageModel of openai 3.63 on PyPI, of npm openai 7.60):
# what GET /v1/models lists for the families the server accepts.
KNOWN_IMAGE_MODELS = (
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
    "gpt-image-1.5",
    "gpt-image-1",
    "gpt-image-1-mini",
    "chatgpt-image-latest",
    "dall-e-3",
    "dall-e-2",
)
OWN_NAME = "flux-fill-dev"
SERVED_BY = "FLUX.1 Fill [dev]"
OWNED_BY = "black-forest-labs"  # who made the model that answers every name
CREATED = 1732147200  # 2024-11-21: FLUX.1 Fill [dev]'s release (catalog.VERSION_CREATED_AT)
_GLOB = set("*?[")


def is_pattern(entry: str) -> bool:
    return bool(_GLOB & set(entry))


def accepts(entries: Iterable[str], name: str) -> bool:
    """Whether a request's ``model`` is one of the accepted names or patterns (case-sensitive, as
    OpenAI's names are)."""
    return any(fnmatch.fnmatchcase(name, entry) if is_pattern(entry) else name == entry for entry in entries)


def listed(entries: Iterable[str]) -> list[str]:
    """The accepted names a client can pick from: each plain name given, and the known names each
    pattern matches, in that order, once each."""
    names: list[str] = []
    for entry in entries:
        for name in ([n for n in (OWN_NAME, *KNOWN_IMAGE_MODELS) if fnmatch.fnmatchcase(n, entry)]
                     if is_pattern(entry) else [entry]):
            if name not in names:
                names.append(name)
    return names


def model_object(name: str) -> OpenAIModel:
    return OpenAIModel(id=name, created=CREATED, owned_by=OWNED_BY)
