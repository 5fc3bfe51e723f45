"""Fixtures: the tiny model and an engine built once; live servers on loopback."""

from __future__ import annotations

import os

import pytest

from tests.helpers import LiveServer

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
    started: list[LiveServer] = []

    def start(*args: str, data_dir=None, env=None, open_files=None, command="serve", **kw) -> LiveServer:
        server = LiveServer(data_dir or tmp_path / f"data{len(started)}", args=["--weights", str(tiny_dir), *args],
                            env=env or {}, open_files=open_files, command=command)
        started.append(server)
        return server.start(**kw)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped after it. The server to make it on is
    FLUX_FILL_TEST_DATABASE (a URL whose role may create databases; .ci/run sets it up); without it
    the test is skipped, unless FLUX_FILL_REQUIRE_POSTGRES=1 (CI) makes that a failure."""
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    admin = os.environ.get("FLUX_FILL_TEST_DATABASE")
    if not admin:
        if os.environ.get("FLUX_FILL_REQUIRE_POSTGRES") == "1":
            pytest.fail("FLUX_FILL_TEST_DATABASE is not set, and FLUX_FILL_REQUIRE_POSTGRES=1")
        pytest.skip("no PostgreSQL server to test on (set FLUX_FILL_TEST_DATABASE)")
    psycopg = pytest.importorskip("psycopg")
    name = f"flux_fill_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(admin)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
