"""What one tenant may hold, and the disk all of them share.

Checked before anything is written, by creates and uploads alike:

- the disk: below ``--min-free-disk-mb`` free (counting what the request would add), 507;
- a tenant's stored bytes (its uploads, and its predictions' stored inputs and outputs until
  retention removes them) past ``--tenant-max-stored-mb``: 413;
- a tenant's queued predictions at ``--tenant-max-queued``: 429 with a Retry-After.

Quotas bound the tenants of tokens; an admin token and a server without tokens have none.
"""

from __future__ import annotations

from typing import Callable

from .auth import Caller
from .files import FileStore, describe_bytes
from .protocol import ApiError, disk_full
from .settings import Settings
from .store import Store

MB = 1024 * 1024


class Quotas:
    def __init__(self, settings: Settings, store: Store, files: FileStore):
        self.settings, self.store, self.files = settings, store, files

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
                adds = f" and this request adds {describe_bytes(incoming)}" if incoming else ""
                raise ApiError(413, f"Storage quota exceeded: this token's uploads, prediction inputs and outputs take "
                                    f"{describe_bytes(used)} of its {describe_bytes(limit)}{adds}. Delete uploads it no "
                                    "longer needs, or wait until its files, inputs and outputs expire.",
                               "Payload Too Large")

    def check_queue(self, caller: Caller, retry_after: Callable[[], int]) -> None:
        limit = self.settings.tenant_max_queued
        if caller.has_quotas and limit:
            queued = self.store.count_queued(caller.tenant)
            if queued >= limit:
                raise ApiError(429, f"This token has {queued} predictions waiting to run, the most it may queue. "
                                    "Try again when some have started.", "Too Many Requests",
                               headers={"Retry-After": str(retry_after())})
