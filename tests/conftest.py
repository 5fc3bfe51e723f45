"""Fixtures: the tiny model and an engine built once; live servers on loopback."""

from __future__ import annotations

import os

import pytest

from tests.helpers import LiveServer, PostgresDatabases, ServerFactory

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
