"""Each way a hostile or unlucky client was found to hurt the server, reproduced against live servers.

Input URLs that hold the worker (a drip, a stall, a redirect back to this server's own stream), a
prediction that kills its worker again and again, cancels and waits across restarts, two servers on
one data folder, what a killed server leaves on disk, slow clients, a slow webhook receiver, and a
LoRA larger than a picture. Every request goes to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import ROOT, free_port, png_bytes, noise_image
from tests.server.hostile import MODEL_PATH, TERMINAL, create, quick_input, wait_terminal


class Origin:
    """An HTTP server on 127.0.0.1 that serves input URLs the way a hostile host would.

    /pic.png   a picture;
    /drip      a picture's headers, then one byte every ``drip_s`` for as long as it is read;
    /stall     the headers, then nothing at all;
    /later     a redirect to ``target``, once the test has set it (it waits up to 10 s for it);
    /mb/N.safetensors  N MB of zeros (no LoRA at all).
    With ``tls`` (certificate file, key file) it speaks https. Every request's path and headers are
    recorded."""

    def __init__(self, drip_s: float = 0.1, tls: tuple | None = None):
        self.drip_s = drip_s
        self.picture = png_bytes(noise_image(16, 16, seed=3))
        self.target: str | None = None
        self.requests: list[tuple[str, dict]] = []
        self.closing = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                try:
                    if self.path == "/pic.png":
                        self._head(200, len(outer.picture))
                        self.wfile.write(outer.picture)
                    elif self.path in ("/drip", "/stall"):
                        self._head(200, 10_000_000)
                        self.wfile.flush()
                        while not outer.closing.wait(outer.drip_s if self.path == "/drip" else 1.0):
                            if self.path == "/drip":
                                self.wfile.write(b"\0")
                                self.wfile.flush()
                    elif self.path == "/later":
                        deadline = time.monotonic() + 10
                        while outer.target is None and time.monotonic() < deadline:
                            time.sleep(0.02)
                        self.send_response(302)
                        self.send_header("Location", outer.target or "/missing")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif self.path.startswith("/mb/"):
                        megabytes = int(self.path.removeprefix("/mb/").split(".")[0])
                        self._head(200, megabytes << 20)
                        for _ in range(megabytes):
                            self.wfile.write(bytes(1 << 20))
                    else:
                        self._head(404, 0)
                except (OSError, ValueError):
                    pass

            def _head(self, status: int, length: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(length))
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Origin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def get(server, pid: str) -> dict:
    return httpx.get(f"{server.url}/v1/predictions/{pid}", timeout=10).json()


def wait_status(server, pid: str, wanted: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = get(server, pid)
        if p["status"] in wanted or time.monotonic() > deadline:
            return p
        time.sleep(0.05)


# -- input URLs that hold the worker -------------------------------------------------------------

def test_an_input_url_that_redirects_to_this_servers_own_stream_fails_at_once_and_the_queue_moves_on(server_factory):
    """The redirect leads to the stream of a prediction queued behind the one fetching: served, the
    stream's pings would keep that fetch alive and the queue would never move again."""
    server = server_factory()
    with Origin() as origin:
        looping = create(server.url, {**quick_input(), "image": origin.url("/later")})
        behind = create(server.url, quick_input(seed=2))
        origin.target = f"{server.url}/v1/predictions/{behind['id']}/stream"
        started = time.monotonic()
        found = wait_terminal(server.url, [looping["id"], behind["id"]], timeout=30)
        elapsed = time.monotonic() - started
    failed, after = found[looping["id"]], found[behind["id"]]
    assert failed["status"] == "failed", failed
    assert failed["error"].startswith("image leads back to this server (/v1/predictions/"), failed["error"]
    assert "never fetched from the server that runs it" in failed["error"]
    assert after["status"] == "succeeded", after
    assert elapsed < 10, elapsed
    # The fetch carried this server's mark: that is what the server knew itself by.
    assert any("flux-fill-fetch" in headers for path, headers in origin.requests if path == "/later")


def test_a_request_with_another_servers_fetch_mark_is_served(live_server):
    r = httpx.get(live_server.url + "/health", headers={"flux-fill-fetch": "another-server.0"})
    assert r.status_code == 200


def test_an_output_url_of_this_server_is_a_valid_input(server_factory):
    """Output files are plain files: a prediction's output URL may be the next one's input."""
    server = server_factory("--output-urls", "url")
    first = create(server.url, quick_input(), headers={"Prefer": "wait=30"})
    assert first["status"] == "succeeded" and first["output"][0].startswith(server.url + "/outputs/")
    second = create(server.url, {**quick_input(), "image": first["output"][0]}, headers={"Prefer": "wait=30"})
    assert second["status"] == "succeeded", second["error"]


def test_cancel_stops_a_dripping_url_fetch_within_a_second(server_factory):
    server = server_factory()
    with Origin(drip_s=0.1) as origin:
        p = create(server.url, {**quick_input(), "image": origin.url("/drip")})
        assert wait_status(server, p["id"], ("processing",))["status"] == "processing"
        time.sleep(0.5)  # well into the drip
        began = time.monotonic()
        r = httpx.post(f"{server.url}/v1/predictions/{p['id']}/cancel", timeout=10)
        elapsed = time.monotonic() - began
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.json()["status"]
        assert elapsed < 1.0, elapsed
        after = create(server.url, quick_input(seed=4), headers={"Prefer": "wait=30"})
        assert after["status"] == "succeeded"


# -- one server per data folder, and what a killed server leaves ----------------------------------

def serve_command(data_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra]


def test_a_second_server_on_the_same_data_dir_stops_before_touching_the_queue(server_factory, tmp_path, tiny_dir):
    data = tmp_path / "shared"
    first = server_factory(data_dir=data)
    with Origin() as origin:
        running = create(first.url, {**quick_input(), "image": origin.url("/drip")})
        assert wait_status(first, running["id"], ("processing",))["status"] == "processing"
        began = time.monotonic()
        second = subprocess.run(serve_command(data, free_port(), "--weights", str(tiny_dir)), cwd=ROOT,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        took = time.monotonic() - began
        assert second.returncode == 75, (second.returncode, second.stderr[-2000:])
        assert "Another flux-fill server is already using the data folder" in second.stderr
        assert "--data-dir" in second.stderr and "Traceback" not in second.stderr
        # The first server's prediction was left alone: still running, once, and never re-queued.
        p = get(first, running["id"])
        assert p["status"] == "processing" and "Server restarted" not in p["logs"], p
        httpx.post(f"{first.url}/v1/predictions/{running['id']}/cancel", timeout=10)
    assert wait_status(first, running["id"], TERMINAL)["status"] == "canceled"
    print(f"\nsecond server on the same data folder: exit 75 after {took:.1f} s")


def test_files_a_killed_server_left_half_written_are_removed_at_start(server_factory, tmp_path):
    data = tmp_path / "leftovers"
    server = server_factory(data_dir=data)
    done = create(server.url, quick_input(), headers={"Prefer": "wait=30"})
    server.kill()
    kept = next((data / "outputs" / done["id"]).glob("*/out-0.png"))  # in the folder of the run that made it
    leftovers = [data / "tmp" / "tmpab12cd", kept.parent / ".out-1.png.tmp", data / "outputs" / done["id"] / ".out-1.png.tmp",
                 data / "loras" / "0123abcd.4242.part"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    assert kept.is_file()
    server_factory(data_dir=data)
    assert [p for p in leftovers if p.exists()] == []
    assert kept.is_file()


# -- LoRA downloads --------------------------------------------------------------------------------

@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 (the servers under test trust it through SSL_CERT_FILE)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_a_lora_larger_than_the_picture_limit_is_downloaded_and_the_lora_limit_holds(server_factory, certificate):
    """Pictures are held to 64 MB, LoRAs to --max-lora-bytes (2 GB by default; 80 MB here). A 70 MB
    download goes through (it is no LoRA, so it fails on its content, and is not kept); a 90 MB one
    is refused on its size."""
    server = server_factory("--max-lora-bytes", str(80 << 20), env={"SSL_CERT_FILE": str(certificate[0])})
    with Origin(tls=certificate) as origin:
        fetched = create(server.url, quick_input(lora_weights=origin.url("/mb/70.safetensors")),
                         headers={"Prefer": "wait=60"})
        refused = create(server.url, quick_input(lora_weights=origin.url("/mb/90.safetensors")),
                         headers={"Prefer": "wait=60"})
    assert fetched["status"] == "failed" and "is not a readable .safetensors file" in fetched["error"], fetched["error"]
    assert refused["status"] == "failed" and "lora_weights is larger than 80 MB" in refused["error"], refused["error"]
    assert list((server.data_dir / "loras").glob("*")) == []  # the download that is no LoRA was not kept


def test_lora_downloads_have_their_own_limits_cache_budget_and_the_fetch_mark():
    from server.fetching import HEADER, fetch_policy, lora_settings
    from server.settings import Settings

    settings = Settings(lora_cache_gb=1.5)
    lora = lora_settings(settings, "instance.0")
    assert lora.fetch_policy.max_bytes == 2 * 1024**3 and lora.fetch_policy.timeout_s == 600
    assert lora.cache_bytes == int(1.5 * 1024**3) and lora.cache_dir == settings.data_dir / "loras"
    assert lora.fetch_policy.headers == ((HEADER, "instance.0"),)
    picture = fetch_policy(settings, "instance.0")
    assert picture.max_bytes == 64 * 1024 * 1024 and picture.timeout_s == 30
    assert picture.headers == ((HEADER, "instance.0"),)


# -- restarts ------------------------------------------------------------------------------------

def test_a_prediction_that_is_killed_with_its_server_again_and_again_fails_in_words(server_factory, tmp_path):
    """Each run of it ends with the server killed (here: while its picture stalls). It runs again
    after a restart, but not after its --max-attempts-th run; the queue behind it then moves on."""
    data = tmp_path / "again"
    server = server_factory("--max-attempts", "2", data_dir=data)
    with Origin() as origin:
        doomed = create(server.url, {**quick_input(), "image": origin.url("/stall")})
        behind = create(server.url, quick_input(seed=5))
        for run in (1, 2):
            p = wait_status(server, doomed["id"], ("processing",))
            assert p["status"] == "processing", p
            server.kill()
            server = server_factory("--max-attempts", "2", data_dir=data)
        found = wait_terminal(server.url, [doomed["id"], behind["id"]], timeout=60)
    failed = found[doomed["id"]]
    assert failed["status"] == "failed", failed
    assert failed["error"] == ("This prediction was interrupted 2 times while it ran (the server stopped or was "
                               "killed each time), so it is not run again.")
    assert failed["logs"].count("Server restarted while this prediction was running; it runs again.") == 1
    assert found[behind["id"]]["status"] == "succeeded"


def test_a_cancel_of_a_running_prediction_survives_a_restart(server_factory, tmp_path):
    """The cancel arrives while the prediction's picture stalls (no byte comes to stop between), and
    the server is killed before the prediction stops: after the restart it is canceled, not run again."""
    data = tmp_path / "cancel"
    server = server_factory(data_dir=data)
    with Origin() as origin:
        p = create(server.url, {**quick_input(), "image": origin.url("/stall")})
        assert wait_status(server, p["id"], ("processing",))["status"] == "processing"
        deadline = time.monotonic() + 10  # the fetch is under way: the cancel finds it reading
        while not any(path == "/stall" for path, _ in origin.requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # past the fetch's last cancel check before its read blocks
        answer = httpx.post(f"{server.url}/v1/predictions/{p['id']}/cancel", timeout=10).json()
        assert answer["status"] == "processing"  # it stops at its next read, which does not come
        server.kill()
        again = server_factory(data_dir=data)
        ended = wait_status(again, p["id"], TERMINAL, timeout=10)
    assert ended["status"] == "canceled", ended
    assert "canceled; it does not run again" in ended["logs"]
    assert create(again.url, quick_input(), headers={"Prefer": "wait=30"})["status"] == "succeeded"


# -- slow clients --------------------------------------------------------------------------------

def test_eleven_hundred_connections_sending_half_a_header_keep_out_no_one(server_factory):
    """As found: 1,100 connections that each send part of a request's headers and then nothing, on
    a server whose process may open 1,024 files. The connections past what it can hold push out
    the longest idle ones, each gets 408 when its header time is up, /health answers within a second
    all along, a create goes through, and the log stays short."""
    server = server_factory("--header-timeout-s", "3", open_files=1024)
    held: list[socket.socket] = []
    latencies: list[float] = []
    try:
        for _ in range(1100):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            conn.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
            held.append(conn)
        with httpx.Client(timeout=5) as client:
            until = time.monotonic() + 2
            while time.monotonic() < until:
                began = time.monotonic()
                assert client.get(server.url + "/health", headers={"connection": "close"}).status_code == 200
                latencies.append(time.monotonic() - began)
                time.sleep(0.05)
        created = create(server.url, quick_input(), headers={"Prefer": "wait=30"})
        assert created["status"] == "succeeded"
        newest = held[-1]  # pushed out last, if at all: it waits for its header time to end
        newest.settimeout(10)
        answer = newest.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
        assert b"application/problem+json" in answer and b"did not arrive within 3 s" in answer
    finally:
        for conn in held:
            conn.close()
    assert max(latencies) < 1.0, max(latencies)
    log = server.log()
    assert "Traceback" not in log and len(log) < 100_000, len(log)
    print(f"\n1,100 half-header connections: /health p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} probes; log {len(log)} bytes")


def _answer(conn: socket.socket) -> bytes:
    """One whole answer to a GET /health (headers and a Content-Length body), read off ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(4096)
    return head


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_kept_alive_connection_outlives_the_clients_own_idle_time_and_never_gets_an_unasked_408(server_factory):
    """As found under load: the server closed idle connections after 5 s, the very idle time after
    which httpx's pool drops one itself, so a request sent at that moment got no answer (ReadError).
    By default a connection idle past 5 s (and past the header time, here 1 s) still answers; a
    request's header time starts at its first byte (408 a second later); and past the keep-alive
    time the connection is closed with no bytes, never with a 408 a client would take as its answer."""
    default = server_factory()
    conn = socket.create_connection(("127.0.0.1", default.port), timeout=10)
    try:
        conn.sendall(HEALTH)
        assert _answer(conn).startswith(b"HTTP/1.1 200")
        time.sleep(5.5)
        conn.sendall(HEALTH)
        assert _answer(conn).startswith(b"HTTP/1.1 200")
    finally:
        conn.close()

    server = server_factory("--header-timeout-s", "1", "--keep-alive-timeout-s", "3")
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    quiet = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        for c in (conn, quiet):
            c.sendall(HEALTH)
            assert _answer(c).startswith(b"HTTP/1.1 200")
        quiet_since = time.monotonic()
        time.sleep(1.8)  # past the header time, within the keep-alive time
        conn.sendall(HEALTH)
        assert _answer(conn).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 12")
        answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
        assert 0.8 < time.monotonic() - began < 2.5
        assert quiet.recv(4096) == b""  # closed at the keep-alive time, without a word
        assert 2.7 < time.monotonic() - quiet_since < 6
    finally:
        conn.close()
        quiet.close()


def test_past_the_connection_cap_the_longest_idle_connection_gives_way_and_busy_ones_do_not(server_factory):
    """--max-connections 16: sixteen idle connections, then a client: the idle one that waited
    longest is closed and the client is served. Sixteen streams (each busy with a request), then a
    client: it gets 503 with Retry-After, and every stream is still open."""
    server = server_factory("--max-connections", "16")
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(16)]
    try:
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", headers={"connection": "close"}, timeout=5).status_code == 200
        idle[0].settimeout(5)
        assert idle[0].recv(100) == b""  # the longest idle one was closed to make room
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.3)
    with Origin() as origin:
        busy = create(server.url, {**quick_input(), "image": origin.url("/drip")})
        streams = []
        try:
            for _ in range(16):
                conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                conn.sendall(f"GET /v1/predictions/{busy['id']}/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert conn.recv(4096).startswith(b"HTTP/1.1 200")
                streams.append(conn)
            r = httpx.get(server.url + "/health", timeout=5)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.headers["content-type"] == "application/problem+json" and "16 connections" in r.json()["detail"]
            for conn in streams:
                conn.settimeout(0.01)
                try:
                    assert conn.recv(4096) != b""  # still open (a keep-alive ping or nothing yet)
                except socket.timeout:
                    pass
        finally:
            for conn in streams:
                conn.close()
            time.sleep(0.3)
            httpx.post(f"{server.url}/v1/predictions/{busy['id']}/cancel", timeout=10)


def test_a_body_sent_a_byte_at_a_time_gets_408_when_its_time_is_up(server_factory):
    server = server_factory("--body-timeout-s", "2")
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    began = time.monotonic()
    conn.sendall(b"POST " + MODEL_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    answer = b""
    conn.settimeout(0.2)
    try:
        while time.monotonic() - began < 8:
            conn.sendall(b" ")
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                break
            answer += chunk
    except OSError:  # the server closed the connection while a byte was on its way
        pass
    finally:
        conn.close()
    took = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:300]
    assert b"application/problem+json" in answer and b"The request body did not arrive within 2 s." in answer
    assert 1.9 < took < 4, took
    assert httpx.get(server.url + "/v1/predictions").json()["results"] == []  # nothing was created


def test_a_repeated_log_message_is_logged_once_per_window_with_the_count_left_out():
    import logging

    from server.serving import QuietRepeats

    quiet = QuietRepeats(window_s=0.2)
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
                                 None, None) for _ in range(1000)]
    assert sum(quiet.filter(r) for r in records) == 1
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.", None, None)
    assert quiet.filter(other)
    time.sleep(0.25)
    later = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource", None, None)
    assert quiet.filter(later)
    assert later.getMessage().endswith("(999 more like this in the last 0.2 s not logged)")


# -- shutdown ------------------------------------------------------------------------------------

def test_sigterm_during_a_long_prefer_wait_answers_it_with_the_prediction_as_it_stands(server_factory):
    """The worker is busy (a dripping picture) when a create with `Prefer: wait=60` arrives, then
    the server is told to stop: the waiting request gets its 201 with the prediction `starting` at
    once (as for any wait that ends first), not a plain-text 500 when uvicorn gives up on it."""
    server = server_factory()
    answers: list = []
    with Origin() as origin:
        busy = create(server.url, {**quick_input(), "image": origin.url("/drip")})
        assert wait_status(server, busy["id"], ("processing",))["status"] == "processing"

        def wait_for_it():
            r = httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers={"Prefer": "wait=60"},
                           timeout=70)
            answers.append((r, time.monotonic()))

        waiting = threading.Thread(target=wait_for_it)
        waiting.start()
        time.sleep(1.0)
        stopped = time.monotonic()
        os.killpg(server.process.pid, signal.SIGTERM)
        waiting.join(30)
        server.kill()  # the busy prediction would hold the shutdown for its grace time; not this test's matter
    assert answers, "no answer"
    r, at = answers[0]
    assert r.status_code == 201 and r.headers["content-type"] == "application/json", (r.status_code, r.text[:300])
    assert r.json()["status"] == "starting" and r.headers["preference-applied"] == "wait=60"
    assert at - stopped < 2, at - stopped


# -- webhooks ------------------------------------------------------------------------------------

def test_a_slow_webhook_receiver_delays_only_its_own_webhooks(server_factory):
    """Twenty predictions send their webhooks to a receiver that takes 10 s to answer each; the
    next prediction's webhook goes to another receiver and arrives as soon as it completes."""
    from tests.server.hostile import Loopback

    server = server_factory()
    with Loopback(post_delay_s=10) as slow, Loopback() as fast:
        slowed = [create(server.url, quick_input(seed=i), webhook=slow.url("/hook"))["id"] for i in range(20)]
        timely = create(server.url, quick_input(seed=99), webhook=fast.url("/hook"), webhook_events_filter=["completed"])
        found = wait_terminal(server.url, [*slowed, timely["id"]], timeout=60)
        assert all(p["status"] == "succeeded" for p in found.values())
        completed = time.monotonic()
        while not fast.posts() and time.monotonic() - completed < 5:
            time.sleep(0.02)
        waited = time.monotonic() - completed
        assert fast.posts() and fast.posts()[0]["id"] == timely["id"]
        assert slow.requests  # the slow receiver was being called (and was holding its slots)
    assert waited < 1.0, waited


def test_made_up_fetch_marks_are_not_ours_and_leave_no_record():
    """The fetch mark reaches every input URL's host; a made-up mark from it must neither be refused
    as ours nor grow the record of refusals."""
    from server.fetching import OwnFetches

    own = OwnFetches()
    mark = own.mark(0)
    assert own.is_ours(mark) and not own.is_ours(f"{own.instance}.999") and not own.is_ours(own.instance)
    for i in range(1000):
        own.refused(f"{own.instance}.{i + 1}", "/x" * 5000)
    own.refused(mark, "/v1/predictions/abc/stream" + "x" * 5000)
    assert own._refused.keys() == {mark} and len(own.take(mark)) <= 300 and own.take(mark) is None
