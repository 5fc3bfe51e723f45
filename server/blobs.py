"""Files kept in PostgreSQL: uploads, long inputs and outputs readable from every node, with no
shared folder.

With ``--database postgresql://…`` and no ``--blob-dir``, each file is written to the node's own
``--data-dir`` as before and then to the ``blobs`` table (parts of about 1 MB, on a connection of
its own, committed before the row that names the file is written), under the key of its path in
the data folder (``files/<id>``, ``inputs/<prediction id>/<n>``, ``outputs/<prediction id>/out-0.png``).
A node that is asked for a file it does not hold streams it from the database into its folder
once, and serves that copy from then on.

The copy gets the file's modification time as the database recorded it, to the nanosecond, so
``ETag`` and ``Last-Modified`` (made from the time and the size) are the same on every node, and
``Range`` requests are served from the copy. Retention removes the rows and the removing node's
copies; each node's janitor removes its copies of files that are no longer kept (:meth:`sweep`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from .files import FileStore
from .postgres import PostgresStore

log = logging.getLogger(__name__)
SWEEP_BATCH = 500  # cached copies looked up in the database in one query
EMPTY_FOLDER_AGE_S = 60.0  # the janitor removes a prediction's empty folder once it is this old
# In a data folder: its files are in the database (those kept before were moved there once).
ADOPTED_MARK = "files-in-database"


class DatabaseFileStore(FileStore):
    def __init__(self, data_dir: Path, store: PostgresStore, expiry_hours: float):
        super().__init__(data_dir, store, expiry_hours)
        self.store: PostgresStore = store
        self._writing: set[str] = set()  # keys written in place, not yet in the database
        self._lock = threading.Lock()
        self.adopt()

    def _files(self) -> list[Path]:
        return [p for folder in (self.uploads, self.outputs, self.inputs)
                for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]

    def adopt(self) -> int:
        """Once per data folder: put the files it kept before its files were kept in the database
        (a server that ran on PostgreSQL with its files in this folder) into the database, so the
        janitor's :meth:`sweep`, which removes copies of files the database no longer keeps, never
        takes them for such copies. The number put there."""
        mark = self.root / ADOPTED_MARK
        if mark.exists():
            return 0
        files = self._files()
        adopted = 0
        for start in range(0, len(files), SWEEP_BATCH):
            batch = {self._key(p): p for p in files[start:start + SWEEP_BATCH]}
            for key in batch.keys() - self.store.blobs_present(list(batch)):
                self.store.put_blob(key, batch[key], batch[key].stat().st_mtime_ns)
                adopted += 1
        if adopted:
            log.info("put %d files this folder kept into the database", adopted)
        mark.write_text("The files of this data folder are kept in the database; this folder holds copies.\n")
        return adopted

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _placing(self, path: Path) -> None:
        with self._lock:
            self._writing.add(self._key(path))

    def _kept(self, path: Path) -> None:
        key = self._key(path)
        try:
            self.store.put_blob(key, path, path.stat().st_mtime_ns)
        finally:
            with self._lock:
                self._writing.discard(key)

    def _local(self, path: Path) -> Path | None:
        if path.is_file():
            return path
        try:
            key = self._key(path)
        except ValueError:
            return None
        info = self.store.blob_info(key)
        if info is None:
            return None
        size, mtime_ns = info
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=".blob-")
        try:
            written = 0
            with os.fdopen(fd, "wb") as out:
                for part in self.store.blob_parts(key):
                    out.write(part)
                    written += len(part)
            if written != size:  # removed (or replaced) while it was read
                return None
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return path

    def _dropped(self, path: Path, folder: bool = False) -> None:
        key = self._key(path)
        self.store.delete_blobs(key + "/" if folder else key)

    def stored_input_ids(self) -> list[str]:
        return list(self.store.blob_folders("inputs/"))

    def inputs_written_at(self, prediction_id: str) -> float:
        return max(self.store.blob_folders(f"inputs/{prediction_id}/").values(), default=0) / 1e9

    def sweep(self) -> int:
        """Remove this node's copies of files no longer kept in the database (removed by another
        node: retention, a deleted upload). The number removed."""
        copies = self._files()
        removed = 0
        for start in range(0, len(copies), SWEEP_BATCH):
            batch = {self._key(p): p for p in copies[start:start + SWEEP_BATCH]}
            with self._lock:  # a file still on its way to the database stays
                gone = batch.keys() - self._writing - self.store.blobs_present(list(batch))
            for key in gone:
                batch[key].unlink(missing_ok=True)
                removed += 1
        settled = time.time() - EMPTY_FOLDER_AGE_S  # a folder made just now may be about to get its file
        for folder in (self.outputs, self.inputs):
            for entry in folder.iterdir():
                try:
                    if entry.is_dir() and entry.stat().st_mtime < settled:
                        entry.rmdir()  # only when empty
                except OSError:
                    pass
        if removed:
            log.info("removed %d copies of files no longer kept", removed)
        return removed
