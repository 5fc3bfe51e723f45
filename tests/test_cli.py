"""`flux-fill predict`: offline use without a server."""

import shutil
import subprocess
import sys

import pytest
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
    with pytest.raises(RuntimeError, match="setup failed"):
        server_factory("--weights", str(tmp_path / "nowhere"), timeout=60)


# -- the load failures users cause, as `predict` and `serve` tell them: one sentence, no traceback -------------


@pytest.fixture(scope="module")
def broken_weights(tmp_path_factory, tiny_dir):
    """Tiny single files as users break them: a download cut short, and a scaled fp8 file stripped of its
    scales; beside them the components (with the tiny transformer's config, which no file can give)."""
    from inference.testing.checkpoint_files import save_bfl, save_comfy_scaled_fp8, truncate
    from inference.weights import load_model

    folder = tmp_path_factory.mktemp("broken")
    components = folder / "components"
    shutil.copytree(tiny_dir, components)
    for weights in (components / "transformer").glob("*.safetensors"):
        weights.unlink()
    transformer = load_model(str(tiny_dir), device="cpu").pipeline.transformer
    return {
        "truncated": (truncate(save_bfl(transformer, folder / "flux1-fill-dev.safetensors"), keep=0.6),
                      "flux1-fill-dev.safetensors is incomplete: it holds "),
        "scale-less fp8": (save_comfy_scaled_fp8(transformer, folder / "flux1-fill-dev-fp8.safetensors", scales=False),
                           "flux1-fill-dev-fp8.safetensors is marked as ComfyUI scaled fp8 (its scaled_fp8 tensor) but "
                           "holds no scale for its weights"),
        "components": components,
    }


def predict_in_process(capsys, *args: str) -> tuple[int, list[str]]:
    """`flux-fill predict` through the entry point's own main, in this process (no interpreter to start):
    its exit status and its stderr's error lines. An exception escaping it would fail the test."""
    from server.cli import main

    code = main(["predict", *args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_predict_selects_by_mask_prompt_with_a_segmenter_and_says_the_flag_without(tmp_path, tiny_dir, capsys):
    noise_image(64, 48).save(tmp_path / "in.png")
    base = ["--weights", str(tiny_dir), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--mask-prompt", "sky",
            "--num-inference-steps", "2", "--megapixels", "match_input"]
    code, errors = predict_in_process(capsys, *base, "-o", str(tmp_path / "none"))
    assert code == 2 and errors and "mask_prompt" in errors[0] and "--segmenter" in errors[0]
    code, errors = predict_in_process(capsys, *base, "--segmenter", "tiny", "-o", str(tmp_path / "out"))
    assert code == 0, errors
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mask.png", "out-0.webp"]
    assert Image.open(tmp_path / "out" / "mask.png").size == (64, 48)


@pytest.mark.parametrize("case", ["truncated", "scale-less fp8"])
def test_predict_refuses_broken_weights_in_one_sentence(broken_weights, tmp_path, capsys, case):
    path, sentence = broken_weights[case]
    noise_image(64, 64).save(tmp_path / "in.png")
    code, errors = predict_in_process(capsys, "--weights", str(path), "--components", str(broken_weights["components"]),
                                      "--image", str(tmp_path / "in.png"), "--prompt", "x", "--mask",
                                      str(tmp_path / "in.png"))
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {sentence}"), errors
    assert errors[0].endswith(("download it again.", "(see weights.md).")), errors[0]


@pytest.mark.parametrize("case", ["truncated", "scale-less fp8"])
def test_serve_reports_broken_weights_on_health_in_one_sentence(server_factory, broken_weights, case):
    import httpx

    path, sentence = broken_weights[case]
    with pytest.raises(RuntimeError, match="setup failed"):
        server_factory("--weights", str(path), "--components", str(broken_weights["components"]), timeout=60)
    server = server_factory.started[-1]
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "SETUP_FAILED" and health["setup_error"].startswith(sentence), health
    log = server.log()
    assert f"setup failed: {health['setup_error']}" in log and "Traceback" not in log


@pytest.fixture(scope="module")
def lite_lora(tmp_path_factory, tiny_dir):
    """A Kohya LoRA made for a model 2048 wide, in a LoRA folder (the tiny model is 32 wide)."""
    from inference.testing.lora_files import kohya_full_lora
    from inference.weights import load_model

    folder = tmp_path_factory.mktemp("loras")
    kohya_full_lora(load_model(str(tiny_dir), device="cpu").pipeline.transformer, folder / "lite-style.safetensors",
                    width=2048)
    return folder


LITE_SENTENCE = ("lite-style.safetensors was made for a model of another size: its double_blocks.0.img_attn.qkv takes "
                 "2048 input features where this model's takes 32")


def test_predict_refuses_a_lora_of_another_width_in_one_sentence(lite_lora, tiny_dir, tmp_path, capsys):
    noise_image(64, 64).save(tmp_path / "in.png")
    box_mask(64, 64, (8, 8, 40, 40)).save(tmp_path / "mask.png")
    code, errors = predict_in_process(capsys, "--weights", str(tiny_dir), "--image", str(tmp_path / "in.png"),
                                      "--mask", str(tmp_path / "mask.png"), "--prompt", "x", "--num-inference-steps",
                                      "2", "--lora-dir", str(lite_lora), "--lora-weights", "lite-style", "-o",
                                      str(tmp_path / "out"))
    assert code == 2 and errors == [f"error: lora_weights: {LITE_SENTENCE}"], errors
    assert not (tmp_path / "out").exists()


def test_serve_fails_a_prediction_with_a_lora_of_another_width_in_one_sentence(server_factory, lite_lora):
    import httpx

    from tests.helpers import data_uri

    server = server_factory("--lora-dir", str(lite_lora))
    body = {"input": {"prompt": "x", "image": data_uri(noise_image(64, 64)), "mask": data_uri(box_mask(64, 64, (8, 8, 40, 40))),
                      "num_inference_steps": 2, "lora_weights": "lite-style"}}
    r = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions", json=body,
                   headers={"Prefer": "wait"}, timeout=120)
    prediction = r.json()
    assert prediction["status"] == "failed" and prediction["error"] == f"lora_weights: {LITE_SENTENCE}", prediction
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "READY"
