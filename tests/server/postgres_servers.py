"""Fixtures that start every server of a test module on a PostgreSQL database instead of SQLite:
import them (with the module's tests) into a module to run its tests on PostgreSQL too."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN
from tests.helpers import LiveServer, PostgresDatabases, ServerFactory


@pytest.fixture(scope="module")
def new_database():
    """Makes fresh PostgreSQL databases (see PostgresDatabases); all dropped at the end."""
    databases = PostgresDatabases()
    yield databases.make
    databases.drop_all()


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
    factory = ServerFactory(tmp_path, tiny_dir, database_for=new_database)
    yield factory
    factory.stop_all()
