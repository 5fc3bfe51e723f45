"""Server processes for the tests, forked from a process that has already imported the server.

Every `flux-fill serve` (or `worker`) a test starts is a real process on a real port, running the
real command line; what it skips is the four seconds of CPU that importing torch, diffusers and
transformers costs each time, which the suite would otherwise spend some two hundred times. A
test process starts one fork server (``python -m tests.forkserver``) the first time it needs a
server; the fork server imports the libraries once and forks a child per request, which becomes
the server exactly as `python -m server.cli ...` would: its own session and process group, its
output in the log file, the environment and folder it was given, its open-files limit, and
stopped (SIGTERM) when the fork server dies, which dies with the test process.

A server whose environment differs from the test process's (a clock shifted by LD_PRELOAD, another
PYTHONPATH) is started as a plain subprocess instead: what a library read at import would be the
fork server's. FLUX_FILL_TEST_FORK=0 starts every server as a plain subprocess.

The protocol on the fork server's stdin and stdout: one JSON request a line (argv, env, cwd, log,
open_files), answered by the child's pid a line. Exit statuses are written as files named by pid
in a folder of the fork server's, so a test reads them as ``Popen.poll`` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a server forked by the fork server."""

    def __init__(self, pid: int, args: list[str], statuses: Path):
        self.pid, self.args, self._status = pid, args, statuses / str(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._status.read_text())
            except (FileNotFoundError, ValueError):
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The fork server of this test process (see the module's docstring)."""

    _lock = threading.Lock()
    _instance: "ForkServer | None" = None
    _failed = False

    def __init__(self, cwd: Path):
        self.statuses = Path(tempfile.mkdtemp(prefix="flux-fill-forks-"))
        self.process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", str(self.statuses)], cwd=cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        stderr=open(self.statuses / "forkserver.log", "ab"),
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {ready!r}")

    @classmethod
    def get(cls, cwd: Path) -> "ForkServer | None":
        """This test process's fork server, started on first use (from the main thread only, since
        a child dies with the thread that made it); None where servers start as subprocesses."""
        if os.environ.get("FLUX_FILL_TEST_FORK", "1") == "0" or cls._failed:
            return None
        with cls._lock:
            if cls._instance is not None and cls._instance.process.poll() is None:
                return cls._instance
            if threading.current_thread() is not threading.main_thread():
                return None
            try:
                cls._instance = cls(cwd)
            except (OSError, RuntimeError):
                cls._failed = True
                return None
            return cls._instance

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path,
              open_files: int | None) -> ForkedProcess:
        request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log), "open_files": open_files}
        with self._lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = int(self.process.stdout.readline())
        return ForkedProcess(pid, argv, self.statuses)


# -- the fork server's own process -------------------------------------------------------------------


def _preload() -> None:
    """What a server imports as it starts, imported once here."""
    import torch  # noqa: F401
    from diffusers import FluxFillPipeline  # noqa: F401

    import inference.engine  # noqa: F401
    import inference.factory  # noqa: F401
    import inference.weights  # noqa: F401
    import server.app  # noqa: F401
    import server.cli  # noqa: F401
    import server.serving  # noqa: F401
    import server.worker  # noqa: F401
    import uvicorn  # noqa: F401

    try:
        import server.postgres  # noqa: F401
    except ImportError:
        pass


def _child(request: dict) -> int:
    """In the forked child: become the server the request asks for, and return its exit code."""
    os.setsid()
    _die_with_parent()
    if request["open_files"]:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (request["open_files"], request["open_files"]))
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 65536)
    # The signals as a fresh interpreter started by the test process has them (as `python -m
    # server.cli` would): SIGPIPE and SIGXFSZ ignored (a write to a reset connection raises, never
    # kills), SIGINT as the test process had it (a KeyboardInterrupt, or ignored in a background job).
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, _STARTED_WITH_SIGINT)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    import io

    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["flux-fill", *request["argv"]]
    from server.cli import main

    return main(request["argv"])


def _serve(statuses: Path) -> None:
    import select

    children: set[int] = set()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            done = statuses / f"{pid}.tmp"
            done.write_text(str(os.waitstatus_to_exitcode(status)))
            done.rename(statuses / str(pid))

    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.05)
        reap()
        if not readable:
            continue
        line = sys.stdin.readline()
        if not line:  # the test process is done: so are its servers
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        children.add(pid)
        print(pid, flush=True)


_STARTED_WITH_SIGINT = signal.getsignal(signal.SIGINT)  # what a fresh interpreter here has

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the test process's to handle
    _preload()
    _serve(Path(sys.argv[1]))
