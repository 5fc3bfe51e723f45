"""A PostgreSQL server of the test's own, to restart and kill: a cluster made with initdb in a folder
of its own, on a free port, never the server the other tests use (FLUX_FILL_TEST_DATABASE).

Needs PostgreSQL's server programs (Debian's ``postgresql`` package: initdb, pg_ctl); without them
the test is skipped, unless FLUX_FILL_REQUIRE_POSTGRES=1 (CI) makes that a failure. As root (CI),
the cluster runs as the ``postgres`` user, which initdb requires."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

SKEW_DIR = Path(__file__).resolve().parent / "clock_skew"


def clock_skew_env(offset_s: float) -> dict[str, str]:
    """The environment of a server process whose wall clock is ``offset_s`` seconds off (see
    clock_skew/sitecustomize.py): a node of the fleet whose clock drifted."""
    return {"PYTHONPATH": str(SKEW_DIR), "FLUX_FILL_TEST_CLOCK_OFFSET_S": str(offset_s)}


def _bindir() -> Path | None:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    """initdb, start, restart (fast or immediate), kill -9 and start again; ``url`` reaches it."""

    def __init__(self):
        bindir = _bindir()
        if bindir is None:
            if os.environ.get("FLUX_FILL_REQUIRE_POSTGRES") == "1":
                pytest.fail("PostgreSQL's server programs (initdb, pg_ctl) are not installed, and CI requires them")
            pytest.skip("needs PostgreSQL's server programs (initdb, pg_ctl)")
        self.bin = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="flux-fill-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "flux_fill", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                       "max_connections = 300\nshared_buffers = 32MB\n")
        self.url = f"postgresql://flux_fill@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / program), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> "PostgresCluster":
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self._reaper()
        return self

    def _reaper(self) -> None:
        """A process that stops the cluster when this test process dies, even by kill -9 (the server
        runs apart from it, as pg_ctl starts it): told by the parent-death signal, or by seeing
        its parent gone."""
        if getattr(self, "reaper", None) is not None and self.reaper.poll() is None:
            return
        stop = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        if self.as_postgres:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        code = ("import os, signal, subprocess, sys, time\n"
                "parent = os.getppid()\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                "try:\n"
                "    while os.getppid() == parent:\n"
                "        time.sleep(0.5)\n"
                "finally:\n"
                f"    subprocess.run({stop!r}, capture_output=True)\n")

        def die_with_parent():
            import ctypes

            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass

        self.reaper = subprocess.Popen([sys.executable, "-c", code], preexec_fn=die_with_parent,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """pg_ctl restart: ``fast`` (a clean shutdown that ends every session) or ``immediate``
        (every process quits at once, as in a crash; the restart replays the write-ahead log)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "-t", "60", "restart")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """kill -9 of the server and every process of it: no shutdown code runs, nothing is flushed."""
        pid = self.pid()
        if pid is None:
            return
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]
        for victim in [pid, *children]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in [pid, *children]) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Dead, but not yet reaped by init: PostgreSQL would take the zombie for a live server.
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            (self.data / "postmaster.pid").unlink(missing_ok=True)

    def close(self) -> None:
        reaper = getattr(self, "reaper", None)
        if reaper is not None:
            reaper.kill()  # no stop of its own: the cluster is killed here
            reaper.wait(10)
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL server of this module's own, started; killed and removed at the end."""
    made = PostgresCluster()
    try:
        yield made.start()
    finally:
        made.close()
