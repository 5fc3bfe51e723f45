"""A node that cannot start says why and what to do, in one sentence, at once: a port that is taken
names the port and --port; a database that cannot be reached names its host, port, role and
database, with the password masked. Real processes, a real socket, a real PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, free_port


def start(*args: str, tmp_path) -> tuple[int, str, float]:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "server.cli", *args, "--data-dir", str(tmp_path / "data")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, result.stderr, time.monotonic() - began


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_taken_port_is_named_with_the_flag_that_changes_it(tmp_path, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr, _ = start(command, "--port", str(port), tmp_path=tmp_path)
    assert code == 3, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"flux-fill {command}: Port {port} is already in use on 127.0.0.1"), last
    assert f"flux-fill {command} --port {port + 1}" in last, last
    assert "Errno" not in stderr and "Traceback" not in stderr


def test_an_unreachable_database_names_where_it_looked_and_masks_the_password(tmp_path):
    port = free_port()  # nothing listens there
    url = f"postgresql://flux:s3cret-pw@127.0.0.1:{port}/fluxdb"
    code, stderr, took = start("serve", "--no-workers", "--port", str(free_port()), "--database", url,
                               tmp_path=tmp_path)
    assert code == 4, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"flux-fill serve: Cannot reach the database at 127.0.0.1 port {port} as role flux, "
                           f"database fluxdb (postgresql://flux:***@127.0.0.1:{port}/fluxdb): "), last
    assert "Start PostgreSQL there, or correct the host and port in --database" in last
    assert "s3cret-pw" not in stderr and "Traceback" not in stderr
    assert took < 60  # said before any model is loaded


def test_a_wrong_password_is_named_with_the_role_and_never_shown(tmp_path):
    from psycopg.conninfo import conninfo_to_dict

    given = os.environ.get("FLUX_FILL_TEST_DATABASE")
    if not given:
        pytest.skip("FLUX_FILL_TEST_DATABASE is not set")
    parts = conninfo_to_dict(given)
    host, port, role = parts.get("host", "localhost"), parts.get("port", "5432"), parts["user"]
    url = f"postgresql://{role}:not-the-password@{host}:{port}/{parts.get('dbname', role)}"
    code, stderr, _ = start("worker", "--port", str(free_port()), "--database", url, tmp_path=tmp_path)
    assert code == 4, stderr
    last = stderr.strip().splitlines()[-1]
    assert f"at {host} port {port} as role {role}" in last and f"{role}:***@" in last, last
    assert "password authentication failed" in last and "Check the role and its password" in last, last
    assert "not-the-password" not in stderr
