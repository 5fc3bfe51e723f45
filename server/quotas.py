"""What one tenant may hold, and the disk all of them share.

Checked before anything is written, by creates and uploads alike, and again, atomically, when the
row that counts is written (:meth:`Store.insert_prediction_guarded`, ``insert_file_guarded``,
``reserve_output_bytes``, each under the tenant's lock in the database): creates and uploads
racing on any number of nodes cannot pass a limit together, and a prediction's outputs are counted
before they are written.

- the disk: below ``--min-free-disk-mb`` free (counting what the request would add), 507;
- a tenant's stored bytes (its uploads, and its predictions' stored inputs and outputs until
  retention removes them) past ``--tenant-max-stored-mb``: 413 for a create or an upload; a
  prediction whose outputs would pass it fails in words, its outputs never written;
- a tenant's queued predictions at ``--tenant-max-queued``: 429 with a Retry-After.

Quotas bound the tenants of tokens; an admin token and a server without tokens have none.
"""

from __future__ import annotations

from typing import Callable

from .auth import ADMIN, Caller
from .files import FileStore, describe_bytes
from .protocol import ApiError, disk_full
from .settings import Settings
from .store import OwnerLimits, QuotaExceeded, Store

MB = 1024 * 1024


def storage_exceeded(used: int, limit: int, incoming: int) -> str:
    adds = f" and this request adds {describe_bytes(incoming)}" if incoming else ""
    return (f"Storage quota exceeded: this token's uploads, prediction inputs and outputs take "
            f"{describe_bytes(used)} of its {describe_bytes(limit)}{adds}. Delete uploads it no "
            "longer needs, or wait until its files, inputs and outputs expire.")


def outputs_exceeded(used: int, limit: int, outputs: int) -> str:
    return (f"Storage quota exceeded: this prediction's outputs ({describe_bytes(outputs)}) would take this token "
            f"past its {describe_bytes(limit)} ({describe_bytes(used)} is kept already), so they were not saved. "
            "Delete uploads it no longer needs, or wait until its files, inputs and outputs expire.")


class Quotas:
    def __init__(self, settings: Settings, store: Store, files: FileStore):
        self.settings, self.store, self.files = settings, store, files

    # -- the limits of one owner, for the guarded writes ----------------------------------------

    def limits(self, caller: Caller, *, adds_queued: int = 0, adds_bytes: int = 0) -> OwnerLimits | None:
        """The limits a write by ``caller`` is held to (None: it has none)."""
        if not caller.has_quotas:
            return None
        return OwnerLimits(caller.tenant, max_queued=self.settings.tenant_max_queued,
                           max_bytes=self.settings.tenant_max_stored_mb * MB, adds_queued=adds_queued,
                           adds_bytes=adds_bytes)

    def limits_of_owner(self, owner: str | None, adds_bytes: int = 0) -> OwnerLimits | None:
        """The storage limit of a prediction's owner, for its outputs (None: it has none)."""
        if (owner is None or owner == ADMIN or not self.settings.auth_enabled
                or not self.settings.tenant_max_stored_mb):
            return None
        return OwnerLimits(owner, max_bytes=self.settings.tenant_max_stored_mb * MB, adds_bytes=adds_bytes)

    def refusal(self, exc: QuotaExceeded, limits: OwnerLimits, retry_after: Callable[[], int]) -> ApiError:
        """The answer to a guarded write that a limit refused."""
        if exc.kind == "queued":
            return queue_full(exc.used, retry_after())
        return ApiError(413, storage_exceeded(exc.used, exc.limit, limits.adds_bytes), "Payload Too Large")

    # -- the early checks: before anything is read or written ------------------------------------

    def check_room(self, caller: Caller, incoming: int) -> None:
        """Room for ``incoming`` more bytes from ``caller``: its quota first, then the disk."""
        self.check_quota(caller, incoming)
        if self.files.free_bytes() - incoming < self.settings.min_free_disk_mb * MB:
            raise disk_full()

    def check_quota(self, caller: Caller, incoming: int) -> None:
        limit = self.settings.tenant_max_stored_mb * MB
        if caller.has_quotas and limit:
            used = self.store.stored_bytes(caller.tenant)
            if used + incoming > limit:
                raise ApiError(413, storage_exceeded(used, limit, incoming), "Payload Too Large")

    def check_queue(self, caller: Caller, retry_after: Callable[[], int]) -> None:
        limit = self.settings.tenant_max_queued
        if caller.has_quotas and limit:
            queued = self.store.count_queued(caller.tenant)
            if queued >= limit:
                raise queue_full(queued, retry_after())


def queue_full(queued: int, retry_after: int) -> ApiError:
    return ApiError(429, f"This token has {queued} predictions waiting to run, the most it may queue. "
                         "Try again when some have started.", "Too Many Requests",
                    headers={"Retry-After": str(retry_after)})
