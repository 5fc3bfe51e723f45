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
