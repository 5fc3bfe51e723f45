"""Load on loopback: hundreds of concurrent creates and polls; every prediction accounted for.

    python bench/load.py [--url http://127.0.0.1:5000] [--token T ...] [--total 300] [--concurrency 50] [--hostile]

Without --url it starts `flux-fill serve` on the tiny demo model with --max-queue (default 100) in
a temporary folder, and stops it afterwards. Each of `total` clients (at most `concurrency` at once)
creates a prediction with a tiny input (1 step) and, when it is accepted, polls it a few times. A
create is either accepted (201) or refused because the queue is full (429); then every accepted
prediction is polled until it is terminal and looked for in the paged list. With two or more
tokens the clients take turns with them (each prediction is read with its own token).

`--hostile` adds, for the whole run, clients that a public server meets: bodies sent a byte at a
time, connections that send half a request's headers and stop (each reconnects when the server
cuts it off), predictions whose picture URL drips a byte at a time (served by this script), and
predictions carrying a 15 MB data: URI that is no picture. Its own server then has two tokens and
short fetch, header and body time limits. Meanwhile /health is asked every 0.2 s.

Prints requests tried, 5xx and transport errors seen, created/refused/succeeded counts, the
predictions lost (accepted, then never terminal or missing from the list), p50/p99 latencies, and
the /health latencies (the worst among them, and how many took over a second).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
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


# The server this script starts for the hostile mix: the limits hostile clients run into, short
# enough to be met several times in one run.
HOSTILE_SERVER_FLAGS = ("--fetch-timeout-s", "3", "--header-timeout-s", "2", "--body-timeout-s", "3")


@dataclass
class Hostile:
    """The hostile clients that run beside the load (each kind at once, for the whole run)."""

    slow_bodies: int = 20  # connections sending a create's body a byte every 0.5 s
    half_headers: int = 100  # connections sending half a request's headers, then nothing
    drip_urls: int = 4  # predictions whose picture drips in a byte every 0.2 s
    huge_data_uris: int = 4  # predictions with a 15 MB data: URI that is no picture


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
    health_ms: list[float] = field(default_factory=list)  # /health, asked every 0.2 s for the whole run
    health_failures: int = 0  # /health not answered 200
    hostile: collections.Counter = field(default_factory=collections.Counter)  # what the hostile clients got
    hostile_accepted: list[str] = field(default_factory=list)
    hostile_final: collections.Counter = field(default_factory=collections.Counter)

    @property
    def created(self) -> int:
        return self.create_statuses[201]

    @property
    def refused(self) -> int:
        return self.create_statuses[429]

    @property
    def lost(self) -> int:
        """Accepted predictions that never ended or are missing from the list."""
        return len(self.stuck) + len(self.missing_from_list)

    @property
    def ok(self) -> bool:
        """No 5xx, no request without an answer, nothing lost, every load prediction succeeded and
        /health answered within a second every time."""
        return (not self.server_errors and not self.transport_errors and not self.lost and not self.health_failures
                and not self.health_slow and self.final_statuses.get("succeeded", 0) == self.created)

    @property
    def health_slow(self) -> int:
        return sum(ms > 1000 for ms in self.health_ms)

    def lines(self) -> list[str]:
        hostile = []
        if self.hostile or self.hostile_accepted:
            hostile = [
                f"hostile clients       {dict(sorted(self.hostile.items()))}",
                f"hostile predictions   {len(self.hostile_accepted)} accepted, finally {dict(self.hostile_final)}",
            ]
        return hostile + [
            f"requests tried        {self.tried}",
            f"5xx answers           {self.server_errors}",
            f"transport errors      {len(self.transport_errors)}",
            f"creates               {sum(self.create_statuses.values())}: created {self.created}, refused (429) {self.refused}, "
            f"other {sum(v for k, v in self.create_statuses.items() if k not in (201, 429))}",
            f"accepted, finally     {dict(self.final_statuses)}; stuck {len(self.stuck)}; missing from list {len(self.missing_from_list)}",
            f"create latency        p50 {percentile(self.create_ms, 50):.1f} ms, p99 {percentile(self.create_ms, 99):.1f} ms",
            f"get latency           p50 {percentile(self.get_ms, 50):.1f} ms, p99 {percentile(self.get_ms, 99):.1f} ms",
            f"wall                  {self.wall_s:.1f} s (creates and polls), {self.drain_s:.1f} s more until the queue drained",
            f"lost predictions      {self.lost}",
            f"/health               {len(self.health_ms)} answers: p50 {percentile(self.health_ms, 50):.1f} ms, "
            f"p99 {percentile(self.health_ms, 99):.1f} ms, max {max(self.health_ms, default=float('nan')):.1f} ms; "
            f"over 1 s {self.health_slow}; not answered {self.health_failures}",
        ]


async def run_load(url: str, *, total: int = 300, concurrency: int = 50, polls: int = 2, token: str | None = None,
                   tokens: list[str] | None = None, hostile: Hostile | None = None,
                   drain_timeout_s: float = 120.0, request_timeout_s: float = 30.0) -> LoadReport:
    """Run the load against a live server at ``url``; every loop is bounded in count and time."""
    report = LoadReport()
    tokens = list(tokens or ([token] if token else [])) or [None]
    auth = [{"Authorization": f"Bearer {t}"} if t else {} for t in tokens]
    owner: dict[str, int] = {}  # prediction id -> the index of the token that created it
    body = {"input": tiny_input()}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout_s, limits=limits) as client:

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

        async def one_client(index: int) -> None:
            async with gate:
                who = index % len(auth)
                resp = await send("POST", CREATE_PATH, report.create_ms, json=body, headers=auth[who])
                if resp is None:
                    return
                report.create_statuses[resp.status_code] += 1
                if resp.status_code == 429 and not resp.headers.get("retry-after", "").isdigit():
                    report.refused_without_retry_after += 1
                if resp.status_code != 201:
                    return
                pid = resp.json()["id"]
                report.accepted.append(pid)
                owner[pid] = who
                for _ in range(polls):
                    await send("GET", f"/v1/predictions/{pid}", report.get_ms, headers=auth[who])
                    await asyncio.sleep(0.05)

        async def health_probe() -> None:
            """/health every 0.2 s on a connection of its own, until the run ends."""
            async with httpx.AsyncClient(base_url=url, timeout=10) as own:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        resp = await own.get("/health")
                        if resp.status_code == 200:
                            report.health_ms.append((time.perf_counter() - t) * 1000)
                        else:
                            report.health_failures += 1
                            report.server_errors += resp.status_code >= 500
                    except httpx.HTTPError:
                        report.health_failures += 1
                    try:
                        await asyncio.wait_for(stop.wait(), 0.2)
                    except asyncio.TimeoutError:
                        pass

        background = [asyncio.create_task(health_probe())]
        creates = drip = None
        if hostile is not None:
            drip = await asyncio.start_server(_drip_picture, "127.0.0.1", 0)
            drip_url = f"http://127.0.0.1:{drip.sockets[0].getsockname()[1]}/drip.png"
            background.append(asyncio.create_task(_hostile_connections(url, hostile, report, stop)))
            creates = asyncio.create_task(_hostile_creates(hostile, drip_url, report, send, auth, owner))
        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(total)))
        report.wall_s = time.perf_counter() - started

        # Every accepted prediction must end. The queue runs in order, so wait on the newest one
        # (light polling leaves the CPU to the worker), then check them all; bounded by a deadline.
        final: dict[str, str] = {}
        deadline = time.monotonic() + drain_timeout_s

        async def status_of(pid: str) -> None:
            async with gate:
                resp = await send("GET", f"/v1/predictions/{pid}", report.get_ms, headers=auth[owner.get(pid, 0)])
                if resp is not None and resp.status_code == 200:
                    final[pid] = resp.json()["status"]

        if creates is not None:  # the hostile predictions are waited for too
            await asyncio.wait({creates}, timeout=max(0.0, deadline - time.monotonic()))
        everything = lambda: report.accepted + report.hostile_accepted  # noqa: E731
        pending = everything()
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
        report.hostile_final = collections.Counter(final.get(pid, "unknown") for pid in report.hostile_accepted)

        # Every accepted prediction must appear in the list (paged by `next`, bounded), read with each token.
        listed: set[str] = set()
        for headers in auth:
            next_url: str | None = "/v1/predictions"
            for _ in range(total // 100 + 50):
                if not next_url:
                    break
                resp = await send("GET", next_url, headers=headers)
                if resp is None or resp.status_code != 200:
                    break
                page = resp.json()
                listed.update(p["id"] for p in page["results"])
                next_url = page["next"]
        report.missing_from_list = [pid for pid in everything() if pid not in listed]
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        if drip is not None:
            drip.close()
    return report


# -- the hostile mix --------------------------------------------------------------------------------

async def _hostile_creates(mix: Hostile, drip_url: str, report: LoadReport, send, auth: list[dict],
                          owner: dict) -> None:
    """Predictions whose picture drips in, and predictions with a 15 MB data: URI that is no picture."""
    huge = json.dumps({"input": {**tiny_input(), "image": "data:image/png;base64,"
                                 + base64.b64encode(os.urandom(11 << 20)).decode()}}).encode()
    dripping = json.dumps({"input": {**tiny_input(), "image": drip_url}}).encode()

    async def create(index: int, content: bytes) -> None:
        who = index % len(auth)
        resp = await send("POST", CREATE_PATH, content=content, headers={**auth[who], "content-type": "application/json"})
        if resp is None:
            return
        report.hostile[f"hostile create: {resp.status_code}"] += 1
        if resp.status_code == 201:
            pid = resp.json()["id"]
            report.hostile_accepted.append(pid)
            owner[pid] = who

    await asyncio.gather(*(create(i, dripping) for i in range(mix.drip_urls)),
                         *(create(i, huge) for i in range(mix.huge_data_uris)))


async def _hostile_connections(url: str, mix: Hostile, report: LoadReport, stop: asyncio.Event) -> None:
    """Bodies sent a byte at a time and half headers, each reconnecting when cut off, until ``stop``."""
    parts = httpx.URL(url)
    host, port = parts.host, parts.port or 80
    head = (f"POST {CREATE_PATH} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: 100000\r\n\r\n{{").encode()
    half = f"POST {CREATE_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-".encode()
    await asyncio.gather(
        *(_slow_client(host, port, head, b" ", 0.5, "slow body", report, stop) for _ in range(mix.slow_bodies)),
        *(_slow_client(host, port, half, b"", 1.0, "half header", report, stop) for _ in range(mix.half_headers)))


async def _slow_client(host: str, port: int, first: bytes, drip: bytes, every_s: float, kind: str,
                       report: LoadReport, stop: asyncio.Event) -> None:
    """Send ``first``, then ``drip`` every ``every_s`` until the server answers or closes; reconnect;
    until ``stop``. Tallies the status the server answered with (or how it hung up)."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            report.hostile[f"{kind}: could not connect"] += 1
            await asyncio.sleep(0.5)
            continue
        answer = asyncio.ensure_future(reader.read(4096))
        try:
            writer.write(first)
            while not stop.is_set():
                done, _ = await asyncio.wait({answer}, timeout=every_s)
                if done:
                    break
                if drip:
                    writer.write(drip)
                    await writer.drain()
            if answer.done() and not answer.cancelled():
                head = answer.result().split(b"\r\n", 1)[0].split(b" ")
                status = head[1].decode() if len(head) > 1 and head[1].isdigit() else "closed"
                report.hostile[f"{kind}: {status}"] += 1
                if status.startswith("5"):
                    report.server_errors += 1
        except (OSError, ConnectionError):
            report.hostile[f"{kind}: reset"] += 1
        finally:
            answer.cancel()
            writer.close()


async def _drip_picture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that sends a picture's headers, then a byte every 0.2 s, for as long as it is read."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 10000000\r\n\r\n")
        for _ in range(3000):  # at most ten minutes
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"\0")
    except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


# -- a server of its own, when no --url is given -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, max_queue: int, timeout_s: float = 120.0,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from inference.tiny import ensure_tiny_weights

    weights = ensure_tiny_weights(folder / "tiny")
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(folder / "data"),
           "--weights", str(weights), "--max-queue", str(max_queue), "--log-level", "warning", *extra]
    from bench.children import die_with_parent

    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=open(folder / "server.log", "ab"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
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
    parser.add_argument("--token", action="append", help="an API token; give two or more to take turns with them")
    parser.add_argument("--total", type=int, default=300, help="clients, each creating one prediction")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--polls", type=int, default=2, help="GETs per accepted prediction while the load runs")
    parser.add_argument("--max-queue", type=int, default=100, help="for the server this script starts")
    parser.add_argument("--hostile", action="store_true", help="add the hostile clients (see above)")
    args = parser.parse_args()

    proc = None
    tokens = args.token or []
    hostile = Hostile() if args.hostile else None
    with tempfile.TemporaryDirectory(prefix="flux-fill-load-") as tmp:
        url = args.url
        if not url:
            extra: tuple[str, ...] = ()
            if hostile is not None:
                tokens = tokens or ["load-token-a", "load-token-b"]
                extra = HOSTILE_SERVER_FLAGS
            for t in tokens:
                extra += ("--api-token", t)
            proc, url = start_server(Path(tmp), args.max_queue, extra=extra)
        try:
            report = asyncio.run(run_load(url, total=args.total, concurrency=args.concurrency, polls=args.polls,
                                          tokens=tokens, hostile=hostile))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print(f"load on {url}: {args.total} clients, {args.concurrency} at once, {max(1, len(tokens))} token(s)"
          + (", hostile mix" if hostile else ""))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
