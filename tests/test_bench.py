"""A smoke test of bench/bench.py's CPU mode: it runs and prints its table and ratio lines.
It asserts nothing about the figures themselves."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_cpu_bench_prints_its_table_and_ratios(tiny_dir):
    proc = subprocess.run(
        [sys.executable, "bench/bench.py", "--cpu", "--weights", str(tiny_dir), "--runs", "1", "--sizes", "64",
         "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "pipeline ms" in out and "engine ms" in out and "server ms" in out
    assert "cold start (process start to READY)" in out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("ratio 64x64: server overhead over engine ")
    assert "over pipeline" in lines[-1]


def test_bench_help_lists_the_modes_and_cases():
    out = subprocess.run([sys.executable, "bench/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    for word in ("baseline", "compile", "fast", "step-cache", "offload", "1mp-x4", "0.25mp", "random-real"):
        assert word in out
