"""A smoke test of bench/bench.py's CPU mode: it runs and prints its table and ratio lines.
It asserts nothing about the figures themselves."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


def test_the_previews_bench_prints_their_share_of_a_prediction(tiny_dir):
    """bench/previews.py on the tiny model: previews off and on in one run, and what one costs."""
    proc = subprocess.run(
        [sys.executable, "bench/previews.py", "--device", "cpu", "--weights", str(tiny_dir), "--steps", "9",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("previews off ") and "(8 previews, every one wanted)" in lines[0]
    assert lines[1].startswith("one projection ") and "of a step" in lines[1]
    assert lines[-1].startswith("ratio previews' share of a prediction on cpu: ") and lines[-1].endswith("%")


def test_bench_help_lists_the_modes_and_cases():
    out = subprocess.run([sys.executable, "bench/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    for word in ("baseline", "eager", "fast", "step-cache", "fp8-offload", "offload", "1mp-x4", "0.25mp", "random-real"):
        assert word in out


@pytest.mark.timeout(900)  # a whole benchmark run on the CPU; slow on a loaded machine
def test_gpu_report_runs_on_the_cpu(tiny_dir):
    """The GPU report's own code (modes as server processes, the diffusers baseline, the error check,
    the tables and ratios), run on the CPU so that a GPU session spends its time measuring."""
    proc = subprocess.run(
        [sys.executable, "bench/bench.py", "--device", "cpu", "--weights", str(tiny_dir), "--modes",
         "baseline,eager,default,step-cache,fp8,offload", "--cases", "0.25mp", "--reference-case", "0.25mp",
         "--steps", "1", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = {line.split()[0]: line for line in out.splitlines() if " 0.25mp " in line and not line.startswith("ratio")}
    assert set(rows) == {"baseline", "eager", "default", "step-cache", "fp8"}
    assert rows["eager"].rstrip().endswith("%")  # the server's overhead over the engine's own time
    # offload needs a GPU: its row says why, and the other modes still report
    assert "offload      failed: server setup failed: --memory-mode offload offloads to a GPU" in out
    summary = {line.split()[0]: line for line in out.splitlines() if "fp8 weights in the transformer" in line
               or "first-block step cache" in line}
    assert set(summary) == {"fp8", "step-cache"}
    fp8_error = float(summary["fp8"].split()[4])
    assert 0 < fp8_error < 0.05  # fp8 weights against the default (float32 here) output
    ratios = [line for line in out.splitlines() if line.startswith("ratio ")]
    assert [r.split()[1] for r in ratios] == ["eager", "default", "step-cache", "fp8"]
    assert all(" vs baseline (speed-up): 0.25mp " in r for r in ratios)


@pytest.mark.timeout(900)  # a whole benchmark run on the CPU; slow on a loaded machine
def test_the_gpu_check_runs_its_cpu_smoke_mode(tiny_dir, tmp_path):
    """bench/gpu_check.py, the one command a GPU session runs, on the CPU with the tiny model: every
    section it can run here reports figures, the CUDA-only ones say why they did not run."""
    import json

    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--weights", str(tiny_dir),
                           "--out", str(report_path), "--prompts", "18"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert list(sections) == ["build", "baseline", "eager", "previews", "formats", "lora_eager", "step_cache",
                              "compiled", "lora_compiled", "memory_flat", "memory_modes", "segmenter", "fp8_compiled"]
    for name in ("build", "baseline", "eager", "previews", "formats", "lora_eager", "step_cache", "compiled",
                 "lora_compiled", "memory_flat"):
        assert "error" not in sections[name] and "skipped" not in sections[name], sections[name]
    formats = sections["formats"]
    plain, peft_layers = {"peft_layers": 0, "compiled_blocks": 0}, "peft_layers"
    assert formats["lora"] == {"base_back_bit_for_bit": True, "changed_the_output": True, "tree_after": plain}
    # each section measured the module tree it names: no LoRA's peft layers left behind by an earlier one
    for name in ("baseline", "eager", "step_cache"):
        assert sections[name]["tree"] == plain, (name, sections[name]["tree"])
    assert sections["lora_eager"]["tree"][peft_layers] > 0 and sections["lora_eager"]["tree"]["compiled_blocks"] == 0
    assert sections["compiled"]["tree"]["compiled_blocks"] == 2 and sections["compiled"]["tree"][peft_layers] > 0
    switch = sections["lora_compiled"]
    assert switch["graphs_built"] == 0 and sections["compiled"]["recompiles_after_warmup"] == 0  # no LoRA compiles
    assert sections["lora_eager"]["graphs_built"] == 0
    assert all(switch[run]["e2e_s"] > 0 for run in ("first_a", "steady_a", "first_b", "steady_b", "none"))
    assert switch["rel_error_vs_eager"] < 0.01 and switch["first_a_vs_eager"] > 0
    for layout in ("bfl", "fp8"):  # scaled fp8 and GGUF: the same code, on a GPU only
        assert formats[layout]["finite"] and formats[layout]["rel_error_vs_source"] < 0.1, formats[layout]
    assert formats["gguf"]["skipped"].startswith("on a GPU only")
    assert formats["fp8"]["weights_mib"] < 0.6 * formats["bfl"]["weights_mib"]
    assert sections["previews"]["previews_per_prediction"] >= 1 and "share" in sections["previews"]
    for name in ("baseline", "eager", "step_cache", "compiled"):
        assert sections[name]["e2e_s"] > 0 and sections[name]["step_s"] > 0
    assert sections["compiled"]["rel_error_vs_eager"] < 0.01 and sections["compiled"]["speedup_vs_eager"] > 0
    assert sections["step_cache"]["threshold"] == 0.08
    flat = sections["memory_flat"]
    assert flat["flat"] and flat["embeddings_with_a_graph"] == 0 and flat["cache_entries"] == flat["cache_limit"]
    assert sections["memory_modes"] == {"skipped": "needs a CUDA GPU"}
    assert sections["segmenter"]["skipped"].startswith("no --segmenter")
    assert sections["fp8_compiled"] == {"skipped": "optional: --fp8-compile runs it last (compiling fp8 blocks takes "
                                                   "minutes)"}
    # it runs inside the CUDA image, which has no tests/
    assert not re.search(r"^\s*(from|import)\s+tests\b", (ROOT / "bench" / "gpu_check.py").read_text(), re.M)
    assert f"report: {report_path}" in proc.stdout


def test_the_durability_bench_prints_what_durable_commits_cost(postgres_url):
    """bench/durability.py on a scratch database: durable and unflushed commits in one run, and their ratio."""
    proc = subprocess.run(
        [sys.executable, "bench/durability.py", "--database", postgres_url, "--predictions", "16", "--clients", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["commits", "clients"] and len(lines) == 7
    assert lines[-1].startswith("ratio 2 client(s): durable commits give ") and "create latency" in lines[-1]


def test_the_masks_bench_prints_click_and_text_to_mask_times():
    """bench/masks.py on the tiny segmenter: a first and a next click, a box and text to mask at one
    picture size, and the ratios text/click and first/next click of the same run."""
    proc = subprocess.run(
        [sys.executable, "bench/masks.py", "--device", "cpu", "--sizes", "320x240", "--runs", "2", "--warmup", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device cpu: ms from the call to the mask, median and p90 of 2 runs")
    assert lines[1].startswith("tiny: ") and " M parameters" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "picture", "1st", "click", "p90", "next", "clk", "p90", "box", "p50",
                                     "p90", "text", "p50", "p90", "regions"]
    cells = lines[header + 1].split()
    assert cells[:2] == ["tiny", "320x240"] and len(cells) == 11
    click, click90, after, after90, box, box90, text, text90 = map(float, cells[2:10])
    assert 0 < click <= click90 and 0 < after <= after90 and 0 < box <= box90 and 0 < text <= text90
    assert re.fullmatch(r"ratio text/click tiny 320x240: \d+\.\d\dx \(\d+ regions?\)", lines[-2]), lines[-2]
    assert re.fullmatch(r"ratio first/next click tiny 320x240: \d+\.\dx \(the picture's embeddings kept\)",
                        lines[-1]), lines[-1]
