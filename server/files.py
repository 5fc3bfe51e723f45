"""Files on disk: uploads (the /v1/files API), prediction inputs stored apart, and outputs.

Uploads live in ``<data>/files/<id>``, outputs in ``<data>/outputs/<prediction id>/out-<i>.<ext>``,
a prediction's long input strings in ``<data>/inputs/<prediction id>/<n>`` (UTF-8 text, exactly as
sent). File URLs that clients send back as inputs (``.../v1/files/<id>``) are resolved here, without
HTTP, for the tenant that uploaded them only. On PostgreSQL without --blob-dir the same folders
are each node's copies of files kept in the database (:mod:`server.blobs`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import mimetypes
import os
import re
import secrets
import shutil
import sqlite3
from pathlib import Path
from typing import Callable

from inference.errors import Cancelled
from inference.images import OUTPUT_CONTENT_TYPES

from .protocol import disk_full
from .records import FileRecord
from .store import OwnerLimits, Store

_FILE_URL = re.compile(r"/v1/files/([a-z0-9]{20,40})/?$")
_SAFE_NAME = re.compile(r"^(out-\d+\.(webp|jpg|png)|mask\.png)$")  # outputs, and a mask_prompt's mask
_SAFE_RUN = re.compile(r"^[a-z0-9]{1,32}$")


# Replicate's ids today are 26 characters of Crockford's base32 in lower case: digits and letters
# but i, l, o and u (e.g. "06h9xhxewxrgc0cf6c9s0shqsm"); 130 random bits.
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ID_LENGTH = 26


def new_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


log = logging.getLogger(__name__)
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def is_disk_full(exc: BaseException) -> bool:
    """A write that ran out of disk: a file's (ENOSPC, EDQUOT), SQLite's "database or disk is full"
    or PostgreSQL's disk_full (SQLSTATE 53100)."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    if getattr(exc, "sqlstate", None) == "53100":
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


@contextlib.contextmanager
def disk_guard():
    """Running out of disk inside is a 507, never a 500."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            log.warning("the disk is full: %s", exc)
            raise disk_full() from None
        raise


class FileStore:
    """The files of a data folder (or of a --blob-dir shared by the nodes). Every file is written
    in place, then handed to :meth:`_kept`; every read finds it through :meth:`_local`; every removal
    ends in :meth:`_dropped`: the hooks by which :class:`server.blobs.DatabaseFileStore` keeps
    the files in the database and this folder as their cache."""

    def __init__(self, data_dir: Path, store: Store, expiry_hours: float):
        self.root = data_dir
        self.uploads = data_dir / "files"
        self.outputs = data_dir / "outputs"
        self.inputs = data_dir / "inputs"
        self.tmp = data_dir / "tmp"
        for folder in (self.uploads, self.outputs, self.inputs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.expiry_s = expiry_hours * 3600

    # -- uploads ------------------------------------------------------------------------------

    def save_upload(self, tmp_path: Path, name: str, content_type: str | None, metadata: dict,
                    owner: str | None = None, limits: OwnerLimits | None = None) -> FileRecord:
        """Record a fully received upload (already size-checked) and move it in place. With
        ``limits``, its row is written only if its owner stays within them (checked under the
        owner's lock, see Store.insert_file_guarded): QuotaExceeded leaves nothing behind."""
        file_id = new_id()
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with open(tmp_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha256.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        target = self.uploads / file_id
        self._placing(target)
        os.replace(tmp_path, target)
        try:
            self._kept(target)
            content_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
            created = self.store.now()
            fields = dict(id=file_id, name=name, content_type=content_type, size=size, sha256=sha256.hexdigest(),
                          md5=md5.hexdigest(), metadata=metadata, created_at=created,
                          expires_at=created + self.expiry_s, path=str(target), owner=owner)
            if limits is not None:
                limits.adds_bytes = size
            self.store.insert_file_guarded(limits, **fields)
        except BaseException:
            target.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                self._dropped(target)
            raise
        return self.store.get_file(file_id)

    def delete_upload(self, file_id: str) -> bool:
        record = self.store.get_file(file_id)
        if record is None:
            return False
        (self.uploads / record.id).unlink(missing_ok=True)
        self._dropped(self.uploads / record.id)
        return self.store.delete_file(file_id)

    def resolve(self, value: str, sees=lambda owner: True) -> bytes | None:
        """The bytes of one of our own file URLs whose owner ``sees`` accepts, or None (the URL is
        then fetched like any other, as an unknown id is)."""
        match = _FILE_URL.search(value.split("?", 1)[0])
        if not match:
            return None
        record = self.store.get_file(match.group(1))
        if record is None or not sees(record.owner):
            return None
        path = self._local(self.uploads / record.id)
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:
            return None

    # -- inputs stored apart ------------------------------------------------------------------

    def input_path(self, prediction_id: str, index: int) -> Path:
        """Where a stored input string is read (it may be gone: check before reading)."""
        path = self.inputs / prediction_id / str(index)
        return self._local(path) or path

    def write_inputs(self, prediction_id: str, values: list[str]) -> list[int]:
        """Write each value (UTF-8); return their sizes in bytes. Nothing is left behind on failure."""
        if not values:
            return []
        folder = self.inputs / prediction_id
        folder.mkdir(parents=True, exist_ok=True)
        sizes = []
        try:
            for index, value in enumerate(values):
                data = value.encode("utf-8")
                tmp = folder / f".{index}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                self._placing(folder / str(index))
                os.replace(tmp, folder / str(index))
                self._kept(folder / str(index))
                sizes.append(len(data))
        except BaseException:
            self.remove_inputs(prediction_id)
            raise
        return sizes

    def read_input(self, prediction_id: str, index: int) -> str | None:
        path = self._local(self.inputs / prediction_id / str(index))
        try:
            return path.read_text(encoding="utf-8") if path is not None else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stored_input_ids(self) -> list[str]:
        return [p.name for p in self.inputs.iterdir() if p.is_dir()]

    def inputs_written_at(self, prediction_id: str) -> float:
        """When a prediction's stored inputs were written (their folder's time)."""
        try:
            return (self.inputs / prediction_id).stat().st_mtime
        except OSError:
            return 0.0

    def remove_inputs(self, prediction_id: str) -> None:
        shutil.rmtree(self.inputs / prediction_id, ignore_errors=True)
        self._dropped(self.inputs / prediction_id, folder=True)

    # -- outputs ------------------------------------------------------------------------------
    # Each run writes its outputs in a folder of its own, outputs/<prediction id>/<run>/, and the
    # run that records the prediction's outcome records that folder (PredictionRecord.output_run):
    # a run fenced out (its lease ran out while it was stopped, and another run finished the
    # prediction) writes only its own folder, so what the prediction's URLs serve never changes.
    # Predictions recorded before runs had folders (output_run None) keep outputs/<id>/<name>.

    def output_dir(self, prediction_id: str, run: str | None = None) -> Path:
        folder = self.outputs / prediction_id
        return folder / run if run else folder

    def write_outputs(self, prediction_id: str, outputs, run: str | None = None,
                      cancelled: Callable[[], bool] | None = None) -> list[str]:
        """Write each output atomically into the run's folder; return the names recorded in the
        database. ``cancelled()`` is asked before each file: True stops with
        :class:`inference.errors.Cancelled` (what was written stays in the run's folder, which
        the caller removes)."""
        folder = self.output_dir(prediction_id, run)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for out in outputs:
            if cancelled is not None and cancelled():
                raise Cancelled()
            tmp = folder / f".{out.name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(out.data)
                fh.flush()
                os.fsync(fh.fileno())
            self._placing(folder / out.name)
            os.replace(tmp, folder / out.name)
            self._kept(folder / out.name)
            names.append(out.name)
        return names

    def read_output(self, prediction_id: str, name: str, run: str | None = None) -> bytes | None:
        path = self.output_path(prediction_id, name, run)
        try:
            return path.read_bytes() if path is not None else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def output_path(self, prediction_id: str, name: str, run: str | None = None) -> Path | None:
        if not _SAFE_NAME.match(name) or (run is not None and not _SAFE_RUN.match(run)):
            return None
        return self._local(self.output_dir(prediction_id, run) / name)

    def data_uri(self, prediction_id: str, name: str, run: str | None = None) -> str | None:
        data = self.read_output(prediction_id, name, run)
        if data is None:
            return None
        ext = name.rsplit(".", 1)[-1]
        return f"data:{OUTPUT_CONTENT_TYPES[ext]};base64,{base64.b64encode(data).decode()}"

    def remove_outputs(self, prediction_id: str, run: str | None = None) -> None:
        """Remove a prediction's outputs: every run's, or one run's (a run that was fenced out)."""
        folder = self.output_dir(prediction_id, run)
        shutil.rmtree(folder, ignore_errors=True)
        self._dropped(folder, folder=True)

    def outputs_size(self, prediction_id: str, names: list[str], run: str | None = None) -> int:
        total = 0
        for name in names:
            path = self.output_path(prediction_id, name, run)
            total += path.stat().st_size if path else 0
        return total

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.outputs).free

    def sweep(self) -> int:
        """Remove what this folder keeps of files removed elsewhere (nothing here: it is the record)."""
        return 0

    # -- where the files are kept (see server.blobs) ------------------------------------------

    def _placing(self, path: Path) -> None:
        """A file is about to be written in place at ``path`` (then :meth:`_kept`)."""

    def _kept(self, path: Path) -> None:
        """A file was written in place at ``path`` (the folder is the record: nothing more to do)."""

    def _local(self, path: Path) -> Path | None:
        """``path`` if the file is there to read, else None."""
        return path if path.is_file() else None

    def _dropped(self, path: Path, folder: bool = False) -> None:
        """The file (or, with ``folder``, every file under the folder) at ``path`` was removed."""


def content_type_for(name: str) -> str:
    return OUTPUT_CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")


def describe_bytes(n: int) -> str:
    """A size limit for an error message: "64 MB", "48 KB" (never "0 MB" for a small limit)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
