"""The store on PostgreSQL (``--database postgresql://…``): how a fleet of nodes reaches its one
database, and keeps reaching it while the database restarts, crashes or is cut off.

- **A bounded pool** (psycopg_pool) of autocommit connections per process for the statements of
  :mod:`server.store`, and a second, smaller one for files kept in the database (their parts
  travel for seconds; they must not hold the statements' connections).
- **Reconnects.** A connection the database dropped (a restart, a crash, a failover) is noticed at
  its next statement: the pool's idle connections are checked and the statement is tried once
  more on a fresh one (unless it must not run twice). When that fails too, the database is taken
  as away: every call raises :class:`~server.store.DatabaseUnavailable` at once, without waiting
  on a connection, while one thread tries to reach it every fraction of a second; the first
  success puts the pool back to work and tells whoever asked (:meth:`on_reconnect`).
- **The database's clock.** Lease decisions are made by ``clock_timestamp()`` in the statements
  themselves; :meth:`now` is this node's clock corrected by its measured distance from the
  database's, remeasured every ``CLOCK_S``.
- **Durable commits** by default (``synchronous_commit`` as the server sets it, on by default);
  the writes whose loss is harmless turn it off for their own transaction only.
- **Events** between nodes by LISTEN/NOTIFY on a connection of its own, which reconnects.

Its length is on purpose: it holds everything that is PostgreSQL's own (pools and reconnects, the
away mode, LISTEN/NOTIFY, advisory locks, files in the database); the SQL it shares is server.store's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .store import ADDED_COLUMNS, INDEXES, SCHEMA, DatabaseUnavailable, Store, Tx

log = logging.getLogger(__name__)

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
BLOB_WAIT_S = 30.0  # the longest a file waits for one of those connections
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

CONNECT_S = 5.0  # opening one connection
POOL_WAIT_S = 10.0  # the longest a statement waits for a free connection of the pool
LOOP_WAIT_S = 1.0  # ... when it runs on the event loop, which must never wait long
AFTER_LOSS_WAIT_S = 2.0  # ... for a fresh connection after one was found closed
PROBE_S = (0.1, 0.25, 0.5, 1.0)  # how often the database is looked for while it is away
CLOCK_S = 30.0  # how often this node measures its clock against the database's
_SCHEMA_LOCK = 815373  # the advisory lock under which one node at a time makes or upgrades the tables


def describe_url(url: str) -> str:
    """Where a postgresql:// URL points, for people: host, port, role and database, no password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(url)
    except Exception:
        return "the --database URL (it could not be read)"
    host = parts.get("host") or "localhost (its socket)"
    return (f"{host} port {parts.get('port') or 5432} as role {parts.get('user') or '(the current user)'}, "
            f"database {parts.get('dbname') or '(the role name)'}")


def masked_url(url: str) -> str:
    """The URL as given, with its password (if any) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))
    except ValueError:
        return "the --database URL"


class DatabaseUnreachable(RuntimeError):
    """The database of --database cannot be reached or refuses this role: one sentence that names
    where it looked (host, port, role, database; the password masked) and what to do."""


def unreachable(url: str, exc: BaseException) -> DatabaseUnreachable:
    """The error for a connection to ``url`` that failed with ``exc``: the reason PostgreSQL or the
    network gave (its first line, past "connection to server ... failed:"), and the fix for it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else text
    reason = " ".join(first.rsplit("failed: ", 1)[-1].replace("FATAL:", "").split()).rstrip(".?")
    lowered = text.lower()
    if "password" in lowered or "role" in lowered and "does not exist" in lowered:
        fix = ("Check the role and its password in --database; docs/scale-out.md shows how to create a role "
               "and a database in the PostgreSQL you have")
    elif "database" in lowered and "does not exist" in lowered:
        fix = "Create that database (docs/scale-out.md shows how), or name one that exists in --database"
    else:
        fix = ("Start PostgreSQL there, or correct the host and port in --database "
               "(postgresql://ROLE:PASSWORD@HOST:PORT/DATABASE)")
    return DatabaseUnreachable(f"Cannot reach the database at {describe_url(url)} ({masked_url(url)}): "
                               f"{reason}. {fix}.")


def check_reachable(url: str) -> None:
    """Connect to ``url`` once, or raise :class:`DatabaseUnreachable`: a node checks its database
    before it binds its port or loads a model."""
    import psycopg

    try:
        psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_S).close()
    except psycopg.Error as exc:
        raise unreachable(url, exc) from None


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection or the server went away (not that a statement was wrong,
    nor that the disk is full): the errors a restart, a crash or a cut cable give."""
    import psycopg

    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        # None: the client saw the connection break; 08: connection exceptions; 57P01-03: the
        # server is shutting down, crashed, or not accepting connections yet.
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


def _close_pools(*pools) -> None:
    for pool in pools:
        try:
            pool.close(timeout=5.0)
        except Exception:
            pass


def _on_event_loop() -> bool:
    return asyncio._get_running_loop() is not None


def _fetch(cursor, fetch: str):
    if fetch == "count":
        return cursor.rowcount
    return cursor.fetchall() if fetch == "all" else cursor.fetchone()


class PostgresStore(Store):
    """A PostgreSQL database (``postgresql://…``), through psycopg 3 and its pool. Queued
    predictions are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of processes can claim
    from one queue, each prediction once."""

    shared = True
    CHANNEL = "flux_fill_events"  # moves of predictions: heard by the nodes that answer the API
    QUEUE_CHANNEL = "flux_fill_queue"  # a prediction waits to run: heard by the nodes that run workers

    def __init__(self, url: str, pool_size: int = 10):
        try:
            import psycopg  # noqa: F401
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise RuntimeError("A PostgreSQL database needs psycopg and psycopg_pool: "
                               "pip install 'flux-fill-server[postgres]'") from None
        self.url = url
        self.pool_size = pool_size
        self._closed = False
        self._closing = threading.Event()  # wakes the prober and the clock when the store closes
        self._state = threading.Lock()
        self._down_since: float | None = None  # monotonic time the database was found away
        self._reconnected: list = []
        self._offset = 0.0  # the database's clock less this node's
        self._make_tables()
        self.pool, self.blob_pool = self._make_pools()
        self._measure_clock()
        threading.Thread(target=self._keep_time, name="db-clock", daemon=True).start()

    def _make_tables(self) -> None:
        """Make or upgrade the tables (one node at a time), on a connection of its own; a database
        that cannot be reached is named in words."""
        import psycopg

        try:
            db = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_S)
        except psycopg.Error as exc:
            raise unreachable(self.url, exc) from None
        with db:
            db.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                db.execute(PG_SCHEMA)
                for table, columns in ADDED_COLUMNS.items():
                    for name, kind in columns:
                        kind = kind.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")
                        db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
                db.execute(INDEXES)
                db.execute(PG_BLOBS)
            finally:
                db.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))

    def _make_pools(self):
        """The statements' pool and the files' pool. Made anew when the database comes back after it
        was away: a pool that failed to connect for a while waits out its own back-off (up to
        minutes) before it tries again, while the database is there now."""
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        statements = ConnectionPool(self.url, min_size=1, max_size=self.pool_size, name="flux-fill",
                                    kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_S},
                                    timeout=POOL_WAIT_S, max_idle=300.0, open=True)
        files = ConnectionPool(self.url, min_size=0, max_size=BLOB_CONNECTIONS, name="flux-fill-files",
                               kwargs={"autocommit": True, "connect_timeout": BLOB_CONNECT_S},
                               timeout=BLOB_WAIT_S, max_idle=60.0, open=True)
        return statements, files

    def close(self) -> None:
        self._closed = True
        self._closing.set()
        self.pool.close()
        self.blob_pool.close()

    # -- time -----------------------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._offset

    def _measure_clock(self) -> None:
        """Measure the database's clock against this node's (the middle of the round trip)."""
        before = time.time()
        row = self._one("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS t")
        after = time.time()
        self._offset = float(row["t"]) - (before + after) / 2

    def _keep_time(self) -> None:
        while not self._closing.wait(CLOCK_S):
            if self._down_since is not None:
                continue
            try:
                self._measure_clock()
            except Exception as exc:  # the database is away: measured again once it is back
                log.debug("could not measure the database's clock: %s", exc)

    # -- reaching the database ------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._down_since is None

    def on_reconnect(self, callback) -> None:
        self._reconnected.append(callback)

    def _check_up(self) -> None:
        if self._down_since is not None:
            raise DatabaseUnavailable(f"the database at {describe_url(self.url)} is away")

    def _lost(self, exc: BaseException) -> DatabaseUnavailable:
        """The database went away: fail fast until the prober finds it again."""
        with self._state:
            first = self._down_since is None and not self._closed
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("lost the database at %s (%s); requests get 503 until it is back",
                        describe_url(self.url), str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            threading.Thread(target=self._probe, name="db-probe", daemon=True).start()
        return DatabaseUnavailable(f"the database at {describe_url(self.url)} is away")

    def _probe(self) -> None:
        """Look for the database until it answers (or the store closes); then put fresh pools to
        work and say it is back. Nothing stops this loop but those two."""
        import psycopg

        tries = 0
        while not self._closed:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_S) as db:
                    db.execute("SELECT 1")
                pools = self._make_pools()  # fresh: the old ones hold connections the database closed
            except Exception:
                self._closing.wait(PROBE_S[min(tries, len(PROBE_S) - 1)])
                tries += 1
                continue
            old = (self.pool, self.blob_pool)
            self.pool, self.blob_pool = pools
            threading.Thread(target=_close_pools, args=old, name="db-close", daemon=True).start()
            with self._state:
                away = time.monotonic() - (self._down_since or time.monotonic())
                self._down_since = None
            log.warning("the database at %s is back after %.1f s", describe_url(self.url), away)
            try:
                self._measure_clock()
            except Exception:
                pass
            for callback in list(self._reconnected):
                try:
                    callback()
                except Exception:
                    log.exception("a reconnection callback failed")
            return

    @contextlib.contextmanager
    def _connection(self, pool=None, wait_s: float | None = None):
        from psycopg_pool import PoolTimeout

        pool = pool or self.pool
        wait = wait_s if wait_s is not None else (LOOP_WAIT_S if _on_event_loop() else POOL_WAIT_S)
        try:
            with pool.connection(timeout=wait) as db:
                yield db
        except PoolTimeout:
            raise DatabaseUnavailable(f"every connection to the database stayed busy for {wait:g} s") from None

    def _execute(self, sql: str, params: tuple, fetch: str, durable: bool | None, retry: bool = True):
        text = self._sql(sql)
        for attempt in (1, 2):
            self._check_up()
            try:
                # Once a connection was found closed, a fresh one is waited for only briefly: the
                # database may be away, and then the prober, not every caller, looks for it.
                with self._connection(wait_s=AFTER_LOSS_WAIT_S if attempt == 2 else None) as db:
                    if durable is False:  # its loss in a crash is harmless: no flush of its own
                        with db.transaction():
                            db.execute("SET LOCAL synchronous_commit TO off")
                            return _fetch(db.execute(text, params), fetch)
                    return _fetch(db.execute(text, params), fetch)
            except DatabaseUnavailable as exc:
                if attempt == 2:  # no fresh connection came: the database is away
                    raise self._lost(exc) from exc
                raise
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                if attempt == 2 or not retry:
                    raise self._lost(exc) from exc
                try:  # the others the database dropped with it go too; then once more on a fresh one
                    self.pool.check()
                except Exception:
                    pass

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        self._check_up()
        try:
            with self._connection() as db, db.transaction():
                yield Tx(self, db)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if connection_lost(exc):
                raise self._lost(exc) from exc
            raise

    def _lock_key(self, tx: Tx, key: str) -> None:
        tx.db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    def _sql(self, sql: str) -> str:
        return (sql.replace("?", "%s").replace("{is}", "IS NOT DISTINCT FROM")
                .replace("{skip_locked}", "FOR UPDATE SKIP LOCKED").replace("{files_seq}", "seq")
                .replace("{now}", "EXTRACT(EPOCH FROM clock_timestamp())::float8")
                .replace("{db_started}", "EXTRACT(EPOCH FROM pg_postmaster_start_time())::float8"))

    def update_logs(self, runs: list[tuple]) -> list[str]:
        """One statement for all of them (see Store.update_logs)."""
        if not runs:
            return []
        ids, leases, texts, steps, totals = (list(column) for column in zip(*runs))
        rows = self._all("UPDATE predictions AS p SET logs = v.logs, step = COALESCE(v.step, p.step), "
                         "steps = COALESCE(v.steps, p.steps) "
                         "FROM unnest(?::text[], ?::text[], ?::text[], ?::bigint[], ?::bigint[]) "
                         "AS v(id, lease, logs, step, steps) WHERE p.id = v.id AND p.lease = v.lease "
                         "AND p.status = 'processing' RETURNING p.id", (ids, leases, texts, steps, totals),
                         durable=False)
        return [r["id"] for r in rows]

    def drop_preview(self, prediction_id: str, watchers: bool = True) -> None:
        """One statement for the preview and its watchers (see Store.drop_preview)."""
        if not watchers:
            return super().drop_preview(prediction_id, watchers=False)
        self._run("WITH gone AS (DELETE FROM previews WHERE prediction_id = ?) "
                  "DELETE FROM preview_watchers WHERE prediction_id = ?", (prediction_id, prediction_id), durable=False)

    # -- events between nodes -------------------------------------------------------------------

    def notify(self, payload: str, queue: bool = False) -> None:
        self._run("SELECT pg_notify(?, ?)", (self.QUEUE_CHANNEL if queue else self.CHANNEL, payload))

    def listen(self, on_message, stopping, on_reconnect=None, moves: bool = True, queue: bool = True) -> None:
        """LISTEN on a connection of its own, reconnecting after a lost connection, until ``stopping``
        (a threading.Event) is set. ``on_reconnect()`` is called each time it listens again after
        it lost the connection: what was told meanwhile never arrives, so look again. ``moves`` and
        ``queue``: which channels (a worker node hears only the queue's, an API node only the
        moves: what each node hears does not grow with the other kind's number)."""
        import psycopg

        channels = [c for c, wanted in ((self.CHANNEL, moves), (self.QUEUE_CHANNEL, queue)) if wanted]
        delay, lost = PROBE_S[0], False
        while not stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_S) as db:
                    for channel in channels:
                        db.execute(f"LISTEN {channel}")
                    delay = PROBE_S[0]
                    if lost and on_reconnect is not None:
                        on_reconnect()
                    lost = False
                    while not stopping.is_set():
                        for note in db.notifies(timeout=1.0):
                            on_message(note.payload)
            except psycopg.Error as exc:
                if not lost:
                    log.warning("lost the database's notifications (%s); listening again", str(exc).strip())
                lost = True
                stopping.wait(delay)
                delay = min(delay * 2, PROBE_S[-1])

    # -- files kept in the database (server.blobs: PostgreSQL without --blob-dir) ------------------

    @contextlib.contextmanager
    def _files_connection(self):
        self._check_up()
        try:
            with self._connection(self.blob_pool, BLOB_WAIT_S) as db:
                yield db
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if connection_lost(exc):
                raise self._lost(exc) from exc
            raise

    def put_blob(self, key: str, path: Path, mtime_ns: int) -> None:
        """Keep the file at ``path`` under ``key`` (replacing what was there), in parts of
        BLOB_PART bytes, in one durable transaction on a connection of the files' pool: other
        nodes see it whole or not at all, and the store's own connections are not held while
        megabytes travel."""
        size = path.stat().st_size
        with self._files_connection() as db, db.transaction(), open(path, "rb") as fh:
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
        connection of the files' pool, in one snapshot); nothing if there is none."""
        with self._files_connection() as db, db.transaction(), db.cursor(name="blob_parts") as cursor:
            cursor.itersize = 4
            cursor.execute("SELECT data FROM blobs WHERE key = %s ORDER BY part", (key,))
            for (data,) in cursor:
                yield bytes(data)

    def delete_blobs(self, prefix: str) -> int:
        """Remove every file kept under a key starting with ``prefix``; the number of parts removed."""
        return self._run("DELETE FROM blobs WHERE key LIKE ? AND key >= ? AND key < ?",
                         (_prefix_pattern(prefix), prefix, _prefix_end(prefix)))

    def blobs_present(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are kept."""
        rows = self._all("SELECT key FROM blobs WHERE part = 0 AND key = ANY(?)", (list(keys),))
        return {r["key"] for r in rows}

    def blob_folders(self, prefix: str) -> dict[str, int]:
        """The folders under ``prefix`` (``inputs/``: one per prediction) and when their newest file
        was written (ns)."""
        folders: dict[str, int] = {}
        for row in self._all("SELECT key, mtime_ns FROM blobs WHERE key LIKE ? AND key >= ? AND key < ? AND part = 0",
                             (_prefix_pattern(prefix), prefix, _prefix_end(prefix))):
            name = row["key"][len(prefix):].split("/", 1)[0]
            folders[name] = max(folders.get(name, 0), int(row["mtime_ns"]))
        return folders


def _prefix_pattern(prefix: str) -> str:
    """A LIKE pattern for the keys that start with ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _prefix_end(prefix: str) -> str:
    """The least key past every key that starts with ``prefix`` (in the "C" collation): with it the
    key's index finds a prefix's files whatever plan a prepared statement gets."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


def pool_options(settings: Any) -> dict[str, Any]:
    """The PostgreSQL store's options from the server's settings."""
    return {"pool_size": settings.database_connections}
