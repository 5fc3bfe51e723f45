"""`flux-fill predict`: offline use without a server."""

import subprocess
import sys

from PIL import Image

from tests.helpers import ROOT, box_mask, noise_image


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def test_predict_writes_outputs_with_progress(tmp_path, tiny_dir):
    noise_image(64, 64).save(tmp_path / "in.png")
    box_mask(64, 64, (8, 8, 40, 40)).save(tmp_path / "mask.png")
    r = run_cli("predict", "--weights", str(tiny_dir), "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "mask.png"), "--prompt", "a cat", "--megapixels", "match_input",
                "--num-inference-steps", "3", "--num-outputs", "2", "--seed", "9", "--output-format", "png",
                "--preserve-unmasked", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "Using seed: 9" in r.stderr and "3/3" in r.stderr and "Demo model" in r.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["out-0.png", "out-1.png"]
    assert Image.open(tmp_path / "out" / "out-0.png").size == (64, 64)


def test_predict_bad_input_and_missing_weights_are_clear(tmp_path):
    noise_image(64, 64).save(tmp_path / "in.png")
    r = run_cli("predict", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--num-outputs", "7")
    assert r.returncode == 2 and "--num-outputs: Must be less than or equal to 4" in r.stderr
    r = run_cli("predict", "--weights", str(tmp_path / "missing"), "--image", str(tmp_path / "in.png"),
                "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--mask", "gopher://x/y")
    assert r.returncode == 2 and "mask" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_missing_weights_reports_setup_failed(server_factory, tmp_path):
    import pytest

    with pytest.raises(RuntimeError, match="setup failed"):
        server_factory("--weights", str(tmp_path / "nowhere"), timeout=60)
