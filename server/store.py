"""SQLite: the durable record of predictions and files. The only module with SQL.

One connection in WAL mode, guarded by a lock: every statement is short, and a committed row
survives a ``kill -9``. Images are not stored here; outputs and uploads are files on disk whose
names are recorded here.
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
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Columns added after the first release: (name, type), added to older databases at open.
_ADDED_COLUMNS = (("cancel_at", "REAL"), ("cancel_requested_at", "REAL"))
_ACTIVE = "('starting', 'processing')"
_JSON_COLUMNS = ("input", "output", "webhook_events")


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
        present = {r["name"] for r in self.db.execute("PRAGMA table_info(predictions)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in present:
                self.db.execute(f"ALTER TABLE predictions ADD COLUMN {name} {kind}")

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
        """What each event needs (webhook, its filter, predict time) without the large input and logs."""
        row = self._exec("SELECT webhook, webhook_events, predict_time FROM predictions WHERE id = ?",
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

    def count_queued(self) -> int:
        return self._exec("SELECT COUNT(*) FROM predictions WHERE status = 'starting'").fetchone()[0]

    def count_predictions(self) -> int:
        return self._exec("SELECT COUNT(*) FROM predictions").fetchone()[0]

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
    ) -> list[dict[str, Any]]:
        """Newest first. ``before_seq`` pages older, ``after_seq`` pages newer (still returned newest first)."""
        where, params = [], []
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

    def expired_predictions(self, before: float) -> list[dict[str, Any]]:
        rows = self._exec(
            "SELECT * FROM predictions WHERE data_removed = 0 AND completed_at IS NOT NULL AND completed_at < ?",
            (before,),
        ).fetchall()
        return [_row(r) for r in rows]

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

    def list_files(self, *, limit: int, before_seq: int | None = None, after_seq: int | None = None) -> list[dict[str, Any]]:
        """Newest first, paged like predictions (the rowid is the upload order)."""
        where, params = [], []
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
