"""The control plane at fleet scale: one PostgreSQL, 1-4 API nodes and up to a thousand simulated
GPUs, under a steady load of creates, with what each prediction costs every process printed.

    python bench/fleet.py [--configs 1x8,1x100,2x400,4x1000] [--seconds 60] [--delay 3] [--big 100000,1000000]

Everything runs on this machine: a private PostgreSQL cluster (initdb on a free port, removed at the
end; PostgreSQL's server programs must be installed), ``flux-fill serve --no-workers`` API nodes,
``flux-fill worker --weights null`` processes, each running up to ``--gpus-per-worker`` simulated
GPUs (one worker thread and one lease each; a prediction takes ``--delay`` seconds, as FLUX.1 Fill
[dev] takes about 3 s on an H100), a load process and a webhook receiver.

A configuration ``AxG`` is A API nodes and G simulated GPUs. The load process creates predictions at
a steady rate (``--load`` of what the GPUs can run, G / delay a second; ``--rate`` fixes it), spread
over the API nodes, for ``--seconds``: each with a webhook (``completed``) to the receiver, a share
``--wait-share`` with ``Prefer: wait``, a share ``--cancel-share`` canceled within the delay. Inputs
name their picture by URL (as most clients do), so no input file is written; each output, a small
PNG, is kept in the database as files are by default. Then the queue is drained and checked: every
create answered 201 ended, none ran twice (``attempts``), each completed webhook arrived once.

Printed per configuration: predictions a second sustained (completed in the window, the first
``--delay`` left out), create latency (answered 201; the waiting ones apart), claim latency (created
to started, read from the records), webhook latency (completed to received), CPU milliseconds per
prediction of each kind of process (API nodes, workers: their control path and the webhooks they
send, PostgreSQL, the webhook receiver, the load), PostgreSQL's transactions, rows written and WAL
bytes per prediction, its connections, and the busiest process kind with how busy it was (where it
saturates).

Then, with ``--big``, the same database is filled with that many finished predictions (10^5, then
10^6) and a short run measures what must not grow with the table: claim latency, a list page, a
retention sweep and /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.children import die_with_parent  # noqa: E402
CREATE_PATH = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
TERMINAL = ("succeeded", "failed", "canceled")
TICK = os.sysconf("SC_CLK_TCK")
INPUT = {"prompt": "a red door", "image": "https://example.com/house.png", "mask": "https://example.com/mask.png",
         "output_format": "png"}


# -- a small HTTP/1.1 client and server on asyncio (the load must cost less than what it measures) --

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, body


class Client:
    """Kept-alive connections to the API nodes, as many as requests in flight."""

    def __init__(self, hosts: list[tuple[str, int]]):
        self.hosts = hosts
        self.idle: dict[tuple[str, int], list] = {h: [] for h in hosts}
        self.turn = 0

    def next_host(self) -> tuple[str, int]:
        self.turn += 1
        return self.hosts[self.turn % len(self.hosts)]

    async def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None,
                      host: tuple[str, int] | None = None) -> tuple[int, bytes]:
        host = host or self.next_host()
        data = json.dumps(body).encode() if body is not None else b""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        raw = (f"{method} {path} HTTP/1.1\r\nhost: {host[0]}:{host[1]}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(data)}\r\n{extra}\r\n").encode() + data
        for attempt in (1, 2):
            pool = self.idle[host]
            # A kept-alive connection the server closed meanwhile fails at once: the retry opens a
            # fresh one.
            conn = pool.pop() if pool and attempt == 1 else await asyncio.open_connection(*host)
            try:
                conn[1].write(raw)
                status, payload = await _read_response(conn[0])
            except (ConnectionError, asyncio.IncompleteReadError):
                conn[1].close()
                if attempt == 2:
                    raise
                continue
            pool.append(conn)
            return status, payload
        raise RuntimeError("unreachable")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


# -- the load process -----------------------------------------------------------------------

async def _load(spec: dict) -> dict:
    hosts = [tuple(h) for h in spec["hosts"]]
    client = Client(hosts)
    rate, seconds = spec["rate"], spec["seconds"]
    webhook = spec["webhook"]
    rng = random.Random(7)
    created: list[dict] = []
    errors: dict[str, int] = {}
    lags: list[float] = []
    tasks = set()
    sem = asyncio.Semaphore(spec.get("in_flight", 400))

    async def one(i: int) -> None:
        async with sem:
            wait = rng.random() < spec["wait_share"]
            cancel = not wait and rng.random() < spec["cancel_share"]
            body = {"input": dict(INPUT, seed=i)}
            if rng.random() < spec["webhook_share"]:
                body.update(webhook=webhook, webhook_events_filter=["completed"])
            headers = {"Prefer": "wait=60"} if wait else None
            started = time.monotonic()
            try:
                status, payload = await client.request("POST", CREATE_PATH, body, headers)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            took = time.monotonic() - started
            if status != 201:
                key = f"HTTP {status}"
                errors[key] = errors.get(key, 0) + 1
                return
            pid = json.loads(payload)["id"]
            created.append({"id": pid, "latency": took, "wait": wait, "cancel": cancel, "hook": "webhook" in body})
        if cancel:
            await asyncio.sleep(rng.random() * spec["delay"])
            try:
                await client.request("POST", f"/v1/predictions/{pid}/cancel")
            except Exception as exc:
                errors["cancel " + type(exc).__name__] = errors.get("cancel " + type(exc).__name__, 0) + 1

    t0 = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        due = t0 + i / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            lags.append(now - due)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_s = time.monotonic() - t0
    while tasks:
        await asyncio.sleep(0.05)
    return {"created": created, "errors": errors, "sent_s": sent_s, "offered": n,
            "max_lag_s": max(lags) if lags else 0.0}


def load_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_load(spec))
    Path(out_path).write_text(json.dumps(result))


# -- the webhook receiver -------------------------------------------------------------------

def receiver_main(port: int, out_path: str) -> None:
    records: list = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                at = time.time()
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                try:
                    p = json.loads(body)
                    records.append((at, headers.get("webhook-id"), p.get("id"), p.get("status"), p.get("completed_at")))
                except ValueError:
                    records.append((at, headers.get("webhook-id"), None, None, None))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await stop.wait()
        Path(out_path).write_text(json.dumps(records))

    asyncio.run(serve())


# -- processes and their CPU ------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A private PostgreSQL cluster (initdb) on a free port, stopped and removed at the end."""

    def __init__(self, folder: Path):
        from tests.server.postgres_cluster import _bindir

        self.bin = _bindir()
        if self.bin is None:
            raise SystemExit("needs PostgreSQL's server programs (initdb, pg_ctl)")
        self.port = free_port()
        self.data = folder / "pg"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            import shutil

            shutil.chown(folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "flux_fill", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{folder}'\n"
                       "max_connections = 400\nshared_buffers = 256MB\nmax_wal_size = 4GB\n"
                       "track_io_timing = on\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(folder / "pg.log"), "-w", "-t", "60", "start")
        self.admin = f"postgresql://flux_fill@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def pids(self) -> list[int]:
        pm = self.postmaster()
        return [pm, *children_of(pm)]

    def fresh(self) -> str:
        import psycopg

        name = f"fleet_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return urlunsplit(urlsplit(self.admin)._replace(path=f"/{name}"))

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        except Exception:
            pass


class Nodes:
    """Server processes of one configuration; all stopped at the end."""

    def __init__(self, folder: Path, database: str):
        self.folder, self.database = folder, database
        self.api: list[tuple[subprocess.Popen, int]] = []
        self.workers: list[tuple[subprocess.Popen, int]] = []

    def _start(self, command: str, *extra: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        data = self.folder / f"{command}-{len(self.api) + len(self.workers)}-{port}"
        cmd = [sys.executable, "-m", "server.cli", command, "--port", str(port), "--data-dir", str(data),
               "--database", self.database, "--log-level", "warning", "--max-queue", "100000", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(f"{data}.log", "ab"), stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
        return proc, port

    def start(self, api: int, gpus: int, per_worker: int, delay: float, connections: int) -> None:
        for _ in range(api):
            self.api.append(self._start("serve", "--no-workers", "--weights", "null",
                                        "--database-connections", str(connections)))
        processes = max(1, math.ceil(gpus / per_worker))
        for k in range(processes):
            share = gpus // processes + (1 if k < gpus % processes else 0)
            self.workers.append(self._start("worker", "--weights", "null", "--null-delay-s", str(delay),
                                            "--simulated-gpus", str(share), "--database-connections", str(connections)))
        import httpx

        deadline = time.monotonic() + 120
        for proc, port in self.api + self.workers:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"a node did not start; see the logs in {self.folder}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] in ("READY", "BUSY"):
                        break
                except Exception:
                    pass
                time.sleep(0.2)

    def stop(self) -> None:
        procs = [p for p, _ in self.api + self.workers]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- one configuration ------------------------------------------------------------------------

def db_counters(db, name: str) -> dict:
    row = db.execute("SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted, "
                     "tup_returned + tup_fetched, pg_current_wal_lsn() - '0/0'::pg_lsn, blks_read "
                     "FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
    wal = db.execute("SELECT wal_write, wal_sync FROM pg_stat_wal").fetchone()
    return {"xacts": row[0], "written": row[1], "read": row[2], "wal": int(row[3]), "blks_read": row[4],
            "wal_writes": wal[0], "wal_syncs": wal[1]}


def run_config(args, cluster: Cluster, folder: Path, api: int, gpus: int, database: str | None = None,
               seconds: float | None = None, rate: float | None = None) -> dict:
    import psycopg

    database = database or cluster.fresh()
    name = urlsplit(database).path.lstrip("/")
    seconds = seconds or args.seconds
    rate = rate or args.rate or args.load * gpus / args.delay
    nodes = Nodes(folder, database)
    recv_port = free_port()
    recv_out = folder / f"webhooks-{recv_port}.json"
    receiver = subprocess.Popen([sys.executable, __file__, "--receiver", str(recv_port), str(recv_out)], cwd=ROOT,
                                preexec_fn=die_with_parent)
    result: dict = {"api": api, "gpus": gpus, "offered": rate, "seconds": seconds}
    try:
        nodes.start(api, gpus, args.gpus_per_worker, args.delay, args.connections)
        time.sleep(1.0)
        spec = {"hosts": [("127.0.0.1", port) for _, port in nodes.api], "rate": rate, "seconds": seconds,
                "webhook": f"http://127.0.0.1:{recv_port}/hook", "wait_share": args.wait_share,
                "cancel_share": args.cancel_share, "delay": args.delay, "webhook_share": args.webhook_share}
        spec_path, load_out = folder / f"load-{recv_port}.json", folder / f"load-out-{recv_port}.json"
        spec_path.write_text(json.dumps(spec))
        db = psycopg.connect(database, autocommit=True)
        kinds = {"api": [p.pid for p, _ in nodes.api], "worker": [p.pid for p, _ in nodes.workers],
                 "receiver": [receiver.pid]}
        pg_before = {pid: cpu_s(pid) for pid in cluster.pids()}
        before = {kind: sum(cpu_s(pid) for pid in pids) for kind, pids in kinds.items()}
        counters0, busy0 = db_counters(db, name), machine_busy()
        t0 = time.time()
        load = subprocess.Popen([sys.executable, __file__, "--load", str(spec_path), str(load_out)], cwd=ROOT,
                                preexec_fn=die_with_parent)
        kinds["load"] = [load.pid]
        samples, stop_sampling = [], threading.Event()

        def sample() -> None:
            with psycopg.connect(database, autocommit=True) as probe:
                while not stop_sampling.wait(1.0):
                    row = probe.execute("SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = %s), "
                                        "(SELECT count(*) FROM predictions WHERE status = 'starting'), "
                                        "(SELECT count(*) FROM predictions WHERE status = 'processing')",
                                        (name,)).fetchone()
                    samples.append(row)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load_cpu = 0.0
        while load.poll() is None:
            load_cpu = cpu_s(load.pid) or load_cpu
            time.sleep(0.2)
        load_s = time.time() - t0
        out = json.loads(load_out.read_text())
        ids = [c["id"] for c in out["created"]]
        # Drain: every created prediction ends, and its webhook arrives; given up only when the
        # queue stops moving for a while (or after --drain-s), then what is left is "unfinished".
        last_left, moved_at, drain_start = None, time.monotonic(), time.monotonic()
        while time.monotonic() - drain_start < args.drain_s:
            left = db.execute("SELECT count(*) FROM predictions WHERE status IN ('starting', 'processing')").fetchone()[0]
            if left == 0:
                break
            if left != last_left:
                last_left, moved_at = left, time.monotonic()
            elif time.monotonic() - moved_at > args.delay * 3 + 30:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the last webhooks
        stop_sampling.set()
        sampler.join()
        drained_s = time.time() - t0
        after = {kind: sum(cpu_s(pid) for pid in pids) for kind, pids in kinds.items() if kind != "load"}
        pg_after = {pid: cpu_s(pid) for pid in cluster.pids()}
        counters1, busy1 = db_counters(db, name), machine_busy()
        scans = db.execute("SELECT relname, seq_scan, seq_tup_read, idx_scan, idx_tup_fetch, n_tup_hot_upd, n_tup_upd "
                           "FROM pg_stat_user_tables ORDER BY seq_tup_read DESC LIMIT 4").fetchall()
        rows = db.execute("SELECT id, status, attempts, created_at, started_at, completed_at FROM predictions "
                          "WHERE id = ANY(%s)", (ids,)).fetchall()
        db.close()
    finally:
        nodes.stop()
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(30)
    hooks = json.loads(recv_out.read_text()) if recv_out.exists() else []
    n = len(ids)
    by_id = {r[0]: r for r in rows}
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[1]] = statuses.get(r[1], 0) + 1
    missing = n - len(rows)  # answered 201 and not in the table: lost
    unfinished = sum(1 for r in rows if r[1] not in TERMINAL)
    twice = sum(1 for r in rows if r[2] > 1)
    received: dict[str, int] = {}
    delivery = []
    for at, msg, pid, status, completed_at in hooks:
        received[pid] = received.get(pid, 0) + 1
        row = by_id.get(pid)
        if row is not None and row[5] is not None and received[pid] == 1:
            delivery.append(at - row[5])
    hooked = {c["id"] for c in out["created"] if c.get("hook", True)}
    missing_hooks = sum(1 for r in rows if r[0] in hooked and r[1] in TERMINAL and received.get(r[0], 0) == 0)
    duplicate_hooks = sum(1 for c in received.values() if c > 1)
    window = (t0 + args.delay, t0 + load_s)
    done_in_window = sum(1 for r in rows if r[5] is not None and window[0] <= r[5] < window[1])
    cpu = {kind: (after[kind] - before[kind]) for kind in after}
    cpu["load"] = load_cpu
    cpu["postgres"] = sum(v - pg_before.get(pid, 0.0) for pid, v in pg_after.items())
    elapsed = drained_s
    result.update(
        created=n, errors=out["errors"], statuses=statuses, lost=missing, unfinished=unfinished, twice=twice,
        missing_hooks=missing_hooks, duplicate_hooks=duplicate_hooks, max_lag_s=out["max_lag_s"],
        rate=done_in_window / max(1e-9, window[1] - window[0]),
        create=[c["latency"] for c in out["created"] if not c["wait"]],
        wait=[c["latency"] for c in out["created"] if c["wait"]],
        claim=[r[4] - r[3] for r in rows if r[4] is not None],
        webhook=delivery,
        cpu_ms={k: 1000 * v / max(1, n) for k, v in cpu.items()},
        busy={k: v / elapsed for k, v in cpu.items()},
        machine=(busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        db={k: (counters1[k] - counters0[k]) / max(1, n) for k in counters0},
        db_rate={k: (counters1[k] - counters0[k]) / elapsed for k in counters0},
        connections=max((s[0] for s in samples), default=0),
        queued_max=max((s[1] for s in samples), default=0),
        running_max=max((s[2] for s in samples), default=0),
        processes={"api": api, "worker": len(kinds["worker"])},
        scans=[(t, a, b, c, d, h, u) for t, a, b, c, d, h, u in scans],
    )
    return result


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:7.1f}" if values else "      -"


def print_result(r: dict) -> None:
    print(f"\n== {r['api']} API node(s), {r['gpus']} simulated GPUs in {r['processes']['worker']} worker process(es), "
          f"offered {r['offered']:.1f}/s for {r['seconds']:.0f} s ==")
    print(f"  sustained             {r['rate']:8.1f} predictions/s   (created {r['created']}: {r['statuses']}; "
          f"errors {r['errors'] or 'none'})")
    print(f"  lost / ran twice      {r['lost']} / {r['twice']};  webhooks missing {r['missing_hooks']}, "
          f"duplicated {r['duplicate_hooks']}" + (f"; UNFINISHED when the drain stopped: {r['unfinished']}"
                                                  if r["unfinished"] else ""))
    print("  latency ms            p50     p99")
    print(f"    create           {ms(r['create'], .5)} {ms(r['create'], .99)}")
    print(f"    create, wait     {ms(r['wait'], .5)} {ms(r['wait'], .99)}   (includes the run)")
    print(f"    claim            {ms(r['claim'], .5)} {ms(r['claim'], .99)}   (created -> started)")
    print(f"    webhook          {ms(r['webhook'], .5)} {ms(r['webhook'], .99)}   (completed -> received)")
    print("  CPU ms / prediction   " + "  ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms"].items()))
    print("  busy (cores)          " + "  ".join(f"{k} {v:.2f}" for k, v in r["busy"].items())
          + f"   machine {r['machine'] * 100:.0f}% of {os.cpu_count()} cores")
    d = r["db"]
    print(f"  PostgreSQL / pred.    {d['xacts']:.1f} transactions, {d['written']:.1f} rows written, "
          f"{d['read']:.0f} rows read, {d['wal'] / 1024:.1f} KiB WAL, {d['wal_syncs']:.2f} WAL flushes")
    print(f"  PostgreSQL / s        {r['db_rate']['xacts']:.0f} transactions, {r['db_rate']['wal'] / 1048576:.2f} MiB WAL, "
          f"{r['db_rate']['wal_syncs']:.0f} WAL flushes; "
          f"connections {r['connections']}; queue max {r['queued_max']}, running max {r['running_max']}")
    print("  tables (whole run)    " + "; ".join(f"{t}: {a} seq scans ({b} rows), {c} index scans, {u} updates "
                                                  f"({h} HOT)" for t, a, b, c, d, h, u in r["scans"][:3]))
    busiest = max(r["busy"].items(), key=lambda kv: kv[1])
    per_process = {"api": busiest[1] / max(1, r["processes"]["api"]),
                   "worker": busiest[1] / max(1, r["processes"]["worker"])}.get(busiest[0], busiest[1])
    saturated = r["rate"] < 0.9 * r["offered"] or r["max_lag_s"] > 1.0
    print(f"  busiest               {busiest[0]} at {busiest[1]:.2f} cores ({per_process:.2f} a process); "
          + (f"SATURATED: {r['rate']:.0f}/s of {r['offered']:.0f}/s offered, the load lagged {r['max_lag_s']:.1f} s"
             if saturated else "keeps up"))


# -- a big table -----------------------------------------------------------------------------

def fill(database: str, count: int) -> float:
    """Add ``count`` finished predictions (an hour old, within retention) to the table."""
    import psycopg

    started = time.monotonic()
    with psycopg.connect(database, autocommit=True) as db:
        done = 0
        while done < count:
            batch = min(200_000, count - done)
            db.execute(
                "INSERT INTO predictions (id, status, version, input, logs, output, created_at, started_at, "
                "completed_at, predict_time, output_token, attempts, input_blobs, output_bytes, output_run) "
                "SELECT 'old' || md5(random()::text || g::text), 'succeeded', 'dev', "
                "'{\"prompt\": \"a red door\", \"image\": \"https://example.com/house.png\"}', "
                "'Using seed: 1\n100%%|##########| 28/28\n', '[\"out-0.png\"]', "
                "extract(epoch from now()) - 3600 - g * 0.001, extract(epoch from now()) - 3600 - g * 0.001 + 0.1, "
                "extract(epoch from now()) - 3600 - g * 0.001 + 3.1, 3.0, md5(g::text), 1, '[]', 120, 'r' "
                "FROM generate_series(1, %s) g", (batch,))
            done += batch
        db.execute("VACUUM ANALYZE predictions")
    return time.monotonic() - started


def probe_big(args, cluster: Cluster, folder: Path, database: str, rows: int) -> dict:
    """A short run on the filled database, then a list page, a retention sweep and /metrics."""
    import httpx

    from server.postgres import PostgresStore

    r = run_config(args, cluster, folder, 1, args.big_gpus, database=database, seconds=args.big_seconds,
                   rate=args.big_rate)
    nodes = Nodes(folder, database)
    try:
        nodes.start(1, 1, 1, args.delay, args.connections)
        port = nodes.api[0][1]
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                client.get(f"http://127.0.0.1:{port}/v1/predictions")
            pages, metrics = [], []
            for _ in range(30):
                t = time.monotonic()
                assert client.get(f"http://127.0.0.1:{port}/v1/predictions").status_code == 200
                pages.append(time.monotonic() - t)
            for _ in range(5):
                t = time.monotonic()
                client.get(f"http://127.0.0.1:{port}/metrics")
                metrics.append(time.monotonic() - t)
    finally:
        nodes.stop()
    import psycopg

    claims = []  # the claim's statement alone, on an empty queue, in a transaction rolled back
    with psycopg.connect(database) as db:
        for _ in range(200):
            t = time.monotonic()
            db.execute("SELECT seq FROM predictions WHERE status = 'starting' AND (cancel_at IS NULL OR cancel_at > "
                       "extract(epoch from clock_timestamp())) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED").fetchall()
            claims.append(time.monotonic() - t)
            db.rollback()
    store = PostgresStore(database, pool_size=2)
    try:
        sweeps = []
        for _ in range(10):
            t = time.monotonic()
            store.expired_predictions(store.now() - 24 * 3600)
            sweeps.append(time.monotonic() - t)
    finally:
        store.close()
    r.update(rows=rows, page=pages, metrics=metrics, sweep=sweeps, claim_sql=claims)
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1x8,1x100,2x400,4x1000",
                        help="configurations: API nodes x simulated GPUs, comma-separated; "
                             "AxG@R offers R creates a second instead of --load's")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each configuration is loaded")
    parser.add_argument("--delay", type=float, default=3.0, help="seconds a prediction takes on a GPU")
    parser.add_argument("--load", type=float, default=0.97, help="offered creates as a share of the GPUs' capacity")
    parser.add_argument("--rate", type=float, default=None, help="offered creates a second (instead of --load)")
    parser.add_argument("--gpus-per-worker", type=int, default=250, help="simulated GPUs per worker process")
    parser.add_argument("--connections", type=int, default=10, help="--database-connections of every node")
    parser.add_argument("--wait-share", type=float, default=0.05, help="creates with Prefer: wait")
    parser.add_argument("--cancel-share", type=float, default=0.02, help="creates canceled while they run")
    parser.add_argument("--webhook-share", type=float, default=1.0,
                        help="creates with a webhook (0 and 1 compared give the webhook sender's cost)")
    parser.add_argument("--drain-s", type=float, default=600.0, help="the longest wait for the queue to drain")
    parser.add_argument("--big", default="", help="finished predictions in the table for the big-table runs, "
                                                  "e.g. 100000,1000000 (an empty run is measured first)")
    parser.add_argument("--big-gpus", type=int, default=100, help="simulated GPUs of the big-table runs")
    parser.add_argument("--big-rate", type=float, default=30.0, help="creates a second of the big-table runs")
    parser.add_argument("--big-seconds", type=float, default=20.0, help="length of each big-table run")
    parser.add_argument("--receiver", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--load-spec", nargs=2, dest="load_spec", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    if argv[:1] == ["--load"] and len(argv) == 3:
        load_main(argv[1], argv[2])
        return 0
    args = parser.parse_args()
    if args.receiver:
        receiver_main(int(args.receiver[0]), args.receiver[1])
        return 0
    print(f"machine: {os.cpu_count()} cores, {os.uname().machine}, "
          f"{Path('/proc/cpuinfo').read_text().split('model name')[1].split(':', 1)[1].splitlines()[0].strip()}; "
          f"everything below (PostgreSQL, nodes, load, receiver) shares it")
    with tempfile.TemporaryDirectory(prefix="flux-fill-fleet-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o777)
        cluster = Cluster(folder)
        try:
            for config in [c for c in args.configs.split(",") if c]:
                shape, _, rate = config.partition("@")
                api, gpus = (int(x) for x in shape.lower().split("x"))
                print_result(run_config(args, cluster, folder, api, gpus, rate=float(rate) if rate else None))
                sys.stdout.flush()
            if args.big:
                database = cluster.fresh()
                table = []
                have = 0
                for target in [0, *(int(x) for x in args.big.split(","))]:
                    if target > have:
                        took = fill(database, target - have)
                        print(f"\n(filled {target - have} finished predictions in {took:.0f} s)")
                        have = target
                    r = probe_big(args, cluster, folder, database, target)
                    table.append(r)
                    print(f"  {target:>9} rows: claim p50 {ms(r['claim'], .5)} p99 {ms(r['claim'], .99)} ms; "
                          f"list page p50 {ms(r['page'], .5)} p99 {ms(r['page'], .99)} ms; "
                          f"claim statement {ms(r['claim_sql'], .5)} ms; sweep {ms(r['sweep'], .5)} ms; /metrics {ms(r['metrics'], .5)} ms; "
                          f"create p50 {ms(r['create'], .5)} ms; {r['rate']:.1f}/s; lost {r['lost']}, twice {r['twice']}, "
                          f"unfinished {r['unfinished']}")
                    sys.stdout.flush()
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
