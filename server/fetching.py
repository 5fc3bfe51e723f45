"""The server's own fetches of input URLs: their limits, and the mark that keeps them from coming back.

An input URL may lead back to this server (directly, by a redirect, or through a proxy in front of
it). Served, such a fetch can hold the worker for good: a redirect to the server's own
``/v1/predictions/<queued id>/stream`` reads a stream that stays open (its pings keep the read
alive) for a prediction that can only run after the one fetching it. So every fetch the server
makes carries a header with a mark of this process (and of the worker making it), and the server
refuses any request that carries its own mark (508 Loop Detected), except for its output files,
which are plain files (a prediction's output URL as the next one's input works). The worker then
fails the prediction in words.
"""

from __future__ import annotations

import secrets

from inference.errors import FetchError
from inference.images import FetchPolicy
from inference.lora import LoraSettings

from .datadir import LORA_CACHE
from .settings import Settings

HEADER = "flux-fill-fetch"


class OwnFetches:
    """This process's fetch mark, and the fetches that came back to it, by worker."""

    def __init__(self) -> None:
        self.instance = secrets.token_urlsafe(12)
        self._issued: set[str] = set()  # one mark a worker
        self._refused: dict[str, str] = {}  # a worker's mark -> the path its fetch asked this server for

    def mark(self, worker: int) -> str:
        mark = f"{self.instance}.{worker}"
        self._issued.add(mark)
        return mark

    def is_ours(self, value: str) -> bool:
        """A mark this server gave a worker (the instance alone is not enough: a receiver of our
        fetches learns it, and made-up marks must not grow the record of refusals)."""
        return value in self._issued

    def refused(self, mark: str, path: str) -> None:
        if mark in self._issued:
            self._refused[mark] = path[:300]

    def take(self, mark: str) -> str | None:
        """The path a fetch with ``mark`` asked this server for since the last call, or None."""
        return self._refused.pop(mark, None)


def fetch_policy(settings: Settings, mark: str | None = None) -> FetchPolicy:
    """Limits for fetching ``image`` and ``mask`` URLs."""
    return FetchPolicy(timeout_s=settings.fetch_timeout_s, max_redirects=settings.fetch_max_redirects,
                       allow_private=not settings.block_private_urls, headers=_headers(mark))


def lora_settings(settings: Settings, mark: str | None = None) -> LoraSettings:
    """Where LoRAs come from, and the limits of a LoRA download (a LoRA is far larger than a picture)."""
    policy = FetchPolicy(max_bytes=settings.max_lora_bytes, timeout_s=settings.lora_fetch_timeout_s,
                         max_redirects=settings.fetch_max_redirects, allow_private=not settings.block_private_urls,
                         headers=_headers(mark))
    return LoraSettings(folder=settings.lora_dir, cache_dir=settings.data_dir / LORA_CACHE,
                        allow_paths=settings.allow_lora_paths, fetch_policy=policy,
                        cache_bytes=int(settings.lora_cache_gb * 1024**3))


def _headers(mark: str | None) -> tuple:
    return ((HEADER, mark),) if mark else ()


def came_back(error: FetchError, path: str) -> FetchError:
    """The error of a fetch that led back to this server, in words."""
    field = error.errors[0].field if error.errors else "image"
    if "/v1/files/" in path:  # an upload this prediction's token cannot read: another tenant's, or gone
        return FetchError.one(field, "fetch", f"{field} is the URL of a file this token cannot read ({path}); "
                                              "upload the picture with this token, or send it as a data: URI.")
    return FetchError.one(
        field, "fetch",
        f"{field} leads back to this server ({path}); a prediction's inputs are never fetched from the server "
        "that runs it. Send the picture itself: a data: URI, or the URL of an upload to /v1/files.")
