"""Files on disk: uploads (the /v1/files API) and prediction outputs.

Uploads live in ``<data>/files/<id>``, outputs in ``<data>/outputs/<prediction id>/out-<i>.<ext>``.
File URLs that clients send back as inputs (``.../v1/files/<id>``) are resolved here, without HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
import re
import secrets
import shutil
from pathlib import Path

from inference.images import OUTPUT_CONTENT_TYPES

from .store import Store, now

_FILE_URL = re.compile(r"/v1/files/([a-z0-9]{20,40})/?$")
_SAFE_NAME = re.compile(r"^out-\d+\.(webp|jpg|png)$")


# Replicate's ids today are 26 characters of Crockford's base32 in lower case: digits and letters
# but i, l, o and u (e.g. "06h9xhxewxrgc0cf6c9s0shqsm"); 130 random bits.
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ID_LENGTH = 26


def new_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


class FileStore:
    def __init__(self, data_dir: Path, store: Store, expiry_hours: float):
        self.uploads = data_dir / "files"
        self.outputs = data_dir / "outputs"
        self.tmp = data_dir / "tmp"
        for folder in (self.uploads, self.outputs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.expiry_s = expiry_hours * 3600

    # -- uploads ------------------------------------------------------------------------------

    def save_upload(self, tmp_path: Path, name: str, content_type: str | None, metadata: dict) -> dict:
        """Record a fully received upload (already size-checked) and move it in place."""
        file_id = new_id()
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with open(tmp_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha256.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        target = self.uploads / file_id
        os.replace(tmp_path, target)
        content_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        created = now()
        self.store.insert_file(
            id=file_id,
            name=name,
            content_type=content_type,
            size=size,
            sha256=sha256.hexdigest(),
            md5=md5.hexdigest(),
            metadata=metadata,
            created_at=created,
            expires_at=created + self.expiry_s,
            path=str(target),
        )
        return self.store.get_file(file_id)

    def delete_upload(self, file_id: str) -> bool:
        row = self.store.get_file(file_id)
        if row is None:
            return False
        Path(row["path"]).unlink(missing_ok=True)
        return self.store.delete_file(file_id)

    def resolve(self, value: str) -> bytes | None:
        """The bytes of one of our own file URLs, or None when ``value`` is not one."""
        match = _FILE_URL.search(value.split("?", 1)[0])
        if not match:
            return None
        row = self.store.get_file(match.group(1))
        if row is None:
            return None
        try:
            return Path(row["path"]).read_bytes()
        except FileNotFoundError:
            return None

    # -- outputs ------------------------------------------------------------------------------

    def output_dir(self, prediction_id: str) -> Path:
        return self.outputs / prediction_id

    def write_outputs(self, prediction_id: str, outputs) -> list[str]:
        """Write each output atomically; return the names recorded in the database."""
        folder = self.output_dir(prediction_id)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for out in outputs:
            tmp = folder / f".{out.name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(out.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / out.name)
            names.append(out.name)
        return names

    def read_output(self, prediction_id: str, name: str) -> bytes | None:
        if not _SAFE_NAME.match(name):
            return None
        try:
            return (self.output_dir(prediction_id) / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def output_path(self, prediction_id: str, name: str) -> Path | None:
        if not _SAFE_NAME.match(name):
            return None
        path = self.output_dir(prediction_id) / name
        return path if path.is_file() else None

    def data_uri(self, prediction_id: str, name: str) -> str | None:
        data = self.read_output(prediction_id, name)
        if data is None:
            return None
        ext = name.rsplit(".", 1)[-1]
        return f"data:{OUTPUT_CONTENT_TYPES[ext]};base64,{base64.b64encode(data).decode()}"

    def remove_outputs(self, prediction_id: str) -> None:
        shutil.rmtree(self.output_dir(prediction_id), ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.outputs).free


def content_type_for(name: str) -> str:
    return OUTPUT_CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")


def describe_bytes(n: int) -> str:
    """A size limit for an error message: "64 MB", "48 KB" (never "0 MB" for a small limit)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
