"""The data folder: one server at a time, and what a killed server left half-written.

A server holds an exclusive lock on ``<data-dir>/flux-fill.lock`` from before it reads its queue
until it exits; the operating system drops the lock when the process ends, ``kill -9`` included.
A second server on the same folder stops at once, before it could re-queue the first one's running
prediction (which would then run twice).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import filelock

log = logging.getLogger(__name__)

LOCK_NAME = "flux-fill.lock"
LORA_CACHE = "loras"  # downloaded LoRAs (inference.lora), least recently used out first
COMPILE_CACHE = "compile-cache"  # compiled kernels kept across restarts (inference.accel)
NODE_ID = "node-id"  # this data folder's node, in the leases it holds on a shared database
EXIT_DATA_DIR_IN_USE = 75  # EX_TEMPFAIL: the other server may stop; then this one can start


class DataDirInUse(RuntimeError):
    """Another server holds the data folder."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        super().__init__(
            f"Another flux-fill server is already using the data folder {data_dir} (it holds {data_dir / LOCK_NAME}). "
            "Stop that server first, or give this one its own --data-dir."
        )


class DataDirLock:
    """The exclusive lock on a data folder, held for the life of the server."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._lock: filelock.FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> "DataDirLock":
        """Take the lock at once or raise :class:`DataDirInUse`; taking it twice is harmless."""
        if self.held:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.data_dir / LOCK_NAME)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise DataDirInUse(self.data_dir) from None
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None


def node_holder(data_dir: Path) -> str:
    """This node's name in its leases: ``<host>-<id>``, the id made once and kept in
    ``<data-dir>/node-id``, so a server restarted on the same folder (whose lock it holds) knows
    the runs it held before. Only call while holding the lock."""
    path = Path(data_dir) / NODE_ID
    try:
        node = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        node = ""
    if not node.isalnum():
        node = secrets.token_hex(8)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(node + "\n", encoding="ascii")
        os.replace(tmp, path)
    return f"{socket.gethostname()}-{node}"


def clean_leftovers(data_dir: Path, older_than_s: float | None = None) -> int:
    """Delete what a server killed mid-write left behind: uploads still being received
    (``tmp/``), outputs still being written (``outputs/<id>/<run>/.out-0.png.tmp``, or
    ``outputs/<id>/.out-0.png.tmp`` from before runs had folders) and LoRA downloads
    still running (``loras/*.part``). Only safe while holding the lock, or, in a folder shared with
    other nodes, for files untouched for ``older_than_s``. Returns the count."""
    removed = 0
    tmp = data_dir / "tmp"
    cutoff = time.time() - older_than_s if older_than_s is not None else None

    def stale(entry: Path) -> bool:
        try:
            return cutoff is None or entry.lstat().st_mtime < cutoff
        except OSError:
            return False

    if tmp.is_dir():
        for entry in tmp.iterdir():
            if not stale(entry):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError:
                log.warning("could not remove %s", entry)
    patterns = (("outputs", "*/.*.tmp"), ("outputs", "*/*/.*.tmp"), (LORA_CACHE, "*.part"))
    for folder, pattern in patterns:
        root = data_dir / folder
        if not root.is_dir():
            continue
        for entry in root.glob(pattern):
            if not stale(entry):
                continue
            try:
                entry.unlink()
                removed += 1
            except OSError:
                log.warning("could not remove %s", entry)
    if removed:
        log.info("removed %d unfinished file(s) a stopped server left in %s", removed, data_dir)
    return removed


def trim_lora_cache(data_dir: Path, budget_bytes: int) -> None:
    """Hold the LoRA download cache to its budget at start (the budget may have been lowered)."""
    from inference.lora import trim_cache

    folder = data_dir / LORA_CACHE
    if folder.is_dir():
        trim_cache(folder, budget_bytes)
