"""Fixtures: the tiny model and an engine built once; live servers on loopback."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

# One thread of torch's own a process, set before torch is imported here or in a server, a fork server
# or a command the tests start. The test processes already share the cores: on the tiny model a second
# thread is overhead (about a fifth more CPU seconds for the same tests, measured alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.helpers import LiveServer, PostgresDatabases, ServerFactory  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKEN = "test-token-123"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from inference.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from inference.weights import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def engine(tiny_model):
    from inference.engine import Engine, EngineSettings

    return Engine(tiny_model, EngineSettings(allow_paths=True))


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, tiny_dir):
    """The server on the tiny model, no token, as a user starts it."""
    server = LiveServer(tmp_path_factory.mktemp("live") / "data", args=["--weights", str(tiny_dir)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, tiny_dir):
    """The server with a token and the /replicate prefix, as a reseller exposes it."""
    server = LiveServer(tmp_path_factory.mktemp("auth") / "data",
                        args=["--weights", str(tiny_dir), "--api-token", TOKEN, "--prefix", "/replicate"]).start()
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path, tiny_dir):
    """Start servers with extra options; each is stopped at the end of the test."""
    factory = ServerFactory(tmp_path, tiny_dir)
    yield factory
    factory.stop_all()


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped after it (see PostgresDatabases)."""
    databases = PostgresDatabases()
    try:
        yield databases.make()
    finally:
        databases.drop_all()


# The files that take longest, longest first: they start first when files run side by side, so no
# worker is left with a long file at the end of the run while the others idle. The rest follow, most
# tests first. Figures of each run: --durations=25 (pyproject's addopts).
LONG_FILES = (
    "tests/server/test_event_loop.py",  # its tests run alone (below): first, while nothing else has begun
    "tests/test_bench.py",
    "tests/server/test_webhook_receiver_faults.py",
    "tests/server/test_postgres_server.py",
    "tests/server/test_chaos.py",
    "tests/server/test_durability.py",
    "tests/server/test_database_faults.py",
    "tests/server/test_hostile_inputs.py",
    "tests/server/test_load.py",
    "tests/server/test_faults.py",
    "tests/server/test_red_team.py",
    "tests/server/test_stored_inputs.py",
    "tests/inference/test_accel.py",
    "tests/inference/test_lora_compiled.py",
    "tests/server/replicate/test_js_client.py",
    "tests/server/replicate/test_contract_postgres_js.py",
    "tests/server/openai_api/test_openai_api.py",
    "tests/test_cli.py",
)


def pytest_xdist_auto_num_workers(config):
    """One test process more than there are cores (``-n auto``, at most --maxprocesses): much of a
    test's time is spent waiting on the servers it started, and a core left idle then is a core
    the run does not get back."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items):
    counts: dict[str, int] = {}
    for item in items:
        counts[item.nodeid.split("::", 1)[0]] = counts.get(item.nodeid.split("::", 1)[0], 0) + 1

    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        if path in LONG_FILES:
            return (0, LONG_FILES.index(path), "")
        return (1, -counts[path], path)

    items.sort(key=rank)  # stable: a file's tests keep their order


# Tests marked `alone` time a server's answers under a load they make themselves: other test files on
# the same cores would be in the figures. While one runs, no other test process runs a test, and the
# others have finished collecting. Two locks shared by the test processes of one run: `shared`,
# held by a process while it collects or runs an ordinary test, taken whole by an `alone` test;
# `gate`, held by an `alone` test from before it waits, so no test starts meanwhile.


class Alone:
    def __init__(self, uid: str):
        folder = Path(tempfile.gettempdir())
        self.paths = [folder / f"flux-fill-tests-{uid}.{name}" for name in ("gate", "shared")]
        self.gate, self.shared = (open(path, "a+") for path in self.paths)
        fcntl.flock(self.shared, fcntl.LOCK_SH)  # collecting
        self.holding_gate = False

    def before(self, alone: bool) -> None:
        if not self.holding_gate:
            fcntl.flock(self.gate, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(self.shared, fcntl.LOCK_EX)
            self.holding_gate = True
        else:
            fcntl.flock(self.shared, fcntl.LOCK_SH)
            fcntl.flock(self.gate, fcntl.LOCK_UN)
            self.holding_gate = False

    def after(self, next_alone: bool) -> None:
        if self.holding_gate and next_alone:
            return  # the next test is alone too: the others stay waiting
        fcntl.flock(self.shared, fcntl.LOCK_UN)
        if self.holding_gate:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
            self.holding_gate = False

    def close(self) -> None:
        for handle, path in zip((self.gate, self.shared), self.paths):
            handle.close()
            path.unlink(missing_ok=True)


def pytest_configure(config):
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # a test process of pytest-xdist
        config.flux_fill_alone = Alone(workerinput["testrunuid"])


def pytest_collection_finish(session):
    alone = getattr(session.config, "flux_fill_alone", None)
    if alone is not None:
        fcntl.flock(alone.shared, fcntl.LOCK_UN)  # collected


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    alone = getattr(item.config, "flux_fill_alone", None)
    if alone is not None:
        alone.before(item.get_closest_marker("alone") is not None)
    try:
        with _cpu_noted(item):
            return (yield)
    finally:
        if alone is not None:
            alone.after(nextitem is not None and nextitem.get_closest_marker("alone") is not None)


def pytest_unconfigure(config):
    alone = getattr(config, "flux_fill_alone", None)
    if alone is not None:
        alone.close()


# FLUX_FILL_TEST_CPU=<file>: each test's CPU seconds, its own process's and every process it started
# (servers, their fork server, clients), appended as "seconds<TAB>wall<TAB>nodeid" lines: what a test
# costs a machine whose cores every test process shares.


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its descendants, those they have reaped included."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(parents.get(pid, ()))
    return total


@contextlib.contextmanager
def _cpu_noted(item):
    path = os.environ.get("FLUX_FILL_TEST_CPU")
    if not path:
        yield
        return
    cpu, wall = _tree_cpu(os.getpid()), time.monotonic()
    try:
        yield
    finally:
        with open(path, "a") as fh:
            fh.write(f"{_tree_cpu(os.getpid()) - cpu:.1f}\t{time.monotonic() - wall:.1f}\t{item.nodeid}\n")
