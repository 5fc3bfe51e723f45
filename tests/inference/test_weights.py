import shutil

import pytest

from inference.errors import WeightsError
from inference.weights import load_model, resolve_weights


def test_tiny_is_the_default_and_announced_as_demo(tiny_model):
    assert tiny_model.demo and "demo" in tiny_model.name
    kind, path, demo = resolve_weights(None)
    assert kind == "diffusers" and demo and (path / "model_index.json").is_file()


def test_missing_path_is_one_clear_message(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_incomplete_folder_names_what_is_missing(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    for f in (broken / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError) as err:
        load_model(str(broken))
    message = str(err.value)
    assert "vae/" in message and "text_encoder_2/*.safetensors" in message and "weights.md" in message


def test_single_file_needs_components(tmp_path):
    ckpt = tmp_path / "flux1-fill-dev.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(WeightsError, match="--components"):
        load_model(str(ckpt))


def test_repo_id_not_in_cache_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        load_model("black-forest-labs/FLUX.1-Fill-dev")


def test_corrupt_weights_file_is_a_clear_error(tmp_path, tiny_dir):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    with pytest.raises(WeightsError) as err:
        load_model(str(broken))
    assert ("has a broken file: transformer/diffusion_pytorch_model.safetensors is not a readable .safetensors file"
            in str(err.value)) and str(err.value).endswith("download it again (see weights.md).")
