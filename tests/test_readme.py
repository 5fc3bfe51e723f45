"""The README's code blocks, run as a newcomer pastes them, against a live server on the demo model.

Every block that can run on a CPU without installing anything runs (the client examples); those
that install packages, download weights or start a server are the setup this test runs in, and
are named here so that a new block is either run or deliberately left out."""

from __future__ import annotations

import re
import subprocess
import sys

from PIL import Image

from tests.helpers import ROOT

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = ("pip install", "hf download", "flux-fill serve")  # setup: packages, weights, the server itself


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block, blockquoted ones included."""
    text = re.sub(r"^> ?", "", (ROOT / "README.md").read_text(), flags=re.M)
    return [(lang, code) for lang, code in FENCE.findall(text)]


def test_every_runnable_readme_block_runs_against_a_live_server(live_server, tmp_path):
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # the examples read docs/house.png as from a checkout
    blocks = readme_blocks()
    run, left = [], []
    for lang, code in blocks:
        (left if any(word in code for word in NOT_RUN) else run).append((lang, code))
    assert len(left) == 3, left  # set up and serve, run the tests, the GPU box
    assert [lang for lang, _ in run] == ["python", "sh", "python"], run
    printed = []
    for lang, code in run:
        code = code.replace("http://127.0.0.1:5000", live_server.url)
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-eo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
        printed.append(result.stdout.strip())
    assert printed[1] == "succeeded"  # the curl example's prediction
    for name in ("out-0.webp", "out.png"):  # the Python clients' outputs, of the house
        with Image.open(tmp_path / name) as out:
            assert abs(out.width / out.height - 4 / 3) < 0.05, (name, out.size)
