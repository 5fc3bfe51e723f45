"""The fork server (tests/forkserver.py) makes servers that are what `python -m server.cli` makes:
here, the signals they ignore and catch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forkserver import ForkedProcess

pytestmark = [pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc"),
              pytest.mark.skipif(os.environ.get("FLUX_FILL_TEST_FORK") == "0", reason="servers are not forked")]


def signal_masks(status: str) -> dict[str, int]:
    """SigIgn and SigCgt of a /proc/<pid>/status text, as bit masks (bit n-1 is signal n)."""
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {name: int(fields[name].strip(), 16) for name in ("SigIgn", "SigCgt")}


def test_a_forked_server_ignores_and_catches_what_a_fresh_interpreter_does(server_factory):
    server = server_factory()
    assert isinstance(server.process, ForkedProcess), "the server was not forked: nothing is compared"
    forked = signal_masks(Path(f"/proc/{server.process.pid}/status").read_text())
    fresh = signal_masks(subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                                        capture_output=True, text=True, check=True).stdout)
    # A fresh interpreter ignores SIGPIPE: a write to a connection its client reset raises, where a
    # server with SIGPIPE at its default dies at once. No signal a fresh interpreter ignores or
    # catches is at its default in the server (which may catch one the interpreter ignored, as
    # uvicorn catches SIGINT in a background job).
    handled = {name: mask["SigIgn"] | mask["SigCgt"] for name, mask in (("fresh", fresh), ("forked", forked))}
    assert handled["fresh"] & ~handled["forked"] == 0, {name: hex(mask) for name, mask in handled.items()}
    assert forked["SigIgn"] & (1 << (signal.SIGPIPE - 1))
