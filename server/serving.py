"""The app under uvicorn, with bounds on slow and numerous clients, and a shutdown that answers.

uvicorn gives a keep-alive timeout, a header size limit (h11) and a listen backlog; it has no time
limit for a request's headers and no cap on connections that spares the clients it can still
serve. Without them, a thousand connections that send half a header each hold a thousand sockets
for good, and once the process runs out of file descriptors nothing is accepted any more, ``/health``
included, while asyncio logs a traceback for every refused accept. Here:

- a client has ``--header-timeout-s`` from connecting (or, on a kept-alive connection, from the
  first byte of its next request) to send a request's headers; then it gets 408 and the connection
  is closed. A kept-alive connection that sends nothing is closed without a word after
  ``--keep-alive-timeout-s``, which is longer than the idle time after which the usual clients drop a
  pooled connection themselves (httpx 5 s, Node 4-5 s) and than a load balancer's idle timeout
  (60 s), so a client never sends its request on a connection the server is closing at that moment;
- at most ``--max-connections`` are open at once (and never more than the open-files limit allows,
  which is raised to its hard limit at start). Past it, the connection that has waited longest for
  a request is closed, so a crowd of idle or slow connections cannot keep out a client that sends
  its request at once; when every connection is busy with a request, the new one gets 503;
- a repeated log message (a refused accept, a malformed request) is logged once per window with
  the count of those left out, never once per connection.

The body's time limit is :class:`server.middleware.BodyTimeout`. For exposure to the internet, a
reverse proxy in front (nginx, Caddy) remains the place for per-address limits and TLS (docs/running.md, "In public").
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import time
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import Problem
from .settings import Settings

log = logging.getLogger("flux_fill.server")
FD_HEADROOM = 256  # open files kept for the database, uploads, outputs, fetches and webhooks
QUIET_WINDOW_S = 10.0


def _raw_problem(problem: Problem) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for the protocol level (no app)."""
    body = problem.model_dump_json(exclude_none=True).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[problem.status]
    head = (f"HTTP/1.1 {problem.status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    if problem.status == 503:
        head += "retry-after: 1\r\n"
    return (head + "\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a time limit on each request's headers and a connection cap.
    Made per server by :func:`guarded_protocol` (the limits are class attributes)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    waiting: collections.OrderedDict  # connections waiting for a request's headers, longest first
    stats: collections.Counter

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer = None

    # -- waiting for a request -------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.max_connections:
            self._shed()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self in self.waiting:  # kept alive: the header time starts now
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers arrived
            self._request_started()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request: wait for one
            self._await_request(timed=False)

    def handle_websocket_upgrade(self, event) -> None:
        self._request_started()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._request_started()
        super().connection_lost(exc)

    def _await_request(self, timed: bool = True) -> None:
        """Wait for a request (idle connections are shed longest first); ``timed``: its headers have
        --header-timeout-s from now. Untimed (kept alive after an answer), uvicorn's keep-alive
        timer closes it if nothing comes, and the header time starts at the first byte."""
        self._cancel_timer()
        self.waiting.pop(self, None)
        self.waiting[self] = None
        if timed:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _request_started(self) -> None:
        self._cancel_timer()
        self.waiting.pop(self, None)

    def _cancel_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        self.stats["header timeouts"] += 1
        if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
            self.transport.write(_raw_problem(Problem(
                title="Request Timeout", status=408,
                detail=f"The request's headers did not arrive within {self.header_timeout_s:g} s.")))
        self.transport.close()
        _report(self.stats)

    # -- too many connections --------------------------------------------------------------------

    def _shed(self) -> None:
        """Over the cap: close the connection idle the longest, or refuse this one if none is idle."""
        oldest = next(iter(self.waiting), None)
        if oldest is not None and oldest is not self:
            self.waiting.pop(oldest, None)
            oldest._cancel_timer()
            oldest.transport.close()
            self.stats["idle connections closed to make room"] += 1
        else:
            self._request_started()
            self.transport.write(_raw_problem(Problem(
                title="Service Unavailable", status=503,
                detail=f"The server has {self.max_connections} connections open, each busy with a request. "
                       "Try again in a moment.")))
            self.transport.close()
            self.stats["connections refused"] += 1
        _report(self.stats)


_last_report = [0.0]


def _report(stats: collections.Counter) -> None:
    """Log the shedding counts at most once per window."""
    now = time.monotonic()
    if now - _last_report[0] >= QUIET_WINDOW_S:
        _last_report[0] = now
        log.warning("slow or surplus clients since start: %s",
                    ", ".join(f"{name} {count}" for name, count in sorted(stats.items())))


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type("FluxFillH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": header_timeout_s, "max_connections": max_connections,
        "waiting": collections.OrderedDict(), "stats": collections.Counter()})


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the limit in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class QuietRepeats(logging.Filter):
    """One record per message (its format string) per window; the next one says how many were left
    out. A flood of identical errors costs a line per window, not a traceback per connection."""

    def __init__(self, window_s: float = QUIET_WINDOW_S):
        super().__init__()
        self.window_s = window_s
        self.seen: dict[tuple, list] = {}  # (logger, message) -> [time logged, left out since]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key = (record.name, text.partition("\n")[0])  # asyncio puts the varying details on later lines
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            return False
        left_out = entry[1] if entry is not None else 0
        self.seen[key] = [now, 0]
        if left_out and isinstance(record.msg, str):
            record.msg += f" ({left_out} more like this in the last {self.window_s:g} s not logged)"
        return True


LOOP_LOG = "flux_fill.server.loop"


def loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's errors. One from the operating system (out of open files while accepting,
    a connection reset) is one line, never a traceback: there is nothing in it to debug."""
    exc = context.get("exception")
    if isinstance(exc, OSError):
        logging.getLogger(LOOP_LOG).warning("%s: %s", context.get("message", "event loop error"), exc)
    else:
        loop.default_exception_handler(context)


class Server(uvicorn.Server):
    """uvicorn's server that tells the app the moment a shutdown is asked for (``on_exit``), so that
    requests waiting on a prediction are answered before uvicorn waits for them to end."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    async def startup(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(loop_error)
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        try:
            self.on_exit()
        except Exception:  # a signal handler must not raise
            log.exception("could not tell the app that the server is stopping")


def fit_to_open_files(settings: Settings, files: int) -> tuple[int, int]:
    """(connections, backlog) that fit the open-files limit. asyncio accepts up to ``backlog``
    sockets at a time, before the protocol sees any of them, so a burst briefly holds the open
    connections plus about two batches; past the limit every accept fails (and /health with it)."""
    budget = max(64, files - FD_HEADROOM)
    backlog = max(16, min(settings.backlog, budget // 4))
    connections = max(16, min(settings.max_connections, budget - 2 * backlog))
    return connections, backlog


class PortUnavailable(OSError):
    """The port cannot be bound: one sentence naming the address, the reason and ``--port``."""


EXIT_PORT_UNAVAILABLE = 3  # as uvicorn's own start failure


def bind(host: str, port: int, command: str = "serve") -> socket.socket:
    """The listening socket on ``host``:``port`` (as uvicorn binds it), or :class:`PortUnavailable`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            what = (f"Port {port} is already in use on {host} (another flux-fill node or another program "
                    f"listens there). Stop it, or start this one on a free port: flux-fill {command} --port {port + 1}")
        elif exc.errno == errno.EACCES:
            what = (f"Port {port} on {host} needs more privileges than this user has (ports below 1024 do). "
                    f"Use a port of 1024 or more: flux-fill {command} --port {5000 if port < 1024 else port + 1}")
        elif exc.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME) or isinstance(exc, socket.gaierror):
            what = (f"{host} is not an address of this machine, so it cannot listen on {where}. "
                    "Use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every network)")
        else:
            what = f"Cannot listen on {where}: {exc.strerror or exc}. Choose another with --host and --port"
        raise PortUnavailable(exc.errno, what + ".") from None
    sock.set_inheritable(True)
    return sock


def run(app, settings: Settings, on_exit: Callable[[], None], command: str = "serve") -> None:
    """Serve ``app`` with the limits of ``settings`` until a signal stops it."""
    files = raise_open_files_limit()
    connections, backlog = fit_to_open_files(settings, files)
    if (connections, backlog) != (settings.max_connections, settings.backlog):
        log.warning("the open-files limit is %d: at most %d connections at once and a backlog of %d "
                    "(raise the limit, e.g. ulimit -n 65536, to allow more)", files, connections, backlog)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        http=guarded_protocol(settings.header_timeout_s, connections),
        timeout_keep_alive=settings.keep_alive_timeout_s, backlog=backlog,
        h11_max_incomplete_event_size=settings.max_header_bytes, timeout_graceful_shutdown=30)
    quiet = QuietRepeats()
    for name in ("uvicorn.error", "asyncio", LOOP_LOG):  # after Config, which configures uvicorn's loggers
        logging.getLogger(name).addFilter(quiet)
    sock = bind(settings.host, settings.port, command)  # before the app starts: a port in use changes nothing
    if command == "worker":  # a worker answers its health and metrics, nothing else
        shown = f"http://{settings.host}:{settings.port}"
        log.info("worker node: its health at %s/health, its metrics at %s/metrics", shown, shown)
    else:
        shown = settings.public_url or f"http://{settings.host}:{settings.port}{settings.prefix}"
        log.info("serving on %s (web page at %s/)", shown, shown)
    Server(config, on_exit).run(sockets=[sock])
