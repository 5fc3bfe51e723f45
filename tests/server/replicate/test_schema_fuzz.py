"""schemathesis against the server's own /openapi.json: generated and mutated requests, no 5xx.

Runs the schemathesis CLI in a subprocess against a live server with a token (so the generated
requests get past auth and reach the routes), bounded in examples per operation and in time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOKEN

EXAMPLES_PER_OPERATION = 30
TIME_LIMIT_S = 240


def schemathesis_cli() -> str | None:
    beside = Path(sys.executable).parent / "schemathesis"
    return str(beside) if beside.exists() else shutil.which("schemathesis")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server_factory, tmp_path):
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    server = server_factory("--api-token", TOKEN, "--max-queue", "1000", "--log-level", "warning", "--segmenter", "tiny")
    cmd = [cli, "run", f"{server.url}/openapi.json",
           "--checks", "not_a_server_error",
           "--max-examples", str(EXAMPLES_PER_OPERATION),
           "--phases", "examples,coverage,fuzzing",
           "--header", f"Authorization: Bearer {TOKEN}",
           "--request-timeout", "70",  # a fuzzed `Prefer: wait` may hold a create up to 60 s
           "--workers", "1",  # one thread: two parsing sources at once trip CPython 3.11 (SystemError: AST constructor recursion depth mismatch)
           "--seed", "20241121",
           "--generation-database", "none",
           "--suppress-health-check", "all",
           "--no-color"]
    try:
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran past {TIME_LIMIT_S} s:\n{(exc.stdout or '')[-4000:]}")
    output = done.stdout + done.stderr
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|errored|skipped|generated)\b", line)]
    print("\nschemathesis:\n" + "\n".join(summary[-12:]))
    assert done.returncode == 0, output[-6000:]
    assert "Server error" not in output and "Traceback" not in server.log(), output[-3000:]
