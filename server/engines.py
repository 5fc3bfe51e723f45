"""The server's settings as the options of :func:`inference.factory.build_engine` (one engine per device)."""

from __future__ import annotations

from inference.factory import EngineOptions

from .datadir import COMPILE_CACHE
from .fetching import fetch_policy, lora_settings
from .settings import Settings


def engine_options(settings: Settings, device: str | None = None, mark: str | None = None) -> EngineOptions:
    """The engine for ``device``; ``mark``: the fetch mark of the worker that runs it (server.fetching)."""
    return EngineOptions(
        weights=settings.weights,
        components=settings.components,
        device=device,
        memory_mode=settings.memory_mode,
        compile=settings.compile,
        fast_mode=settings.fast_mode,
        step_cache=settings.step_cache,
        attention_backend=settings.attention_backend,
        cache_dir=settings.data_dir / COMPILE_CACHE,
        max_pixels=settings.max_image_pixels,
        max_batch=settings.max_batch,
        fetch_policy=fetch_policy(settings, mark),
        lora=lora_settings(settings, mark),
    )
