"""Load on loopback: hundreds of concurrent creates and polls; every prediction accounted for.

    python bench/load.py [--url http://127.0.0.1:5000] [--token T] [--total 300] [--concurrency 50]

Without --url it starts `flux-fill serve` on the tiny demo model with --max-queue (default 100) in
a temporary folder, and stops it afterwards. Each of `total` clients (at most `concurrency` at once)
creates a prediction with a tiny input (1 step) and, when it is accepted, polls it a few times. A
create is either accepted (201) or refused because the queue is full (429); then every accepted
prediction is polled until it is terminal and looked for in the paged list. Prints requests tried,
5xx and transport errors seen, created/refused/succeeded counts and p50/p99 latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CREATE_PATH = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
TERMINAL = ("succeeded", "failed", "canceled")


def tiny_input(side: int = 16) -> dict:
    """The cheapest real prediction: a small noise picture, one step, at its own size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return {"prompt": "load", "image": image, "mask": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            "num_inference_steps": 1, "megapixels": "match_input", "output_format": "png"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class LoadReport:
    tried: int = 0  # every HTTP request sent
    server_errors: int = 0  # answers >= 500
    transport_errors: list[str] = field(default_factory=list)  # no answer at all
    create_statuses: collections.Counter = field(default_factory=collections.Counter)
    final_statuses: collections.Counter = field(default_factory=collections.Counter)
    accepted: list[str] = field(default_factory=list)
    refused_without_retry_after: int = 0
    stuck: list[str] = field(default_factory=list)  # accepted, not terminal by the deadline
    missing_from_list: list[str] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    get_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    drain_s: float = 0.0

    @property
    def created(self) -> int:
        return self.create_statuses[201]

    @property
    def refused(self) -> int:
        return self.create_statuses[429]

    def lines(self) -> list[str]:
        return [
            f"requests tried        {self.tried}",
            f"5xx answers           {self.server_errors}",
            f"transport errors      {len(self.transport_errors)}",
            f"creates               {sum(self.create_statuses.values())}: created {self.created}, refused (429) {self.refused}, "
            f"other {sum(v for k, v in self.create_statuses.items() if k not in (201, 429))}",
            f"accepted, finally     {dict(self.final_statuses)}; stuck {len(self.stuck)}; missing from list {len(self.missing_from_list)}",
            f"create latency        p50 {percentile(self.create_ms, 50):.1f} ms, p99 {percentile(self.create_ms, 99):.1f} ms",
            f"get latency           p50 {percentile(self.get_ms, 50):.1f} ms, p99 {percentile(self.get_ms, 99):.1f} ms",
            f"wall                  {self.wall_s:.1f} s (creates and polls), {self.drain_s:.1f} s more until the queue drained",
        ]


async def run_load(url: str, *, total: int = 300, concurrency: int = 50, polls: int = 2, token: str | None = None,
                   drain_timeout_s: float = 120.0, request_timeout_s: float = 30.0) -> LoadReport:
    """Run the load against a live server at ``url``; every loop is bounded in count and time."""
    report = LoadReport()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"input": tiny_input()}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=request_timeout_s, limits=limits) as client:

        async def send(method: str, path: str, latencies: list[float] | None = None, **kw) -> httpx.Response | None:
            report.tried += 1
            t = time.perf_counter()
            try:
                resp = await client.request(method, path, **kw)
            except httpx.HTTPError as exc:
                report.transport_errors.append(f"{method} {path}: {type(exc).__name__}")
                return None
            if latencies is not None:
                latencies.append((time.perf_counter() - t) * 1000)
            if resp.status_code >= 500:
                report.server_errors += 1
            return resp

        async def one_client() -> None:
            async with gate:
                resp = await send("POST", CREATE_PATH, report.create_ms, json=body)
                if resp is None:
                    return
                report.create_statuses[resp.status_code] += 1
                if resp.status_code == 429 and not resp.headers.get("retry-after", "").isdigit():
                    report.refused_without_retry_after += 1
                if resp.status_code != 201:
                    return
                pid = resp.json()["id"]
                report.accepted.append(pid)
                for _ in range(polls):
                    await send("GET", f"/v1/predictions/{pid}", report.get_ms)
                    await asyncio.sleep(0.05)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(total)))
        report.wall_s = time.perf_counter() - started

        # Every accepted prediction must end. The queue runs in order, so wait on the newest one
        # (light polling leaves the CPU to the worker), then check them all; bounded by a deadline.
        final: dict[str, str] = {}
        pending = list(report.accepted)
        deadline = time.monotonic() + drain_timeout_s

        async def status_of(pid: str) -> None:
            async with gate:
                resp = await send("GET", f"/v1/predictions/{pid}", report.get_ms)
                if resp is not None and resp.status_code == 200:
                    final[pid] = resp.json()["status"]

        while pending and time.monotonic() < deadline:
            await status_of(pending[-1])
            if final.get(pending[-1]) in TERMINAL:
                await asyncio.gather(*(status_of(pid) for pid in pending[:-1]))
            pending = [pid for pid in pending if final.get(pid) not in TERMINAL]
            if pending:
                await asyncio.sleep(0.5)
        report.drain_s = time.perf_counter() - started - report.wall_s
        report.stuck = pending
        report.final_statuses = collections.Counter(final.get(pid, "unknown") for pid in report.accepted)

        # Every accepted prediction must appear in the list (paged by `next`, bounded).
        listed: set[str] = set()
        next_url: str | None = "/v1/predictions"
        for _ in range(total // 100 + 50):
            if not next_url:
                break
            resp = await send("GET", next_url)
            if resp is None or resp.status_code != 200:
                break
            page = resp.json()
            listed.update(p["id"] for p in page["results"])
            next_url = page["next"]
        report.missing_from_list = [pid for pid in report.accepted if pid not in listed]
    return report


# -- a server of its own, when no --url is given -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, max_queue: int, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from inference.tiny import ensure_tiny_weights

    weights = ensure_tiny_weights(folder / "tiny")
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(folder / "data"),
           "--weights", str(weights), "--max-queue", str(max_queue), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=open(folder / "server.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {folder / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["status"] in ("READY", "BUSY"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; default: start one on the tiny model")
    parser.add_argument("--token")
    parser.add_argument("--total", type=int, default=300, help="clients, each creating one prediction")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--polls", type=int, default=2, help="GETs per accepted prediction while the load runs")
    parser.add_argument("--max-queue", type=int, default=100, help="for the server this script starts")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="flux-fill-load-") as tmp:
        url = args.url
        if not url:
            proc, url = start_server(Path(tmp), args.max_queue)
        try:
            report = asyncio.run(run_load(url, total=args.total, concurrency=args.concurrency, polls=args.polls,
                                          token=args.token))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print(f"load on {url}: {args.total} clients, {args.concurrency} at once")
    print("\n".join(report.lines()))
    ok = (not report.server_errors and not report.transport_errors and not report.stuck
          and not report.missing_from_list and report.final_statuses.get("succeeded", 0) == report.created)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
