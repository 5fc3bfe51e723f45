"""The durable record of predictions and files, in SQLite or PostgreSQL. The only module with SQL.

Rows come out of here as records (:mod:`server.records`); nothing else reads a row. Images are not
kept in the rows; outputs and uploads are files whose names are recorded here, and so are a
prediction's long input strings (data URIs): the row keeps where they stood (``input_blobs``), so
rows and list pages stay small whatever a client sends. On PostgreSQL without --blob-dir the files'
bytes are kept here too, in a table of their own (``blobs``, see :mod:`server.blobs`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from dataclasses import fields as dataclass_fields
from typing import Any, Iterable

from .protocol import Status
from .records import FileRecord, PredictionRecord, PreviewRecord

log = logging.getLogger(__name__)

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
    cancel_requested_at REAL,
    lease TEXT,
    lease_expires_at REAL,
    webhook_due REAL,
    api TEXT,
    api_data TEXT
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
CREATE TABLE IF NOT EXISTS previews (
    prediction_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL,
    total INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS preview_watchers (
    prediction_id TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Columns added after the first release: table -> (name, type), added to older databases at open.
_ADDED_COLUMNS = {
    "predictions": (("cancel_at", "REAL"), ("input_blobs", "TEXT"), ("input_bytes", "INTEGER NOT NULL DEFAULT 0"),
                    ("output_bytes", "INTEGER NOT NULL DEFAULT 0"), ("cancel_requested_at", "REAL"),
                    ("lease", "TEXT"), ("lease_expires_at", "REAL"),
                    ("webhook_due", "REAL"), ("api", "TEXT"), ("api_data", "TEXT"),
                    ("cancel_reason", "TEXT")),
    "files": (("owner", "TEXT"),),
}
# Indexes on added columns: made once the columns exist.
_INDEXES = """
CREATE INDEX IF NOT EXISTS predictions_owner ON predictions(owner, seq);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner);
CREATE INDEX IF NOT EXISTS predictions_webhook_due ON predictions(webhook_due) WHERE webhook_due IS NOT NULL;
"""
_ACTIVE = "('starting', 'processing')"
_JSON_COLUMNS = ("input", "output", "webhook_events", "input_blobs", "api_data")


_PREDICTION_FIELDS = frozenset(f.name for f in dataclass_fields(PredictionRecord))
_FILE_FIELDS = frozenset(f.name for f in dataclass_fields(FileRecord))


def _record(row: sqlite3.Row | None) -> PredictionRecord | None:
    """A predictions row as its record (the only place that reads one)."""
    if row is None:
        return None
    values = {k: row[k] for k in row.keys() if k in _PREDICTION_FIELDS}
    for key in _JSON_COLUMNS:
        if values.get(key) is not None:
            values[key] = json.loads(values[key])
    values["status"] = Status(values["status"])
    values["data_removed"] = bool(values.get("data_removed"))
    values["input_blobs"] = values.get("input_blobs") or []
    values["logs"] = values.get("logs") or ""
    return PredictionRecord(**values)


def _file(row: sqlite3.Row | None) -> FileRecord | None:
    if row is None:
        return None
    values = {k: row[k] for k in row.keys() if k in _FILE_FIELDS}
    values["metadata"] = json.loads(values["metadata"])
    return FileRecord(**values)


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON_COLUMNS and v is not None else v) for k, v in fields.items()}


class Store:
    """The interface every backend keeps (see :func:`open_store`): SQLite (:class:`SqliteStore`,
    the embedded default) and PostgreSQL (:class:`PostgresStore`). The SQL is shared; each backend
    says how it connects, makes its tables and words the few things the two write differently."""

    lock: threading.RLock
    db: Any

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # Whether other processes use this database too (PostgreSQL): then what was running when this
    # one started may be another node's, and only an expired lease puts it back in the queue.
    shared = False

    def notify(self, payload: str) -> None:
        """Tell the other nodes of a shared database (see listen); nothing on a database of one."""

    def listen(self, on_message, stopping) -> None:
        """Hand each other node's notify() payload to ``on_message`` until ``stopping`` is set."""

    def _sql(self, sql: str) -> str:
        """The shared SQL in this backend's words (placeholders, NULL-safe equality, claim locking)."""
        return sql.replace("{is}", "IS").replace("{skip_locked}", "").replace("{files_seq}", "rowid")

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list:
        with self.lock:
            return self.db.execute(self._sql(sql), tuple(params)).fetchall()

    def _one(self, sql: str, params: Iterable[Any] = ()):
        with self.lock:
            return self.db.execute(self._sql(sql), tuple(params)).fetchone()

    def _run(self, sql: str, params: Iterable[Any] = ()) -> int:
        """A write; the number of rows it changed."""
        with self.lock:
            return self.db.execute(self._sql(sql), tuple(params)).rowcount

    # -- settings -----------------------------------------------------------------------------

    def setting(self, key: str, default_factory) -> str:
        """A value kept for the server's life and beyond; the first caller's ``default_factory()``
        wins when several nodes ask at once."""
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        if row:
            return row["value"]
        self._run("INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, default_factory()))
        return self._one("SELECT value FROM settings WHERE key = ?", (key,))["value"]

    # -- predictions --------------------------------------------------------------------------
    # Statuses are written only by server.lifecycle, through insert_prediction, claim_next, move,
    # and requeue_interrupted; update_prediction writes anything but a status.

    def insert_prediction(self, **fields: Any) -> None:
        """A new row, queued unless ``status`` says otherwise (a test's finished fixture, an import)."""
        fields = _encode({"status": Status.STARTING.value, **fields})
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self._run(f"INSERT INTO predictions ({cols}) VALUES ({marks})", fields.values())

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        return _record(self._one("SELECT * FROM predictions WHERE id = ?", (prediction_id,)))

    def update_prediction(self, prediction_id: str, *, held_by: str | None = None, **fields: Any) -> bool:
        """Write fields other than the status; with ``held_by``, only while that claim holds the
        prediction (a run that lost it writes nothing). True if a row changed."""
        if "status" in fields:
            raise ValueError("statuses are moved by the lifecycle (Store.move), not written as fields")
        fields = _encode(fields)
        sql = f"UPDATE predictions SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
        params = [*fields.values(), prediction_id]
        if held_by is not None:
            sql += " AND lease = ? AND status = 'processing'"
            params.append(held_by)
        return self._run(sql, params) > 0

    def move(self, prediction_id: str, to: Status, *, only_from: tuple[Status, ...], held_by: str | None = None,
             expired_before: float | None = None, **fields: Any) -> PredictionRecord | None:
        """Move one prediction to ``to`` while its status is one of ``only_from`` (and, with
        ``held_by``, while that claim's lease holds it; with ``expired_before``, only if that lease ran
        out before then: a run that renewed it meanwhile keeps it). The record as it now is, or None
        if nothing moved."""
        fields = _encode(dict(fields, status=to.value))
        sql = (f"UPDATE predictions SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ? "
               f"AND status IN ({', '.join('?' for _ in only_from)})")
        params = [*fields.values(), prediction_id, *(s.value for s in only_from)]
        if held_by is not None:
            sql += " AND lease = ?"
            params.append(held_by)
        if expired_before is not None:
            sql += " AND (lease_expires_at IS NULL OR lease_expires_at < ?)"
            params.append(expired_before)
        return _record(self._one(sql + " RETURNING *", params))

    def claim_next(self, now: float, lease: str, lease_s: float = 3600.0) -> PredictionRecord | None:
        """Atomically move the oldest queued prediction to processing under ``lease`` (held for
        ``lease_s`` unless renewed) and return it. One whose Cancel-After deadline has passed is left
        for the deadline watcher to cancel."""
        return _record(self._one(
            "UPDATE predictions SET status = 'processing', started_at = ?, attempts = attempts + 1, lease = ?, "
            "lease_expires_at = ? "
            "WHERE seq = (SELECT seq FROM predictions WHERE status = 'starting' "
            "AND (cancel_at IS NULL OR cancel_at > ?) ORDER BY seq LIMIT 1 {skip_locked}) "
            "RETURNING *",
            (now, lease, now + lease_s, now),
        ))

    def renew(self, prediction_id: str, lease: str, until: float) -> bool:
        """Hold a running prediction's lease until ``until``; False once the lease is no longer its."""
        return self._run("UPDATE predictions SET lease_expires_at = ? WHERE id = ? AND lease = ? "
                         "AND status = 'processing'", (until, prediction_id, lease)) > 0

    def expired_leases(self, now: float, limit: int = 100) -> list[PredictionRecord]:
        """Running predictions whose lease ran out (their worker died or lost the database), oldest first."""
        rows = self._all("SELECT * FROM predictions WHERE status = 'processing' "
                         "AND (lease_expires_at IS NULL OR lease_expires_at < ?) ORDER BY seq LIMIT ?", (now, limit))
        return [_record(r) for r in rows]

    def leases_held_by(self, holder: str) -> list[PredictionRecord]:
        """Running predictions claimed under a lease of ``holder`` (a node: ``<holder>/<token>``), oldest first."""
        prefix = f"{holder}/"
        rows = self._all("SELECT * FROM predictions WHERE status = 'processing' AND substr(lease, 1, ?) = ? "
                         "ORDER BY seq", (len(prefix), prefix))
        return [_record(r) for r in rows]

    def claim_owed_webhooks(self, now: float, until: float, limit: int = 50) -> list[PredictionRecord]:
        """Ended predictions whose final webhook is owed and no longer held by a sender (its node
        died or stopped first), now held by the caller until ``until``."""
        rows = self._all("UPDATE predictions SET webhook_due = ? WHERE id IN (SELECT id FROM predictions "
                         "WHERE webhook_due IS NOT NULL AND webhook_due < ? ORDER BY webhook_due LIMIT ? "
                         "{skip_locked}) RETURNING *", (until, now, limit))
        return [_record(r) for r in rows]

    def webhook_sent(self, prediction_id: str) -> None:
        """The final webhook is settled (delivered, or given up after its retries): owed no more."""
        self._run("UPDATE predictions SET webhook_due = NULL WHERE id = ?", (prediction_id,))

    def cancel_requested(self, prediction_id: str) -> bool:
        """Whether a cancel was asked of this running prediction (on any node)."""
        return self.cancel_request(prediction_id) is not None

    def cancel_request(self, prediction_id: str) -> str | None:
        """The reason of the cancel asked of this running prediction (on any node): "" when it was
        given none (a user's cancel); None when none was asked."""
        row = self._one("SELECT cancel_reason FROM predictions WHERE id = ? AND status = 'processing' "
                        "AND cancel_requested_at IS NOT NULL", (prediction_id,))
        return None if row is None else (row["cancel_reason"] or "")

    def request_cancel(self, prediction_id: str, at: float, reason: str | None = None) -> bool:
        """Record that a running prediction was asked to stop (and why: the first reason given stays),
        so that the node running it logs that reason and a restart ends it canceled."""
        return self._run("UPDATE predictions SET cancel_requested_at = COALESCE(cancel_requested_at, ?), "
                         "cancel_reason = COALESCE(cancel_reason, ?) WHERE id = ? AND status = 'processing'",
                         (at, reason, prediction_id)) > 0

    def interrupted(self) -> list[PredictionRecord]:
        """At startup: the predictions that were running when the server stopped."""
        rows = self._all("SELECT * FROM predictions WHERE status = 'processing' ORDER BY seq")
        return [_record(r) for r in rows]

    def requeue_interrupted(self) -> list[str]:
        """At startup: predictions that were running when the server stopped go back to the queue."""
        rows = self._all(
            "UPDATE predictions SET status = 'starting', started_at = NULL, lease = NULL, lease_expires_at = NULL, "
            "logs = logs || 'Server restarted while this prediction was running; it runs again.\n' "
            "WHERE status = 'processing' RETURNING id")
        return [r["id"] for r in rows]

    def count_queued(self, owner: str | None = None) -> int:
        """Predictions waiting to run: all of them, or one owner's."""
        if owner is None:
            return self._one("SELECT COUNT(*) AS n FROM predictions WHERE status = 'starting'")["n"]
        return self._one("SELECT COUNT(*) AS n FROM predictions WHERE status = 'starting' AND owner = ?",
                         (owner,))["n"]

    def count_predictions(self, owner: str | None = None) -> int:
        if owner is None:
            return self._one("SELECT COUNT(*) AS n FROM predictions")["n"]
        return self._one("SELECT COUNT(*) AS n FROM predictions WHERE owner = ?", (owner,))["n"]

    def stored_bytes(self, owner: str | None) -> int:
        """What one owner keeps on disk: its uploads, and its predictions' stored inputs and outputs."""
        files = self._one("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS n FROM files WHERE owner {is} ?",
                          (owner,))["n"]
        kept = self._one("SELECT CAST(COALESCE(SUM(input_bytes + output_bytes), 0) AS BIGINT) AS n FROM predictions "
                         "WHERE owner {is} ? AND data_removed = 0", (owner,))["n"]
        return int(files) + int(kept)

    def mean_predict_time(self, last: int = 20) -> float | None:
        """The mean run time of the last ``last`` predictions that ran to the end, or None."""
        row = self._one("SELECT AVG(predict_time) AS mean FROM (SELECT predict_time FROM predictions "
                        "WHERE status = 'succeeded' AND predict_time IS NOT NULL ORDER BY seq DESC LIMIT ?) AS recent",
                        (last,))
        return None if row["mean"] is None else float(row["mean"])

    def deadlines(self, limit: int = 200) -> list[PredictionRecord]:
        """Queued and running predictions with a Cancel-After deadline, soonest first."""
        rows = self._all(f"SELECT * FROM predictions WHERE cancel_at IS NOT NULL "
                          f"AND status IN {_ACTIVE} ORDER BY cancel_at LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM predictions GROUP BY status")
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
    ) -> list[PredictionRecord]:
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
        rows = self._all(f"SELECT * FROM predictions {clause} ORDER BY seq {order} LIMIT ?", [*params, limit])
        out = [_record(r) for r in rows]
        return out if order == "DESC" else out[::-1]

    def expired_predictions(self, before: float) -> list[str]:
        rows = self._all(
            "SELECT id FROM predictions WHERE data_removed = 0 AND completed_at IS NOT NULL AND completed_at < ?",
            (before,),
        )
        return [r["id"] for r in rows]

    def remove_data(self, prediction_id: str) -> None:
        """Retention: the prediction keeps its record; its input, output and their sizes are gone."""
        self._run("UPDATE predictions SET data_removed = 1, output = NULL, input = '{}', input_blobs = '[]', "
                  "input_bytes = 0, output_bytes = 0 WHERE id = ?", (prediction_id,))

    def inline_inputs(self, longer_than: int) -> list[str]:
        """Predictions written before inputs were stored apart whose input is longer than
        ``longer_than`` characters; the rest are marked as stored apart already (nothing to move)."""
        with self.lock:
            ids = [r["id"] for r in self._all(
                "SELECT id FROM predictions WHERE input_blobs IS NULL AND data_removed = 0 AND length(input) > ?",
                (longer_than,))]
            self._run("UPDATE predictions SET input = '{}', input_blobs = '[]' "
                      "WHERE input_blobs IS NULL AND data_removed = 1")
            self._run("UPDATE predictions SET input_blobs = '[]' WHERE input_blobs IS NULL AND length(input) <= ?",
                      (longer_than,))
            return ids

    def vacuum(self) -> None:
        """Give the space of removed data back (SQLite: rewrite the file; PostgreSQL: its own VACUUM)."""
        with self.lock:
            self.db.execute("VACUUM")

    # -- previews -----------------------------------------------------------------------------
    # One row per running prediction, its latest preview, replaced in place; dropped when it ends.

    def put_preview(self, prediction_id: str, held_by: str, step: int, total: int, content_type: str,
                    data: bytes, at: float) -> bool:
        """Keep this preview as the prediction's latest, only while the claim ``held_by`` holds the
        running prediction (a run that lost it, or one that ended, writes nothing). True if kept."""
        return self._run(
            "INSERT INTO previews (prediction_id, step, total, content_type, data, created_at) "
            "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM predictions WHERE id = ? AND lease = ? "
            "AND status = 'processing') ON CONFLICT (prediction_id) DO UPDATE SET step = excluded.step, "
            "total = excluded.total, content_type = excluded.content_type, data = excluded.data, "
            "created_at = excluded.created_at",
            (prediction_id, step, total, content_type, data, at, prediction_id, held_by)) > 0

    def get_preview(self, prediction_id: str) -> PreviewRecord | None:
        row = self._one("SELECT * FROM previews WHERE prediction_id = ?", (prediction_id,))
        if row is None:
            return None
        return PreviewRecord(prediction_id=row["prediction_id"], step=int(row["step"]), total=int(row["total"]),
                             content_type=row["content_type"], data=bytes(row["data"]),
                             created_at=float(row["created_at"]))

    def drop_preview(self, prediction_id: str, watchers: bool = True) -> None:
        """The preview goes, and its watchers with it unless ``watchers`` is False (the prediction
        went back to the queue: whoever watched it still does)."""
        with self.lock:
            self._run("DELETE FROM previews WHERE prediction_id = ?", (prediction_id,))
            if watchers:
                self._run("DELETE FROM preview_watchers WHERE prediction_id = ?", (prediction_id,))

    def watch_previews(self, prediction_id: str, until: float) -> None:
        """Someone (a stream, a reader of the preview, on any node) wants this prediction's previews
        until ``until``; a later ``until`` already recorded stays."""
        self._run("INSERT INTO preview_watchers (prediction_id, until) VALUES (?, ?) ON CONFLICT (prediction_id) "
                  "DO UPDATE SET until = excluded.until WHERE preview_watchers.until < excluded.until",
                  (prediction_id, until))

    def previews_watched(self, prediction_id: str, at: float) -> bool:
        return self._one("SELECT 1 AS watched FROM preview_watchers WHERE prediction_id = ? AND until >= ?",
                         (prediction_id, at)) is not None

    def drop_stale_previews(self) -> int:
        """Retention: the previews (and watchers) of predictions that no longer run (a node died
        before it dropped them, or a preview was written as its prediction ended). The number of
        previews dropped."""
        with self.lock:
            self._run("DELETE FROM preview_watchers WHERE prediction_id NOT IN "
                      "(SELECT id FROM predictions WHERE status IN " + _ACTIVE + ")")
            return self._run("DELETE FROM previews WHERE prediction_id NOT IN "
                             "(SELECT id FROM predictions WHERE status = 'processing')")

    # -- files --------------------------------------------------------------------------------

    def insert_file(self, **fields: Any) -> None:
        fields = dict(fields, metadata=json.dumps(fields.get("metadata") or {}))
        cols = ", ".join(fields)
        self._run(f"INSERT INTO files ({cols}) VALUES ({', '.join('?' for _ in fields)})", fields.values())

    def get_file(self, file_id: str) -> FileRecord | None:
        return _file(self._one("SELECT {files_seq} AS seq, * FROM files WHERE id = ?", (file_id,)))

    def list_files(self, *, limit: int, before_seq: int | None = None, after_seq: int | None = None,
                   owner: str | None = None) -> list[FileRecord]:
        """Newest first, paged like predictions (the rowid is the upload order); ``owner`` keeps one owner's."""
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if before_seq is not None:
            where.append("{files_seq} < ?")
            params.append(before_seq)
        if after_seq is not None:
            where.append("{files_seq} > ?")
            params.append(after_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "ASC" if after_seq is not None else "DESC"
        rows = self._all(f"SELECT {{files_seq}} AS seq, * FROM files {clause} ORDER BY {{files_seq}} {order} LIMIT ?",
                          [*params, limit])
        out = [_file(r) for r in rows]
        return out if order == "DESC" else out[::-1]

    def delete_file(self, file_id: str) -> bool:
        return self._run("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    def expired_files(self, now: float) -> list[FileRecord]:
        rows = self._all("SELECT {files_seq} AS seq, * FROM files WHERE expires_at IS NOT NULL AND expires_at < ?",
                          (now,))
        return [_file(r) for r in rows]


class SqliteStore(Store):
    """One file, one connection in WAL mode, guarded by a lock: every statement is short, and a
    committed row survives a ``kill -9``. The embedded default: nothing to run beside the server."""

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

    def vacuum(self) -> None:
        """Rewrite the file to its live size, and empty the write-ahead log the rewrite went through."""
        with self.lock:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# The same tables in PostgreSQL's types: a sequence for the order, double precision for times,
# bigint for sizes; files get their own sequence (SQLite's rowid).
PG_SCHEMA = (SCHEMA.replace("seq INTEGER PRIMARY KEY AUTOINCREMENT", "seq BIGSERIAL PRIMARY KEY")
             .replace(" REAL", " DOUBLE PRECISION").replace(" INTEGER NOT NULL DEFAULT 0", " BIGINT NOT NULL DEFAULT 0")
             .replace("CREATE TABLE IF NOT EXISTS files (\n", "CREATE TABLE IF NOT EXISTS files (\n    seq BIGSERIAL UNIQUE,\n")
             .replace(" INTEGER NOT NULL,", " BIGINT NOT NULL,").replace(" BLOB ", " BYTEA "))


# Files kept in the database itself (PostgreSQL without --blob-dir, see server.blobs): each in parts
# of BLOB_PART bytes, no huge single value; every part carries the whole file's size and time. The
# "C" collation lets the key's index serve prefix matches (a prediction's folder).
BLOB_PART = 1 << 20
# Files travel on connections of their own: at most this many at once per process (more wait their
# turn rather than use up the server's max_connections), each opened within BLOB_CONNECT_S.
BLOB_CONNECTIONS = 8
BLOB_CONNECT_S = 10
PG_BLOBS = """
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT COLLATE "C" NOT NULL,
    part INTEGER NOT NULL,
    data BYTEA NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    PRIMARY KEY (key, part)
);
"""


class PostgresStore(Store):
    """A PostgreSQL database (``postgresql://…``), through psycopg 3. Queued predictions are claimed
    with ``FOR UPDATE SKIP LOCKED``, so any number of processes can claim from one queue, each
    prediction once."""

    def __init__(self, url: str):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise RuntimeError("A PostgreSQL database needs psycopg: pip install 'flux-fill-server[postgres]'") from None
        self.url = url
        self.lock = threading.RLock()
        self._blob_slots = threading.BoundedSemaphore(BLOB_CONNECTIONS)
        self.db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        # As SQLite's synchronous=NORMAL: a commit survives this process's kill -9 (the server has it),
        # and PostgreSQL stays consistent after its own crash or a power cut, losing at most the last
        # fraction of a second of commits; each write then costs no disk flush of its own.
        self.db.execute("SET synchronous_commit TO off")
        with self.lock:
            # One node at a time makes or upgrades the tables.
            self.db.execute("SELECT pg_advisory_lock(815373)")
            try:
                self.db.execute(PG_SCHEMA)
                for table, columns in _ADDED_COLUMNS.items():
                    for name, kind in columns:
                        kind = kind.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
                self.db.execute(_INDEXES)
                self.db.execute(PG_BLOBS)
            finally:
                self.db.execute("SELECT pg_advisory_unlock(815373)")

    shared = True
    CHANNEL = "flux_fill_events"

    def notify(self, payload: str) -> None:
        self._run("SELECT pg_notify(?, ?)", (self.CHANNEL, payload))

    def listen(self, on_message, stopping) -> None:
        """LISTEN on a connection of its own, reconnecting after a lost connection, until ``stopping``
        (a threading.Event) is set."""
        import psycopg

        delay = 0.5
        while not stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as db:
                    db.execute(f"LISTEN {self.CHANNEL}")
                    delay = 0.5
                    while not stopping.is_set():
                        for note in db.notifies(timeout=1.0):
                            on_message(note.payload)
            except psycopg.Error as exc:
                log.warning("lost the database's notifications (%s); listening again in %.1f s", exc, delay)
                stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    # -- files kept in the database (server.blobs: PostgreSQL without --blob-dir) ------------------

    def put_blob(self, key: str, path: Path, mtime_ns: int) -> None:
        """Keep the file at ``path`` under ``key`` (replacing what was there), in parts of
        BLOB_PART bytes, in one transaction on a connection of its own: other nodes see it whole
        or not at all, and the store's own connection is not held while megabytes travel."""
        import psycopg

        size = path.stat().st_size
        with self._blob_slots, psycopg.connect(self.url, connect_timeout=BLOB_CONNECT_S) as db, \
                open(path, "rb") as fh:  # committed as the block ends
            db.execute("DELETE FROM blobs WHERE key = %s", (key,))
            with db.cursor().copy("COPY blobs (key, part, data, size, mtime_ns) FROM STDIN") as copy:
                part = 0
                while True:
                    chunk = fh.read(BLOB_PART)
                    if not chunk and part:
                        break
                    copy.write_row((key, part, chunk, size, mtime_ns))
                    part += 1
                    if len(chunk) < BLOB_PART:
                        break

    def blob_info(self, key: str) -> tuple[int, int] | None:
        """(size, mtime in ns) of a file kept under ``key``, or None."""
        row = self._one("SELECT size, mtime_ns FROM blobs WHERE key = ? AND part = 0", (key,))
        return None if row is None else (int(row["size"]), int(row["mtime_ns"]))

    def blob_parts(self, key: str) -> Iterable[bytes]:
        """The parts of a file kept under ``key``, in order, a few at a time (a server-side cursor on a
        connection of its own, in one snapshot); nothing if there is none."""
        import psycopg

        with self._blob_slots, psycopg.connect(self.url, connect_timeout=BLOB_CONNECT_S) as db, \
                db.cursor(name="blob_parts") as cursor:
            cursor.itersize = 4
            cursor.execute("SELECT data FROM blobs WHERE key = %s ORDER BY part", (key,))
            for (data,) in cursor:
                yield bytes(data)

    def delete_blobs(self, prefix: str) -> int:
        """Remove every file kept under a key starting with ``prefix``; the number of parts removed."""
        return self._run("DELETE FROM blobs WHERE key LIKE ?", (_prefix_pattern(prefix),))

    def blobs_present(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are kept."""
        rows = self._all("SELECT key FROM blobs WHERE part = 0 AND key = ANY(?)", (list(keys),))
        return {r["key"] for r in rows}

    def blob_folders(self, prefix: str) -> dict[str, int]:
        """The folders under ``prefix`` (``inputs/``: one per prediction) and when their newest file
        was written (ns)."""
        folders: dict[str, int] = {}
        for row in self._all("SELECT key, mtime_ns FROM blobs WHERE key LIKE ? AND part = 0", (_prefix_pattern(prefix),)):
            name = row["key"][len(prefix):].split("/", 1)[0]
            folders[name] = max(folders.get(name, 0), int(row["mtime_ns"]))
        return folders

    def _sql(self, sql: str) -> str:
        return (sql.replace("?", "%s").replace("{is}", "IS NOT DISTINCT FROM")
                .replace("{skip_locked}", "FOR UPDATE SKIP LOCKED").replace("{files_seq}", "seq"))


def _prefix_pattern(prefix: str) -> str:
    """A LIKE pattern for the keys that start with ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL, or a SQLite file's path."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    return SqliteStore(Path(text))


def now() -> float:
    return time.time()
