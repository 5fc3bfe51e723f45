"""Scale-out figures on the demo model: throughput with 1, 2 and 4 worker processes on one
PostgreSQL database, and what PostgreSQL costs a prediction against SQLite.

    python bench/scale.py --database postgresql://USER:PASS@HOST/postgres [--predictions 40] [--workers 1,2,4]

``--database`` names a server and a role that may create databases (FLUX_FILL_TEST_DATABASE is read
when it is not given); each run gets a fresh database, dropped afterwards.

Throughput: one API node (``serve --no-workers``) and k ``flux-fill worker`` processes share the
database and a blob folder; ``--predictions`` predictions are created at once on the API node and
the time from the first create to the last one ending gives predictions a second, printed with its
ratio to one worker. The demo model runs on the CPU, so k workers share this machine's cores: the
ratios show the queue spreading work and what the cores allow, not what k GPUs would do.

Overhead: one all-in-one server on SQLite, then one on PostgreSQL, each running ``--sequential``
predictions one after another with ``Prefer: wait``; a prediction's overhead is its end-to-end time
less its own ``metrics.predict_time`` (queueing, claims, events, records, the answer). Printed: the
median overhead of each backend and the difference.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from children import die_with_parent  # noqa: E402
from load import CREATE_PATH, ROOT, TERMINAL, _free_port, tiny_input  # noqa: E402


class Fleet:
    """Server processes started by this script; all stopped on exit."""

    def __init__(self, folder: Path, weights: Path):
        self.folder, self.weights, self.procs = folder, weights, []

    def start(self, command: str, *extra: str) -> str:
        port = _free_port()
        data = self.folder / f"node-{len(self.procs)}"
        cmd = [sys.executable, "-m", "server.cli", command, "--port", str(port), "--data-dir", str(data),
               "--weights", str(self.weights), "--log-level", "warning", "--max-queue", "5000", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                stdout=open(data.with_suffix(".log"), "ab"), stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
        self.procs.append(proc)
        return f"http://127.0.0.1:{port}"

    def wait_ready(self, urls: list[str], timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        for url in urls:
            while True:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} did not become ready; see the logs in {self.folder}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).json()["status"] in ("READY", "BUSY"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


class Databases:
    """Fresh databases on one PostgreSQL server, dropped at the end."""

    def __init__(self, admin_url: str):
        import psycopg

        self.psycopg, self.admin, self.made = psycopg, admin_url, []

    def fresh(self) -> str:
        name = f"flux_fill_bench_{secrets.token_hex(4)}"
        with self.psycopg.connect(self.admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return urlunsplit(urlsplit(self.admin)._replace(path=f"/{name}"))

    def drop_all(self) -> None:
        with self.psycopg.connect(self.admin, autocommit=True) as db:
            for name in self.made:
                db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def throughput(fleet: Fleet, database: str, workers: int, predictions: int) -> float:
    """Predictions a second with ``workers`` worker processes behind one API node."""
    blobs = str(fleet.folder / f"blobs-{workers}")
    shared = ("--database", database, "--blob-dir", blobs)
    api = fleet.start("serve", *shared, "--no-workers")
    nodes = [fleet.start("worker", *shared) for _ in range(workers)]
    fleet.wait_ready([api, *nodes])
    body = {"input": tiny_input()}
    with httpx.Client(timeout=60) as client:
        started = time.monotonic()
        ids = [client.post(f"{api}{CREATE_PATH}", json=body).json()["id"] for _ in range(predictions)]
        pending = set(ids)
        while pending:
            pending = {pid for pid in pending if client.get(f"{api}/v1/predictions/{pid}").json()["status"] not in TERMINAL}
            time.sleep(0.05)
        wall = time.monotonic() - started
    fleet.stop()
    return predictions / wall


def overhead(fleet: Fleet, database: str | None, count: int) -> list[float]:
    """Each prediction's end-to-end seconds less its predict_time, on one all-in-one server."""
    url = fleet.start("serve", *(("--database", database) if database else ()))
    fleet.wait_ready([url])
    body = {"input": tiny_input()}
    out = []
    with httpx.Client(timeout=60) as client:
        client.post(f"{url}{CREATE_PATH}", json=body, headers={"Prefer": "wait=30"})  # warm
        for _ in range(count):
            started = time.monotonic()
            p = client.post(f"{url}{CREATE_PATH}", json=body, headers={"Prefer": "wait=30"}).json()
            elapsed = time.monotonic() - started
            if p["status"] != "succeeded":
                raise SystemExit(f"a prediction did not succeed: {p['status']} {p.get('error')}")
            out.append(elapsed - p["metrics"]["predict_time"])
    fleet.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default=os.environ.get("FLUX_FILL_TEST_DATABASE"),
                        help="a PostgreSQL URL whose role may create databases")
    parser.add_argument("--predictions", type=int, default=40, help="predictions per throughput run")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts to compare")
    parser.add_argument("--sequential", type=int, default=20, help="predictions per overhead run")
    args = parser.parse_args()
    if not args.database:
        raise SystemExit("give --database postgresql://... (a role that may create databases)")
    from inference.tiny import ensure_tiny_weights

    databases = Databases(args.database)
    with tempfile.TemporaryDirectory(prefix="flux-fill-scale-") as tmp:
        fleet = Fleet(Path(tmp), ensure_tiny_weights(Path(tmp) / "tiny"))
        try:
            counts = [int(k) for k in args.workers.split(",")]
            rates = {k: throughput(fleet, databases.fresh(), k, args.predictions) for k in counts}
            sqlite = overhead(fleet, None, args.sequential)
            postgres = overhead(fleet, databases.fresh(), args.sequential)
        finally:
            fleet.stop()
            databases.drop_all()
    base = rates[counts[0]]
    print(f"throughput, {args.predictions} predictions of the demo model (CPU, {os.cpu_count()} cores), one API node:")
    for k, rate in rates.items():
        print(f"  {k} worker process(es)   {rate:6.2f} predictions/s   x{rate / base:.2f} of {counts[0]}")
    s, p = statistics.median(sqlite), statistics.median(postgres)
    print(f"overhead per prediction (end-to-end less predict_time, median of {args.sequential}):")
    print(f"  SQLite       {s * 1000:7.1f} ms")
    print(f"  PostgreSQL   {p * 1000:7.1f} ms   ({(p - s) * 1000:+.1f} ms, x{p / s:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
