"""Fixtures that start every server of a test module on a PostgreSQL database instead of SQLite:
import them (with the module's tests) into a module to run its tests on PostgreSQL too."""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import TOKEN
from tests.helpers import LiveServer


@pytest.fixture(scope="module")
def new_database():
    """Makes fresh PostgreSQL databases on FLUX_FILL_TEST_DATABASE's server; all dropped at the end."""
    admin = os.environ.get("FLUX_FILL_TEST_DATABASE")
    if not admin:
        if os.environ.get("FLUX_FILL_REQUIRE_POSTGRES") == "1":
            pytest.fail("FLUX_FILL_TEST_DATABASE is not set, and FLUX_FILL_REQUIRE_POSTGRES=1")
        pytest.skip("no PostgreSQL server to test on (set FLUX_FILL_TEST_DATABASE)")
    psycopg = pytest.importorskip("psycopg")
    made: list[str] = []

    def make() -> str:
        name = f"flux_fill_test_{secrets.token_hex(6)}"
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))

    yield make
    with psycopg.connect(admin, autocommit=True) as db:
        for name in made:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, tiny_dir, new_database):
    server = LiveServer(tmp_path_factory.mktemp("live-pg") / "data",
                        args=["--weights", str(tiny_dir), "--database", new_database()]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny_dir, new_database):
    server = LiveServer(tmp_path_factory.mktemp("auth-pg") / "data",
                        args=["--weights", str(tiny_dir), "--api-token", TOKEN, "--prefix", "/replicate",
                              "--database", new_database()]).start()
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path, tiny_dir, new_database):
    """As the SQLite one; a server started again on the same data folder finds the same database."""
    started: list[LiveServer] = []
    databases: dict = {}

    def start(*args: str, data_dir=None, env=None, open_files=None, command="serve", **kw) -> LiveServer:
        data = data_dir or tmp_path / f"data{len(started)}"
        if data not in databases:
            databases[data] = new_database()
        server = LiveServer(data, args=["--weights", str(tiny_dir), "--database", databases[data], *args],
                            env=env or {}, open_files=open_files, command=command)
        started.append(server)
        return server.start(**kw)

    yield start
    for server in started:
        server.stop()
