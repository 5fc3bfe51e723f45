"""The durable record of predictions and files, in SQLite or PostgreSQL. The only module with SQL
(with :mod:`server.postgres`, which says how PostgreSQL is reached).

Rows come out of here as records (:mod:`server.records`); nothing else reads a row. Images are not
kept in the rows; outputs and uploads are files whose names are recorded here, and so are a
prediction's long input strings (data URIs): the row keeps where they stood (``input_blobs``), so
rows and list pages stay small whatever a client sends. On PostgreSQL without --blob-dir the files'
bytes are kept here too, in a table of their own (``blobs``, see :mod:`server.blobs`).

**Time.** Every time that decides something across nodes (a lease running out, a claim, a
deadline, an owed webhook coming due) is the database's own clock, read in the statement that
decides (``{now}`` in the SQL below), so no node's clock matters. The times recorded for people
(created, started, completed) come from :meth:`Store.now`: this node's clock corrected by its
measured distance from the database's.

**Durability.** Every write is committed durably before it returns (an acknowledged create, a
claim, an outcome, a cancel survive a crash of the database), except the writes whose loss is
harmless and that a run makes many times (its logs as they grow, its lease's renewals, its
previews): those are written with ``durable=False``.

**A database away** (restarting, crashed, cut off) raises :class:`DatabaseUnavailable` at once
rather than hanging: routes answer 503 with a Retry-After, background work tries again.

Its length is on purpose: the statements both backends run are here (SQLite's backend, which
PostgreSQL's reuses), so a change of the schema or of a status rule is read in one file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from .protocol import Status
from .records import FileRecord, PredictionRecord, PreviewRecord

log = logging.getLogger(__name__)

STARTING, PROCESSING = Status.STARTING.value, Status.PROCESSING.value
ACTIVE = f"('{STARTING}', '{PROCESSING}')"

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
ADDED_COLUMNS = {
    "predictions": (("cancel_at", "REAL"), ("input_blobs", "TEXT"), ("input_bytes", "INTEGER NOT NULL DEFAULT 0"),
                    ("output_bytes", "INTEGER NOT NULL DEFAULT 0"), ("cancel_requested_at", "REAL"),
                    ("lease", "TEXT"), ("lease_expires_at", "REAL"),
                    ("webhook_due", "REAL"), ("api", "TEXT"), ("api_data", "TEXT"),
                    ("cancel_reason", "TEXT"), ("output_run", "TEXT"), ("webhook_lease", "TEXT"),
                    ("webhook_lease_until", "REAL"), ("webhook_attempts", "INTEGER NOT NULL DEFAULT 0"),
                    ("webhook_error", "TEXT"), ("seed", "INTEGER"), ("step", "INTEGER"), ("steps", "INTEGER")),
    "files": (("owner", "TEXT"),),
}
# Indexes on added columns: made once the columns exist.
INDEXES = """
CREATE INDEX IF NOT EXISTS predictions_owner ON predictions(owner, seq);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner);
CREATE INDEX IF NOT EXISTS predictions_webhook_due ON predictions(webhook_due) WHERE webhook_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS predictions_retention ON predictions(completed_at) WHERE data_removed = 0;
CREATE INDEX IF NOT EXISTS predictions_queue ON predictions(seq) WHERE status = 'starting';
"""
_JSON_COLUMNS = ("input", "output", "webhook_events", "input_blobs", "api_data")


_PREDICTION_FIELDS = frozenset(f.name for f in dataclass_fields(PredictionRecord))
_FILE_FIELDS = frozenset(f.name for f in dataclass_fields(FileRecord))


class DatabaseUnavailable(Exception):
    """The database cannot be reached now (it is restarting, crashed, or cut off), or every
    connection to it stayed busy too long. Nothing was written by the call that raised it unless
    it says otherwise; a route answers 503 with ``Retry-After``, background work tries again."""

    retry_after_s = 2


class QuotaExceeded(Exception):
    """A write that would take an owner past a limit (see :meth:`Store.guarded`); nothing was written."""

    def __init__(self, kind: str, used: int, limit: int):
        super().__init__(f"{kind}: {used} of {limit}")
        self.kind, self.used, self.limit = kind, used, limit


def _record(row) -> PredictionRecord | None:
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
    values["webhook_attempts"] = int(values.get("webhook_attempts") or 0)
    return PredictionRecord(**values)


def _file(row) -> FileRecord | None:
    if row is None:
        return None
    values = {k: row[k] for k in row.keys() if k in _FILE_FIELDS}
    values["metadata"] = json.loads(values["metadata"])
    return FileRecord(**values)


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON_COLUMNS and v is not None else v) for k, v in fields.items()}


class Tx:
    """One transaction on one connection (see :meth:`Store.transaction`): the shared SQL run in it."""

    def __init__(self, store: "Store", db):
        self.store, self.db = store, db

    def all(self, sql: str, params: Iterable[Any] = ()) -> list:
        return self.db.execute(self.store._sql(sql), tuple(params)).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()):
        return self.db.execute(self.store._sql(sql), tuple(params)).fetchone()

    def run(self, sql: str, params: Iterable[Any] = ()) -> int:
        return self.db.execute(self.store._sql(sql), tuple(params)).rowcount

    def lock(self, key: str) -> None:
        """Hold ``key`` until the transaction ends: another transaction that locks the same key waits."""
        self.store._lock_key(self, key)


class Store:
    """The interface every backend keeps (see :func:`open_store`): SQLite (:class:`SqliteStore`,
    the embedded default) and PostgreSQL (:class:`server.postgres.PostgresStore`). The SQL is
    shared; each backend says how it connects, makes its tables and words the few things the two
    write differently (``_sql``)."""

    # Whether other processes use this database too (PostgreSQL): then what was running when this
    # one started may be another node's, and only an expired lease puts it back in the queue.
    shared = False

    def close(self) -> None:
        raise NotImplementedError

    def now(self) -> float:
        """The time to record (seconds since the epoch), as the database's clock tells it."""
        return time.time()

    @property
    def available(self) -> bool:
        """False while the database is known to be away (calls then raise DatabaseUnavailable)."""
        return True

    def on_reconnect(self, callback) -> None:
        """Call ``callback()`` each time the database comes back after it was away."""

    def notify(self, payload: str, queue: bool = False) -> None:
        """Tell the other nodes of a shared database (see listen); nothing on a database of one.
        ``queue``: a prediction waits to run, told only to the nodes that run workers; the other
        moves are told only to the nodes that answer the API."""

    def listen(self, on_message, stopping, on_reconnect=None, moves: bool = True, queue: bool = True) -> None:
        """Hand each other node's notify() payload to ``on_message`` until ``stopping`` is set: the
        moves (for a node that answers the API), the queue's (for a node that runs workers)."""

    # -- how statements run: each backend's own ----------------------------------------------

    def _sql(self, sql: str) -> str:
        """The shared SQL in this backend's words (placeholders, the clock, claim locking)."""
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple, fetch: str, durable: bool | None, retry: bool = True):
        """Run one statement: ``fetch`` is "all", "one" or "count" (rows changed). ``durable`` is
        None for a read, else whether the write must survive a crash of the database once this
        returns. ``retry``: whether the statement may run again when its connection broke before
        its answer came (False for a write that must not happen twice: a claim)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Several statements committed together (durably), or not at all."""
        raise NotImplementedError
        yield

    def _lock_key(self, tx: Tx, key: str) -> None:
        raise NotImplementedError

    def _all(self, sql: str, params: Iterable[Any] = (), durable: bool | None = None) -> list:
        return self._execute(sql, tuple(params), "all", durable)

    def _one(self, sql: str, params: Iterable[Any] = (), durable: bool | None = None, retry: bool = True):
        return self._execute(sql, tuple(params), "one", durable, retry)

    def _run(self, sql: str, params: Iterable[Any] = (), durable: bool = True) -> int:
        """A write; the number of rows it changed."""
        return self._execute(sql, tuple(params), "count", durable)

    # -- settings -----------------------------------------------------------------------------

    def setting(self, key: str, default_factory) -> str:
        """A value kept for the server's life and beyond; the first caller's ``default_factory()``
        wins when several nodes ask at once."""
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        if row:
            return row["value"]
        self._run("INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, default_factory()))
        return self._one("SELECT value FROM settings WHERE key = ?", (key,))["value"]

    # -- what each worker serves ------------------------------------------------------------------
    # A worker records the model it loaded (under "model:<its node>:<device>"), so that API nodes,
    # which load none, can say what their predictions run on.

    def record_served_model(self, worker: str, model: dict) -> None:
        value = json.dumps({**model, "recorded_at": self.now()})
        self._run("INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (f"model:{worker}", value))

    def served_models(self) -> list[dict]:
        """What the workers recorded, the latest first."""
        rows = self._all("SELECT value FROM settings WHERE key LIKE ?", ("model:%",))
        models = [json.loads(r["value"]) for r in rows]
        return sorted(models, key=lambda m: m.get("recorded_at", 0), reverse=True)

    # -- predictions --------------------------------------------------------------------------
    # Statuses are written only by server.lifecycle, through insert_prediction, claim_next, move,
    # and requeue_interrupted; update_prediction writes anything but a status.

    @staticmethod
    def _insert_sql(fields: dict[str, Any]) -> tuple[str, list]:
        fields = _encode({"status": STARTING, **fields})
        # The id is random: a create sent again after a lost answer (the database restarted as it
        # committed) finds its row there and writes nothing twice.
        return (f"INSERT INTO predictions ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)}) "
                "ON CONFLICT (id) DO NOTHING", list(fields.values()))

    def insert_prediction(self, **fields: Any) -> None:
        """A new row, queued unless ``status`` says otherwise (a test's finished fixture, an import)."""
        self._run(*self._insert_sql(fields))

    def insert_prediction_guarded(self, limits: "OwnerLimits", **fields: Any) -> None:
        """A new row, written only if its owner stays within ``limits`` once it is (its queued
        predictions, the bytes it stores): checked and written in one transaction that holds the
        owner's lock, so creates racing on any number of nodes cannot pass a limit together.
        Raises QuotaExceeded, writing nothing."""
        with self.transaction() as tx:
            self._check_limits(tx, limits)
            tx.run(*self._insert_sql(fields))

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        return _record(self._one("SELECT * FROM predictions WHERE id = ?", (prediction_id,)))

    def update_prediction(self, prediction_id: str, *, held_by: str | None = None, durable: bool = True,
                          **fields: Any) -> bool:
        """Write fields other than the status; with ``held_by``, only while that claim holds the
        prediction (a run that lost it writes nothing). True if a row changed."""
        if "status" in fields:
            raise ValueError("statuses are moved by the lifecycle (Store.move), not written as fields")
        fields = _encode(fields)
        sql = f"UPDATE predictions SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
        params = [*fields.values(), prediction_id]
        if held_by is not None:
            sql += f" AND lease = ? AND status = '{PROCESSING}'"
            params.append(held_by)
        return self._run(sql, params, durable=durable) > 0

    def update_logs(self, runs: list[tuple]) -> list[str]:
        """The logs of many running predictions, ``(id, lease, logs, step, steps)`` each (a step of
        None keeps the recorded one), written (not durably) where that lease still holds the
        prediction; the ids written."""
        written = []
        for pid, lease, text, step, steps in runs:
            facts = {"step": step, "steps": steps} if step is not None else {}
            if self.update_prediction(pid, held_by=lease, durable=False, logs=text, **facts):
                written.append(pid)
        return written

    def move(self, prediction_id: str, to: Status, *, only_from: tuple[Status, ...], held_by: str | None = None,
             expired_grace_s: float | None = None, **fields: Any) -> PredictionRecord | None:
        """Move one prediction to ``to`` while its status is one of ``only_from`` (and, with
        ``held_by``, while that claim's lease holds it; with ``expired_grace_s``, only while that
        lease has run out, by the database's clock, see :meth:`expired_leases`: a run that renewed
        it meanwhile keeps it). The record as it now is, or None if nothing moved."""
        fields = _encode(dict(fields, status=to.value))
        sql = (f"UPDATE predictions SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ? "
               f"AND status IN ({', '.join('?' for _ in only_from)})")
        params = [*fields.values(), prediction_id, *(s.value for s in only_from)]
        if held_by is not None:
            sql += " AND lease = ?"
            params.append(held_by)
        if expired_grace_s is not None:
            sql += " AND " + self._EXPIRED
            params.append(expired_grace_s)
        return _record(self._one(sql + " RETURNING *", params, durable=True))

    def end_run(self, prediction_id: str, to: Status, *, held_by: str | None, webhook_lease: str | None,
                webhook_hold_s: float, expired_grace_s: float | None = None,
                **fields: Any) -> PredictionRecord | None:
        """Move a running prediction to its outcome ``to`` (see :meth:`move`), and when its final
        webhook is owed (``webhook_lease``), owe it from now, held by that lease for
        ``webhook_hold_s`` (by the database's clock) unless renewed."""
        if webhook_lease is None:
            return self.move(prediction_id, to, only_from=(Status.PROCESSING,), held_by=held_by,
                             expired_grace_s=expired_grace_s, **fields)
        fields = _encode(dict(fields, status=to.value, webhook_lease=webhook_lease, webhook_attempts=0,
                              webhook_error=None))
        sql = (f"UPDATE predictions SET {', '.join(f'{k} = ?' for k in fields)}, webhook_due = {{now}}, "
               f"webhook_lease_until = {{now}} + ? WHERE id = ? AND status = '{PROCESSING}'")
        params = [*fields.values(), webhook_hold_s, prediction_id]
        if held_by is not None:
            sql += " AND lease = ?"
            params.append(held_by)
        if expired_grace_s is not None:
            sql += " AND " + self._EXPIRED
            params.append(expired_grace_s)
        return _record(self._one(sql + " RETURNING *", params, durable=True))

    def cancel_queued(self, prediction_id: str, *, logs: str, completed_at: float, webhook_lease: str | None,
                      webhook_hold_s: float) -> PredictionRecord | None:
        """A queued prediction canceled before it ran (its final webhook owed as in :meth:`end_run`);
        None if it was no longer queued."""
        owed = (", webhook_lease = ?, webhook_due = {now}, webhook_lease_until = {now} + ?, webhook_attempts = 0"
                if webhook_lease is not None else "")
        params = [Status.CANCELED.value, completed_at, logs]
        if webhook_lease is not None:
            params += [webhook_lease, webhook_hold_s]
        return _record(self._one(f"UPDATE predictions SET status = ?, completed_at = ?, logs = ?{owed} "
                                 f"WHERE id = ? AND status = '{STARTING}' RETURNING *",
                                 [*params, prediction_id], durable=True))

    def claim_next(self, lease: str, lease_s: float = 3600.0) -> PredictionRecord | None:
        """Atomically move the oldest queued prediction to processing under ``lease`` (held for
        ``lease_s`` by the database's clock, unless renewed) and return it. One whose Cancel-After
        deadline has passed is left for the deadline watcher to cancel."""
        return _record(self._one(
            f"UPDATE predictions SET status = '{PROCESSING}', started_at = ?, attempts = attempts + 1, lease = ?, "
            "lease_expires_at = {now} + ? "
            f"WHERE seq = (SELECT seq FROM predictions WHERE status = '{STARTING}' "
            "AND (cancel_at IS NULL OR cancel_at > {now}) ORDER BY seq LIMIT 1 {skip_locked}) "
            "RETURNING *",
            (self.now(), lease, lease_s), durable=True, retry=False,
        ))

    def renew(self, prediction_id: str, lease: str, lease_s: float) -> bool:
        """Hold a running prediction's lease ``lease_s`` more (by the database's clock); False once
        the lease is no longer its. A renewal lost in a crash of the database is harmless: the next
        one writes it again, and leases run on after the database restarts (see expired_leases)."""
        return self._run("UPDATE predictions SET lease_expires_at = {now} + ? WHERE id = ? AND lease = ? "
                         f"AND status = '{PROCESSING}'", (lease_s, prediction_id, lease), durable=False) > 0

    # A lease has run out when its time has passed by the database's clock and, on a database that
    # restarted since, ``grace`` seconds have also passed since it did: while it was away no
    # worker could renew its lease. The one parameter is the grace in seconds.
    _EXPIRED = "(lease_expires_at IS NULL OR (lease_expires_at < {now} AND {db_started} + ? < {now}))"

    def expired_leases(self, grace_s: float, limit: int = 100) -> list[PredictionRecord]:
        """Running predictions whose lease ran out (their worker died or lost the database), oldest first."""
        rows = self._all(f"SELECT * FROM predictions WHERE status = '{PROCESSING}' AND {self._EXPIRED} "
                         "ORDER BY seq LIMIT ?", (grace_s, limit))
        return [_record(r) for r in rows]

    def leases_held_by(self, holder: str) -> list[PredictionRecord]:
        """Running predictions claimed under a lease of ``holder`` (a node: ``<holder>/<token>``), oldest first."""
        prefix = f"{holder}/"
        rows = self._all(f"SELECT * FROM predictions WHERE status = '{PROCESSING}' AND substr(lease, 1, ?) = ? "
                         "ORDER BY seq", (len(prefix), prefix))
        return [_record(r) for r in rows]

    # -- final webhooks owed (the outbox: see server.outbox) ------------------------------------
    # webhook_due: when the next attempt may be made (NULL: nothing owed); webhook_lease: the node
    # sending it now (NULL: any node may take it once due), held until webhook_lease_until.

    def claim_owed_webhooks(self, lease: str, hold_s: float, grace_s: float, limit: int = 50,
                            holder: str | None = None) -> list[PredictionRecord]:
        """Owed final webhooks that are due and that no sender holds (or whose sender's hold ran
        out: its node died; or that ``holder``, this node before it restarted, held), now held by
        ``lease`` for ``hold_s``."""
        mine, params = "", [lease, hold_s, grace_s]
        if holder:
            prefix = f"{holder}/"
            mine = " OR (substr(webhook_lease, 1, ?) = ? AND webhook_lease <> ?)"
            params += [len(prefix), prefix, lease]
        rows = self._all(
            "UPDATE predictions SET webhook_lease = ?, webhook_lease_until = {now} + ? WHERE id IN ("
            "SELECT id FROM predictions WHERE webhook_due IS NOT NULL AND webhook_due <= {now} AND ("
            f"webhook_lease IS NULL OR (webhook_lease_until < {{now}} AND {{db_started}} + ? < {{now}}){mine}) "
            "ORDER BY webhook_due LIMIT ? {skip_locked}) RETURNING *",
            (*params, limit), durable=True)
        return [_record(r) for r in rows]

    def renew_webhooks(self, lease: str, hold_s: float) -> int:
        """Hold every owed webhook ``lease`` holds ``hold_s`` more; the number held."""
        return self._run("UPDATE predictions SET webhook_lease_until = {now} + ? "
                         "WHERE webhook_lease = ? AND webhook_due IS NOT NULL", (hold_s, lease), durable=False)

    def webhook_sent(self, prediction_id: str, lease: str | None = None) -> bool:
        """The final webhook is settled (delivered, or given up): owed no more. With ``lease``,
        only while that sender holds it. True if it was."""
        sql, params = "UPDATE predictions SET webhook_due = NULL, webhook_lease = NULL WHERE id = ?", [prediction_id]
        if lease is not None:
            sql += " AND webhook_lease = ?"
            params.append(lease)
        return self._run(sql, params) > 0

    def webhook_failed(self, prediction_id: str, lease: str, error: str) -> bool:
        """One more attempt at the final webhook failed, for ``error``."""
        return self._run("UPDATE predictions SET webhook_attempts = webhook_attempts + 1, webhook_error = ? "
                         "WHERE id = ? AND webhook_lease = ?", (error, prediction_id, lease), durable=False) > 0

    def webhook_later(self, prediction_id: str, lease: str, delay_s: float) -> bool:
        """The final webhook is not settled (its last attempt failed, or it could not be tried now):
        owed again in ``delay_s`` (by the database's clock), held by no sender, so any node may
        send it then."""
        return self._run("UPDATE predictions SET webhook_due = {now} + ?, webhook_lease = NULL "
                         "WHERE id = ? AND webhook_lease = ?", (delay_s, prediction_id, lease)) > 0

    def webhook_given_up(self, prediction_id: str, lease: str, error: str) -> bool:
        """The final webhook failed until its retries ran out: owed no more, its last error kept."""
        return self._run("UPDATE predictions SET webhook_due = NULL, webhook_lease = NULL, webhook_error = ? "
                         "WHERE id = ? AND webhook_lease = ?", (error, prediction_id, lease)) > 0

    # -- cancels ------------------------------------------------------------------------------

    def cancel_requested(self, prediction_id: str) -> bool:
        """Whether a cancel was asked of this running prediction (on any node)."""
        return self.cancel_request(prediction_id) is not None

    def cancel_request(self, prediction_id: str) -> str | None:
        """The reason of the cancel asked of this running prediction (on any node): "" when it was
        given none (a user's cancel); None when none was asked."""
        row = self._one(f"SELECT cancel_reason FROM predictions WHERE id = ? AND status = '{PROCESSING}' "
                        "AND cancel_requested_at IS NOT NULL", (prediction_id,))
        return None if row is None else (row["cancel_reason"] or "")

    def cancel_requests(self, prediction_ids: list[str]) -> dict[str, str]:
        """:meth:`cancel_request` of many running predictions in one read per ``ID_BATCH``: those asked
        to stop, with their reasons ("" for none)."""
        found: dict[str, str] = {}
        for part in _batches(prediction_ids):
            rows = self._all(f"SELECT id, cancel_reason FROM predictions WHERE id IN ({', '.join('?' for _ in part)}) "
                             f"AND status = '{PROCESSING}' AND cancel_requested_at IS NOT NULL", part)
            found.update((r["id"], r["cancel_reason"] or "") for r in rows)
        return found

    def request_cancel(self, prediction_id: str, at: float, reason: str | None = None) -> bool:
        """Record that a running prediction was asked to stop (and why: the first reason given stays),
        so that the node running it logs that reason and a restart ends it canceled."""
        return self._run("UPDATE predictions SET cancel_requested_at = COALESCE(cancel_requested_at, ?), "
                         f"cancel_reason = COALESCE(cancel_reason, ?) WHERE id = ? AND status = '{PROCESSING}'",
                         (at, reason, prediction_id)) > 0

    def interrupted(self) -> list[PredictionRecord]:
        """At startup: the predictions that were running when the server stopped."""
        rows = self._all(f"SELECT * FROM predictions WHERE status = '{PROCESSING}' ORDER BY seq")
        return [_record(r) for r in rows]

    def requeue_interrupted(self) -> list[str]:
        """At startup: predictions that were running when the server stopped go back to the queue."""
        rows = self._all(
            f"UPDATE predictions SET status = '{STARTING}', started_at = NULL, lease = NULL, lease_expires_at = NULL, "
            "logs = logs || 'Server restarted while this prediction was running; it runs again.\n' "
            f"WHERE status = '{PROCESSING}' RETURNING id", durable=True)
        return [r["id"] for r in rows]

    # -- counts and limits ----------------------------------------------------------------------

    def count_queued(self, owner: str | None = None) -> int:
        """Predictions waiting to run: all of them, or one owner's."""
        if owner is None:
            return self._one(f"SELECT COUNT(*) AS n FROM predictions WHERE status = '{STARTING}'")["n"]
        return self._one(f"SELECT COUNT(*) AS n FROM predictions WHERE status = '{STARTING}' AND owner = ?",
                         (owner,))["n"]

    def count_predictions(self, owner: str | None = None) -> int:
        if owner is None:
            return self._one("SELECT COUNT(*) AS n FROM predictions")["n"]
        return self._one("SELECT COUNT(*) AS n FROM predictions WHERE owner = ?", (owner,))["n"]

    _STORED_BYTES = ("SELECT (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM files WHERE owner {is} ?) + "
                     "(SELECT CAST(COALESCE(SUM(input_bytes + output_bytes), 0) AS BIGINT) FROM predictions "
                     "WHERE owner {is} ? AND data_removed = 0) AS n")

    def stored_bytes(self, owner: str | None) -> int:
        """What one owner keeps on disk: its uploads, and its predictions' stored inputs and outputs."""
        return int(self._one(self._STORED_BYTES, (owner, owner))["n"])

    def _check_limits(self, tx: Tx, limits: "OwnerLimits") -> None:
        """Inside ``tx``: take the owner's lock, then raise QuotaExceeded if what it queues or keeps
        would pass its limits once ``limits.adds_queued`` and ``limits.adds_bytes`` are written."""
        tx.lock(f"owner:{limits.owner}")
        if limits.max_queued and limits.adds_queued:
            queued = tx.one(f"SELECT COUNT(*) AS n FROM predictions WHERE status = '{STARTING}' AND owner {{is}} ?",
                            (limits.owner,))["n"]
            if queued + limits.adds_queued > limits.max_queued:
                raise QuotaExceeded("queued", int(queued), limits.max_queued)
        if limits.max_bytes:
            used = int(tx.one(self._STORED_BYTES, (limits.owner, limits.owner))["n"])
            if used + limits.adds_bytes > limits.max_bytes:
                raise QuotaExceeded("bytes", used, limits.max_bytes)

    def reserve_output_bytes(self, prediction_id: str, held_by: str, size: int, limits: "OwnerLimits | None") -> bool:
        """Count ``size`` bytes of outputs against the prediction's owner before they are written,
        while the claim ``held_by`` holds the run: checked against ``limits`` (None: none apply)
        and recorded in one transaction under the owner's lock. Raises QuotaExceeded (nothing
        recorded); False when the run no longer holds the prediction."""
        with self.transaction() as tx:
            if limits is not None:
                self._check_limits(tx, limits)
            return tx.run(f"UPDATE predictions SET output_bytes = ? WHERE id = ? AND lease = ? "
                          f"AND status = '{PROCESSING}'", (size, prediction_id, held_by)) > 0

    def insert_file_guarded(self, limits: "OwnerLimits | None", **fields: Any) -> None:
        """A new file's row, written only if its owner stays within ``limits`` (see
        insert_prediction_guarded). Raises QuotaExceeded, writing nothing."""
        fields = dict(fields, metadata=json.dumps(fields.get("metadata") or {}))
        with self.transaction() as tx:
            if limits is not None:
                self._check_limits(tx, limits)
            tx.run(f"INSERT INTO files ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)})",
                   list(fields.values()))

    def mean_predict_time(self, last: int = 20) -> float | None:
        """The mean run time of the last ``last`` predictions that ran to the end, or None."""
        row = self._one("SELECT AVG(predict_time) AS mean FROM (SELECT predict_time FROM predictions "
                        f"WHERE status = '{Status.SUCCEEDED.value}' AND predict_time IS NOT NULL "
                        "ORDER BY seq DESC LIMIT ?) AS recent", (last,))
        return None if row["mean"] is None else float(row["mean"])

    def deadlines(self, limit: int = 200) -> list[PredictionRecord]:
        """Queued and running predictions with a Cancel-After deadline, soonest first."""
        rows = self._all(f"SELECT * FROM predictions WHERE cancel_at IS NOT NULL "
                         f"AND status IN {ACTIVE} ORDER BY cancel_at LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def count_by_status(self, owner: str | None = None) -> dict[str, int]:
        """Predictions by status: all of them, or one owner's."""
        if owner is None:
            rows = self._all("SELECT status, COUNT(*) AS n FROM predictions GROUP BY status")
        else:
            rows = self._all("SELECT status, COUNT(*) AS n FROM predictions WHERE owner = ? GROUP BY status", (owner,))
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

    def expired_predictions(self, before: float, limit: int = 1000) -> list[str]:
        """Up to ``limit`` predictions that ended before ``before`` and still keep their data, the
        oldest first (an index finds them: a sweep costs what it removes, not the table's size)."""
        rows = self._all(
            "SELECT id FROM predictions WHERE data_removed = 0 AND completed_at IS NOT NULL AND completed_at < ? "
            "ORDER BY completed_at LIMIT ?",
            (before, limit),
        )
        return [r["id"] for r in rows]

    def remove_data(self, prediction_id: str) -> None:
        """Retention: the prediction keeps its record; its input, output and their sizes are gone."""
        self._run("UPDATE predictions SET data_removed = 1, output = NULL, input = '{}', input_blobs = '[]', "
                  "input_bytes = 0, output_bytes = 0 WHERE id = ?", (prediction_id,))

    def inline_inputs(self, longer_than: int) -> list[str]:
        """Predictions written before inputs were stored apart whose input is longer than
        ``longer_than`` characters; the rest are marked as stored apart already (nothing to move)."""
        with self.transaction() as tx:
            ids = [r["id"] for r in tx.all(
                "SELECT id FROM predictions WHERE input_blobs IS NULL AND data_removed = 0 AND length(input) > ?",
                (longer_than,))]
            tx.run("UPDATE predictions SET input = '{}', input_blobs = '[]' "
                   "WHERE input_blobs IS NULL AND data_removed = 1")
            tx.run("UPDATE predictions SET input_blobs = '[]' WHERE input_blobs IS NULL AND length(input) <= ?",
                   (longer_than,))
            return ids

    def vacuum(self) -> None:
        """Give the space of removed data back (SQLite: rewrite the file; PostgreSQL: its own VACUUM)."""
        self._run("VACUUM")

    # -- previews -----------------------------------------------------------------------------
    # One row per running prediction, its latest preview, replaced in place; dropped when it ends.
    # Their loss in a crash of the database is harmless: none is written durably.

    def put_preview(self, prediction_id: str, held_by: str, step: int, total: int, content_type: str,
                    data: bytes, at: float) -> bool:
        """Keep this preview as the prediction's latest, only while the claim ``held_by`` holds the
        running prediction (a run that lost it, or one that ended, writes nothing). True if kept."""
        return self._run(
            "INSERT INTO previews (prediction_id, step, total, content_type, data, created_at) "
            "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM predictions WHERE id = ? AND lease = ? "
            f"AND status = '{PROCESSING}') ON CONFLICT (prediction_id) DO UPDATE SET step = excluded.step, "
            "total = excluded.total, content_type = excluded.content_type, data = excluded.data, "
            "created_at = excluded.created_at",
            (prediction_id, step, total, content_type, data, at, prediction_id, held_by), durable=False) > 0

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
        self._run("DELETE FROM previews WHERE prediction_id = ?", (prediction_id,), durable=False)
        if watchers:
            self._run("DELETE FROM preview_watchers WHERE prediction_id = ?", (prediction_id,), durable=False)

    def watch_previews(self, prediction_id: str, until: float) -> None:
        """Someone (a stream, a reader of the preview, on any node) wants this prediction's previews
        until ``until``; a later ``until`` already recorded stays."""
        self._run("INSERT INTO preview_watchers (prediction_id, until) VALUES (?, ?) ON CONFLICT (prediction_id) "
                  "DO UPDATE SET until = excluded.until WHERE preview_watchers.until < excluded.until",
                  (prediction_id, until), durable=False)

    def previews_watched(self, prediction_id: str, at: float) -> bool:
        return self._one("SELECT 1 AS watched FROM preview_watchers WHERE prediction_id = ? AND until >= ?",
                         (prediction_id, at)) is not None

    def previews_watched_of(self, prediction_ids: list[str], at: float) -> set[str]:
        """:meth:`previews_watched` of many predictions in one read per ``ID_BATCH``: those watched."""
        watched: set[str] = set()
        for part in _batches(prediction_ids):
            rows = self._all("SELECT prediction_id FROM preview_watchers WHERE prediction_id IN "
                             f"({', '.join('?' for _ in part)}) AND until >= ?", [*part, at])
            watched.update(r["prediction_id"] for r in rows)
        return watched

    def drop_stale_previews(self) -> int:
        """Retention: the previews (and watchers) of predictions that no longer run (a node died
        before it dropped them, or a preview was written as its prediction ended). The number of
        previews dropped."""
        self._run("DELETE FROM preview_watchers WHERE prediction_id NOT IN "
                  f"(SELECT id FROM predictions WHERE status IN {ACTIVE})", durable=False)
        return self._run("DELETE FROM previews WHERE prediction_id NOT IN "
                         f"(SELECT id FROM predictions WHERE status = '{PROCESSING}')", durable=False)

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


class OwnerLimits:
    """What one owner may hold, and what a write adds: checked by the guarded writes of
    :class:`Store` under the owner's lock. A limit of 0 is none."""

    __slots__ = ("owner", "max_queued", "max_bytes", "adds_queued", "adds_bytes")

    def __init__(self, owner: str | None, *, max_queued: int = 0, max_bytes: int = 0, adds_queued: int = 0,
                 adds_bytes: int = 0):
        self.owner, self.max_queued, self.max_bytes = owner, max_queued, max_bytes
        self.adds_queued, self.adds_bytes = adds_queued, adds_bytes


class SqliteStore(Store):
    """One file, one connection in WAL mode, guarded by a lock: every statement is short, and a
    committed row survives a ``kill -9`` of the server. A durable write is also flushed to the disk
    before it returns (``synchronous=FULL``), so it survives a power cut; the others
    (``synchronous=NORMAL``) may be lost to one. The embedded default: nothing to run beside the
    server, one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._synchronous = "NORMAL"
        self.db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            present = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self.db.executescript(INDEXES)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _sql(self, sql: str) -> str:
        return (sql.replace("{is}", "IS").replace("{skip_locked}", "").replace("{files_seq}", "rowid")
                .replace("{now}", "((julianday('now') - 2440587.5) * 86400.0)").replace("{db_started}", "0"))

    def _sync(self, level: str) -> None:
        if self._synchronous != level:
            self.db.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    def _execute(self, sql: str, params: tuple, fetch: str, durable: bool | None, retry: bool = True):
        with self.lock:
            if durable is not None and not self.db.in_transaction:
                self._sync("FULL" if durable else "NORMAL")
            cursor = self.db.execute(self._sql(sql), params)
            if fetch == "count":
                return cursor.rowcount
            return cursor.fetchall() if fetch == "all" else cursor.fetchone()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.lock:
            self._sync("FULL")
            self.db.execute("BEGIN IMMEDIATE")  # one writer at a time: what it read stays true
            try:
                yield Tx(self, self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _lock_key(self, tx: Tx, key: str) -> None:
        """Nothing more to take: a transaction here already excludes every other writer."""

    def vacuum(self) -> None:
        """Rewrite the file to its live size, and empty the write-ahead log the rewrite went through."""
        with self.lock:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


ID_BATCH = 500  # ids read in one statement (SQLite allows 999 parameters in older builds)


def _batches(ids: list[str]) -> Iterator[list[str]]:
    ids = list(ids)
    for start in range(0, len(ids), ID_BATCH):
        yield ids[start:start + ID_BATCH]


def open_store(location: str | Path, **options: Any) -> Store:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL, or a SQLite file's
    path. ``options`` go to the PostgreSQL store (its pool's size)."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(text, **options)
    return SqliteStore(Path(text))


def now() -> float:
    """This machine's clock, for what no other node compares (on a shared database, use Store.now)."""
    return time.time()
