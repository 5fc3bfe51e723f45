"""SQLite: the durable record of predictions and files. The only module with SQL.

One connection in WAL mode, guarded by a lock: every statement is short, and a committed row
survives a ``kill -9``. Images are not stored here; outputs and uploads are files on disk whose
names are recorded here, and so are a prediction's long input strings (data URIs): the row keeps
where they stood (``input_blobs``), so rows and list pages stay small whatever a client sends.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    version TEXT NOT NULL,
    input TEXT NOT NULL,
    logs TEXT NOT NULL DEFAULT '',
    output TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    predict_time REAL,
    webhook TEXT,
    webhook_events TEXT,
    base_url TEXT,
    data_removed INTEGER NOT NULL DEFAULT 0,
    output_token TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    cancel_at REAL,
    input_blobs TEXT,
    input_bytes INTEGER NOT NULL DEFAULT 0,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at REAL
);
CREATE INDEX IF NOT EXISTS predictions_status ON predictions(status, seq);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created_at);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    md5 TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    path TEXT NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Columns added after the first release: table -> (name, type), added to older databases at open.
_ADDED_COLUMNS = {
    "predictions": (("cancel_at", "REAL"), ("input_blobs", "TEXT"), ("input_bytes", "INTEGER NOT NULL DEFAULT 0"),
                    ("output_bytes", "INTEGER NOT NULL DEFAULT 0"), ("cancel_requested_at", "REAL")),
    "files": (("owner", "TEXT"),),
}
# Indexes on added columns: made once the columns exist.
_INDEXES = """
CREATE INDEX IF NOT EXISTS predictions_owner ON predictions(owner, seq);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner);
"""
_ACTIVE = "('starting', 'processing')"
_JSON_COLUMNS = ("input", "output", "webhook_events", "input_blobs")


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS:
        if key in out and out[key] is not None:
            out[key] = json.loads(out[key])
    if "data_removed" in out:
        out["data_removed"] = bool(out["data_removed"])
    return out


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON_COLUMNS and v is not None else v) for k, v in fields.items()}


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self.db.executescript(_INDEXES)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, tuple(params))

    # -- settings -----------------------------------------------------------------------------

    def setting(self, key: str, default_factory) -> str:
        with self.lock:
            row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row:
                return row["value"]
            value = default_factory()
            self.db.execute("INSERT INTO settings(key, value) VALUES (?, ?)", (key, value))
            return value

    # -- predictions --------------------------------------------------------------------------

    def insert_prediction(self, **fields: Any) -> None:
        fields = _encode(fields)
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self._exec(f"INSERT INTO predictions ({cols}) VALUES ({marks})", fields.values())

    def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        return _row(self._exec("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone())

    def get_delivery(self, prediction_id: str) -> dict[str, Any] | None:
        """What each event needs (webhook, its filter, owner, predict time) without the input and logs."""
        row = self._exec("SELECT webhook, webhook_events, owner, predict_time FROM predictions WHERE id = ?",
                         (prediction_id,)).fetchone()
        return _row(row)

    def update_prediction(self, prediction_id: str, *, only_if_status: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Update fields; with ``only_if_status``, only while the status is one of those. True if a row changed."""
        fields = _encode(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE predictions SET {sets} WHERE id = ?"
        params = [*fields.values(), prediction_id]
        if only_if_status:
            sql += f" AND status IN ({', '.join('?' for _ in only_if_status)})"
            params += list(only_if_status)
        return self._exec(sql, params).rowcount > 0

    def claim_next(self, now: float) -> dict[str, Any] | None:
        """Atomically move the oldest queued prediction to processing and return it. One whose
        Cancel-After deadline has passed is left for the deadline watcher to cancel."""
        with self.lock:
            row = self.db.execute(
                "UPDATE predictions SET status = 'processing', started_at = ?, attempts = attempts + 1 "
                "WHERE seq = (SELECT seq FROM predictions WHERE status = 'starting' "
                "AND (cancel_at IS NULL OR cancel_at > ?) ORDER BY seq LIMIT 1) "
                "RETURNING *",
                (now, now),
            ).fetchone()
            return _row(row)

    def request_cancel(self, prediction_id: str, at: float) -> bool:
        """Record that a running prediction was asked to stop, so that a restart ends it canceled."""
        return self._exec("UPDATE predictions SET cancel_requested_at = ? WHERE id = ? AND status = 'processing'",
                          (at, prediction_id)).rowcount > 0

    def interrupted(self) -> list[dict[str, Any]]:
        """At startup: the predictions that were running when the server stopped."""
        rows = self._exec("SELECT id, attempts, cancel_requested_at, logs FROM predictions "
                          "WHERE status = 'processing' ORDER BY seq").fetchall()
        return [dict(r) for r in rows]

    def requeue_interrupted(self) -> list[str]:
        """At startup: predictions that were running when the server stopped go back to the queue."""
        with self.lock:
            rows = self.db.execute(
                "UPDATE predictions SET status = 'starting', started_at = NULL, "
                "logs = logs || 'Server restarted while this prediction was running; it runs again.\n' "
                "WHERE status = 'processing' RETURNING id"
            ).fetchall()
            return [r["id"] for r in rows]

    def count_queued(self, owner: str | None = None) -> int:
        """Predictions waiting to run: all of them, or one owner's."""
        if owner is None:
            return self._exec("SELECT COUNT(*) FROM predictions WHERE status = 'starting'").fetchone()[0]
        return self._exec("SELECT COUNT(*) FROM predictions WHERE status = 'starting' AND owner = ?",
                          (owner,)).fetchone()[0]

    def count_predictions(self, owner: str | None = None) -> int:
        if owner is None:
            return self._exec("SELECT COUNT(*) FROM predictions").fetchone()[0]
        return self._exec("SELECT COUNT(*) FROM predictions WHERE owner = ?", (owner,)).fetchone()[0]

    def stored_bytes(self, owner: str | None) -> int:
        """What one owner keeps on disk: its uploads, and its predictions' stored inputs and outputs."""
        files = self._exec("SELECT COALESCE(SUM(size), 0) FROM files WHERE owner IS ?", (owner,)).fetchone()[0]
        kept = self._exec("SELECT COALESCE(SUM(input_bytes + output_bytes), 0) FROM predictions "
                          "WHERE owner IS ? AND data_removed = 0", (owner,)).fetchone()[0]
        return files + kept

    def mean_predict_time(self, last: int = 20) -> float | None:
        """The mean run time of the last ``last`` predictions that ran to the end, or None."""
        row = self._exec("SELECT AVG(predict_time) FROM (SELECT predict_time FROM predictions "
                         "WHERE status = 'succeeded' AND predict_time IS NOT NULL ORDER BY seq DESC LIMIT ?)",
                         (last,)).fetchone()
        return row[0]

    def deadlines(self, limit: int = 200) -> list[dict[str, Any]]:
        """Queued and running predictions with a Cancel-After deadline, soonest first."""
        rows = self._exec(f"SELECT id, status, created_at, cancel_at FROM predictions WHERE cancel_at IS NOT NULL "
                          f"AND status IN {_ACTIVE} ORDER BY cancel_at LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        rows = self._exec("SELECT status, COUNT(*) AS n FROM predictions GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    def list_predictions(
        self,
        *,
        limit: int,
        before_seq: int | None = None,
        after_seq: int | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        owner: str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first. ``before_seq`` pages older, ``after_seq`` pages newer (still returned newest first);
        ``owner`` keeps one owner's."""
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        if after_seq is not None:
            where.append("seq > ?")
            params.append(after_seq)
        if created_after is not None:
            where.append("created_at > ?")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at < ?")
            params.append(created_before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "ASC" if after_seq is not None else "DESC"
        rows = self._exec(f"SELECT * FROM predictions {clause} ORDER BY seq {order} LIMIT ?", [*params, limit]).fetchall()
        out = [_row(r) for r in rows]
        return out if order == "DESC" else out[::-1]

    def expired_predictions(self, before: float) -> list[str]:
        rows = self._exec(
            "SELECT id FROM predictions WHERE data_removed = 0 AND completed_at IS NOT NULL AND completed_at < ?",
            (before,),
        ).fetchall()
        return [r["id"] for r in rows]

    def remove_data(self, prediction_id: str) -> None:
        """Retention: the prediction keeps its record; its input, output and their sizes are gone."""
        self._exec("UPDATE predictions SET data_removed = 1, output = NULL, input = '{}', input_blobs = '[]', "
                   "input_bytes = 0, output_bytes = 0 WHERE id = ?", (prediction_id,))

    def inline_inputs(self, longer_than: int) -> list[str]:
        """Predictions written before inputs were stored apart whose input is longer than
        ``longer_than`` characters; the rest are marked as stored apart already (nothing to move)."""
        with self.lock:
            ids = [r["id"] for r in self.db.execute(
                "SELECT id FROM predictions WHERE input_blobs IS NULL AND data_removed = 0 AND length(input) > ?",
                (longer_than,))]
            self.db.execute("UPDATE predictions SET input = '{}', input_blobs = '[]' "
                            "WHERE input_blobs IS NULL AND data_removed = 1")
            self.db.execute("UPDATE predictions SET input_blobs = '[]' WHERE input_blobs IS NULL AND length(input) <= ?",
                            (longer_than,))
            return ids

    def vacuum(self) -> None:
        """Rewrite the database to its live size, and empty the write-ahead log the rewrite went through."""
        with self.lock:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- files --------------------------------------------------------------------------------

    def insert_file(self, **fields: Any) -> None:
        fields = dict(fields, metadata=json.dumps(fields.get("metadata") or {}))
        cols = ", ".join(fields)
        self._exec(f"INSERT INTO files ({cols}) VALUES ({', '.join('?' for _ in fields)})", fields.values())

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        row = self._exec("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["metadata"] = json.loads(out["metadata"])
        return out

    def list_files(self, *, limit: int, before_seq: int | None = None, after_seq: int | None = None,
                   owner: str | None = None) -> list[dict[str, Any]]:
        """Newest first, paged like predictions (the rowid is the upload order); ``owner`` keeps one owner's."""
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if before_seq is not None:
            where.append("rowid < ?")
            params.append(before_seq)
        if after_seq is not None:
            where.append("rowid > ?")
            params.append(after_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "ASC" if after_seq is not None else "DESC"
        rows = self._exec(f"SELECT rowid AS seq, * FROM files {clause} ORDER BY rowid {order} LIMIT ?",
                          [*params, limit]).fetchall()
        out = [dict(r, metadata=json.loads(r["metadata"])) for r in rows]
        return out if order == "DESC" else out[::-1]

    def delete_file(self, file_id: str) -> bool:
        return self._exec("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    def expired_files(self, now: float) -> list[dict[str, Any]]:
        rows = self._exec("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at < ?", (now,)).fetchall()
        return [self.get_file(r["id"]) for r in rows]


def now() -> float:
    return time.time()
