"""Small builders shared by the tests: images, data URIs, a live server process."""

from __future__ import annotations

import base64
import io
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.forkserver import ForkServer

ROOT = Path(__file__).resolve().parent.parent


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        arr[..., 3] = 255
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def box_mask(width: int, height: int, box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(value, box)
    return mask


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A real `flux-fill serve` process on loopback."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    open_files: int | None = None  # the process's limit on open files (soft and hard), when given
    command: str = "serve"  # or "worker": a worker node, whose /health is on its own port
    fork: bool = True  # forked from the fork server (tests.forkserver); False: started cold, as a user starts it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "LiveServer":
        self.port = self.port or free_port()
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        argv = [self.command, "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args]
        forks = ForkServer.get(ROOT) if self.fork and not self.env else None  # see tests.forkserver
        if forks is not None:
            self.process = forks.spawn(argv, env, ROOT, self.log_path, self.open_files)
        else:
            self.process = subprocess.Popen([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, env=env,
                                            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=self._in_child)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).json()["status"]
                if status in ("READY", "BUSY"):
                    return self
                if status == "SETUP_FAILED":
                    raise RuntimeError(f"server setup failed:\n{self.log()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    @property
    def database(self) -> str:
        """The server's --database, or its SQLite file."""
        given = self.args[self.args.index("--database") + 1] if "--database" in self.args else None
        return given or str(self.data_dir / "flux-fill.sqlite3")

    def store(self):
        """The server's store, opened beside it (close it when done)."""
        from server.store import open_store

        return open_store(self.database)

    def _in_child(self) -> None:
        """In the server's process before it starts: it is stopped (SIGTERM) when the test process
        dies, even by kill -9, so no server outlives its tests; and its open-files limit, if given."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: stop() and the fixtures' teardown still stop it
            pass
        if self.open_files:
            self._limits()

    def _limits(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 40) -> int | None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None


def fast_input(img: Image.Image, mask: Image.Image | None = None, **extra) -> dict:
    """An input that runs in a fraction of a second on the tiny model."""
    inp = {"prompt": "a red cat", "image": data_uri(img), "megapixels": "match_input", "num_inference_steps": 2,
           "output_format": "png"}
    if mask is not None:
        inp["mask"] = data_uri(mask)
    inp.update(extra)
    return inp



def wait_for(check, timeout: float = 30, every: float = 0.05):
    """Call ``check`` until it returns something true (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return found


def response_bytes(response) -> bytes:
    """The whole body of a Starlette response made in the test (a streamed one read to its end)."""
    if not hasattr(response, "body_iterator"):
        return response.body

    async def read() -> bytes:
        return b"".join([chunk async for chunk in response.body_iterator])

    import asyncio

    return asyncio.run(read())

class ServerFactory:
    """Starts servers on the tiny model with extra options; ``stop_all`` stops every one. With
    ``database_for``, each data folder gets that database (the same one again for the same folder)."""

    def __init__(self, folder: Path, weights: Path, database_for=None):
        self.folder, self.weights, self.database_for = folder, weights, database_for
        self.started: list[LiveServer] = []
        self.databases: dict = {}

    def __call__(self, *args: str, data_dir=None, env=None, open_files=None, command="serve", **kw) -> LiveServer:
        data = data_dir or self.folder / f"data{len(self.started)}"
        extra: list[str] = []
        if self.database_for is not None:
            if data not in self.databases:
                self.databases[data] = self.database_for()
            extra = ["--database", self.databases[data]]
        server = LiveServer(data, args=["--weights", str(self.weights), *extra, *args], env=env or {},
                            open_files=open_files, command=command)
        self.started.append(server)
        return server.start(**kw)

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


class PostgresDatabases:
    """Fresh, empty databases on the PostgreSQL server FLUX_FILL_TEST_DATABASE names (a URL whose role
    may create databases; .ci/run sets it up), all dropped by ``drop_all``. Without that server the
    test is skipped, unless FLUX_FILL_REQUIRE_POSTGRES=1 (CI) makes that a failure."""

    def __init__(self):
        import pytest

        self.admin = os.environ.get("FLUX_FILL_TEST_DATABASE")
        if not self.admin:
            if os.environ.get("FLUX_FILL_REQUIRE_POSTGRES") == "1":
                pytest.fail("FLUX_FILL_TEST_DATABASE is not set, and FLUX_FILL_REQUIRE_POSTGRES=1")
            pytest.skip("no PostgreSQL server to test on (set FLUX_FILL_TEST_DATABASE)")
        self.psycopg = pytest.importorskip("psycopg")
        self.made: list[str] = []

    def make(self) -> str:
        import secrets
        from urllib.parse import urlsplit, urlunsplit

        name = f"flux_fill_test_{secrets.token_hex(6)}"
        with self.psycopg.connect(self.admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return urlunsplit(urlsplit(self.admin)._replace(path=f"/{name}"))

    def drop_all(self) -> None:
        """Drop every database made. A process of another role still in one (an autovacuum worker)
        may refuse to be ended for a moment: tried again for a few seconds, then left with a warning
        (a test database left behind is no test's failure)."""
        import time
        import warnings

        with self.psycopg.connect(self.admin, autocommit=True) as db:
            for name in self.made:
                for attempt in range(20):
                    try:
                        db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                        break
                    except self.psycopg.errors.InsufficientPrivilege as exc:
                        if attempt == 19:
                            warnings.warn(f"test database {name} left behind: {exc}")
                        time.sleep(0.5)


class Receiver:
    """Records webhook POSTs on 127.0.0.1, as (lower-cased headers, raw body); on ``port`` when given
    (a receiver that comes back where it was), answering each after ``delay_s`` (a slow one)."""

    def __init__(self, port: int = 0, delay_s: float = 0.0):
        self.posts: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if delay_s:
                    time.sleep(delay_s)
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


JS_DIR = ROOT / "tests" / "js"
NODE = shutil.which("node")


def js_client_mark(module: str):
    """The mark of a module of tests driving the npm package ``module`` from tests/js: skipped when
    Node.js or the package is missing, a failure then if FLUX_FILL_REQUIRE_JS is set (CI)."""
    import pytest

    missing = ("needs Node.js (`node`)" if NODE is None else
               f"needs the {module} npm module: (cd tests/js && npm ci)"
               if not (JS_DIR / "node_modules" / module / "package.json").exists() else None)
    if missing and os.environ.get("FLUX_FILL_REQUIRE_JS"):
        pytest.fail(f"FLUX_FILL_REQUIRE_JS is set but the JavaScript client cannot run: {missing}", pytrace=False)
    return pytest.mark.skipif(missing is not None, reason=missing or "")
