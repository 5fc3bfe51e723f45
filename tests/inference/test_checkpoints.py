"""Single-file checkpoints as users have them, each made here in its exact on-disk layout at FLUX.1's
real width: BFL's layout (bare and under ``model.diffusion_model.``), plain fp8, ComfyUI's scaled fp8,
GGUF. Each is checked against a reference built from the file's own values by diffusers' converter,
and every one loads offline from a components folder with no transformer config."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from inference import accel, checkpoints
from inference.errors import WeightsError
from inference.testing.checkpoint_files import save_bfl, save_comfy_scaled_fp8, save_fp8, save_gguf, to_bfl, truncate
from inference.weights import load_model
from tests.inference.conftest import REAL_WIDTH_CONFIG, forward, random_transformer, transformer_inputs

INPUTS = transformer_inputs(REAL_WIDTH_CONFIG)


def diffusers_names(bfl: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))


def model_from(state: dict, config=REAL_WIDTH_CONFIG):
    """A float32 transformer holding exactly ``state`` (diffusers' names)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def file_values(path, prefix="model.diffusion_model.", scale_suffix=".scale_weight"):
    """What a (scaled) fp8 file means: each weight's fp8 values times its scale, BFL names."""
    raw = load_file(str(path))
    values = {}
    for key, value in raw.items():
        if not key.startswith(prefix) or key.endswith((scale_suffix, ".scale_input", ".input_scale")):
            continue
        name = key[len(prefix):]
        scale = raw.get(f"{key[: -len('.weight')]}{scale_suffix}") if key.endswith(".weight") else None
        values[name] = value.float() * (scale.float() if scale is not None else 1.0)
    return values


def same_values(ours, reference):
    """Equal but for float32 rounding: an fp8 layer dequantises its weight and multiplies with matmul +
    bias, the reference with F.linear, whose kernels sum in another order."""
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def no_grad_anywhere(pipe) -> bool:
    return not any(p.requires_grad for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())


def test_the_bfl_writer_is_the_inverse_of_diffusers_converter(real_width_transformer):
    state = real_width_transformer.state_dict()
    back = diffusers_names(to_bfl(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_bfl_single_file_loads_offline_with_its_config_read_off_the_file(real_width_transformer, components,
                                                                          tmp_path, prefix):
    assert not (components / "transformer").exists()  # nothing to read a config from but the file
    path = save_bfl(real_width_transformer, tmp_path / "flux1-fill-dev.safetensors", prefix=prefix, dtype=torch.float32)
    model = load_model(str(path), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    for key, value in REAL_WIDTH_CONFIG.items():
        assert tuple(getattr(transformer.config, key)) == value if key == "axes_dims_rope" else \
            getattr(transformer.config, key) == value, key
    state, source = transformer.state_dict(), real_width_transformer.state_dict()
    assert set(state) == set(source) and all(torch.equal(state[k], source[k]) for k in source)
    assert no_grad_anywhere(model.pipeline) and not transformer.training
    assert model.extras["checkpoint"] == "safetensors, BFL layout"


def test_an_fp8_file_stays_fp8_and_computes_what_the_file_holds(real_width_transformer, components, tmp_path):
    path = save_fp8(real_width_transformer, tmp_path / "flux1-fill-dev-fp8.safetensors")
    model = load_model(str(path), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    linears = list(accel._block_linears(transformer))
    assert linears and all(accel._is_fp8(m.weight) and m.weight.qdata.dtype == torch.float8_e4m3fn for m in linears)
    elements = sum(m.weight.numel() for m in linears)
    assert accel._linear_bytes(transformer) < 1.1 * elements + 64 * 1024**2  # a byte an element, no wide copy
    reference = model_from(diffusers_names(file_values(path)))
    same_values(forward(transformer, INPUTS), forward(reference, INPUTS))
    assert no_grad_anywhere(model.pipeline)
    assert model.extras["checkpoint"] == "fp8, BFL layout"


def test_the_fp8_memory_mode_keeps_an_fp8_files_weights(real_width_transformer, components, tmp_path):
    """The 24 GB mode finds the transformer already in fp8: its weights stay the file's own (not
    quantised a second time) and only T5 is quantised."""
    path = save_fp8(real_width_transformer, tmp_path / "fp8.safetensors")
    model = load_model(str(path), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    before = {id(m): m.weight.qdata.clone() for m in accel._block_linears(transformer)}
    speed = accel.apply(model, accel.AccelOptions(memory_mode="fp8", compile=False))
    after = {id(m): m.weight.qdata for m in accel._block_linears(transformer)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    assert all(accel._is_fp8(m.weight) for m in model.pipeline.text_encoder_2.modules()
               if isinstance(m, torch.nn.Linear))
    assert any("the checkpoint's own quantised weights" in line for line in speed.applied), speed.applied


def test_comfyui_scaled_fp8_applies_its_scales(real_width_transformer, components, tmp_path):
    path = save_comfy_scaled_fp8(real_width_transformer, tmp_path / "flux1-fill-dev-fp8-scaled.safetensors")
    model = load_model(str(path), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    assert all(accel._is_fp8(m.weight) for m in accel._block_linears(transformer))
    reference = model_from(diffusers_names(file_values(path)))
    ours = forward(transformer, INPUTS)
    assert torch.isfinite(ours).all()
    same_values(ours, forward(reference, INPUTS))
    # Read without its scales the file means something else entirely.
    unscaled = {k[len("model.diffusion_model."):]: v.float() for k, v in load_file(str(path)).items()
                if k.startswith("model.diffusion_model.") and not k.endswith(("scale_weight", "scale_input"))}
    wrong = forward(model_from(diffusers_names(unscaled)), INPUTS)
    assert not torch.allclose(wrong, ours, atol=1e-2)
    assert model.extras["checkpoint"] == "ComfyUI scaled fp8, BFL layout"


def test_a_gguf_file_loads_through_diffusers_gguf_quantizer(real_width_transformer, components, tmp_path):
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    quantised = {"double_blocks.0.img_attn.qkv.weight": "Q8_0", "single_blocks.0.linear2.weight": "Q4_0",
                 "img_in.weight": "Q8_0"}
    values = save_gguf(real_width_transformer, tmp_path / "flux1-fill-dev-Q8_0.gguf", quantised)
    model = load_model(str(tmp_path / "flux1-fill-dev-Q8_0.gguf"), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    kept = [name for name, p in transformer.named_parameters() if isinstance(p, GGUFParameter)]
    assert "transformer_blocks.0.attn.to_q.weight" in kept and "single_transformer_blocks.0.proj_out.weight" in kept
    reference = model_from(diffusers_names(values))
    expected = forward(reference, INPUTS)
    same_values(forward(transformer, INPUTS), expected)
    assert no_grad_anywhere(model.pipeline)
    assert model.extras["checkpoint"] == "GGUF, BFL layout"
    # The fp8 memory mode leaves the GGUF layers as the file has them (fp8 goes where weights are wide).
    packed = {name: p.detach().clone() for name, p in transformer.named_parameters() if isinstance(p, GGUFParameter)}
    speed = accel.apply(model, accel.AccelOptions(memory_mode="fp8", compile=False))
    after = {name: p for name, p in transformer.named_parameters() if isinstance(p, GGUFParameter)}
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    assert any("the checkpoint's own quantised weights" in line for line in speed.applied)
    out = forward(transformer, INPUTS)
    assert torch.isfinite(out).all() and (out - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_gguf_without_the_package_names_the_extra(tmp_path, components, monkeypatch):
    path = tmp_path / "flux1-fill-dev-Q4_K.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(WeightsError, match=r"pip install 'flux-fill-server\[gguf\]'"):
        load_model(str(path), components=str(components), device="cpu")


@pytest.mark.parametrize(("guidance", "name"), [(True, "FLUX.1 [dev]"), (False, "FLUX.1 [schnell]")])
def test_a_flux_dev_single_file_is_refused_by_name_before_loading(tmp_path, components, monkeypatch, guidance, name):
    from inference.tiny import TRANSFORMER_CONFIG

    dev = random_transformer({**TRANSFORMER_CONFIG, "in_channels": 16, "guidance_embeds": guidance})
    path = save_bfl(dev, tmp_path / "flux1-dev.safetensors")
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("the tensors were read"))
    with pytest.raises(WeightsError) as err:
        load_model(str(path), components=str(components), device="cpu")
    assert f"is {name}, not FLUX.1 Fill [dev]" in str(err.value) and "16 input channels" in str(err.value)


def test_a_flux_dev_folder_is_refused_before_loading(tmp_path, tiny_dir, monkeypatch):
    from diffusers import FluxFillPipeline

    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_dir, folder)
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 16}))
    monkeypatch.setattr(FluxFillPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    with pytest.raises(WeightsError, match=r"is FLUX\.1 \[dev\], not FLUX\.1 Fill \[dev\]"):
        load_model(str(folder), device="cpu")


def test_the_variant_is_read_from_the_header_alone(tmp_path, real_width_transformer):
    path = save_bfl(real_width_transformer, tmp_path / "fill.safetensors", prefix="model.diffusion_model.")
    info = checkpoints.inspect(path)
    assert info.prefix == "model.diffusion_model." and info.layout == "bfl" and info.in_channels == 288
    assert checkpoints.variant_name(384, 16, True) is None  # the real FLUX.1 Fill [dev]
    assert checkpoints.variant_name(64, 16, True) == "FLUX.1 [dev]"
    assert checkpoints.variant_name(128, 16, True) == "FLUX.1 Canny [dev] or FLUX.1 Depth [dev]"


# -- the load failures users cause: each names the file and the fix, before anything is served ------------


@pytest.fixture(scope="module")
def tiny_components(tiny_dir, tmp_path_factory):
    """The tiny model's components with its transformer's config but not its weights, for single files of
    the tiny transformer (its heads are not FLUX.1's, so its config cannot be read off a file)."""
    folder = tmp_path_factory.mktemp("tiny-components") / "components"
    shutil.copytree(tiny_dir, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def tiny_transformer(tiny_model):
    return tiny_model.pipeline.transformer


def refused(path, components) -> str:
    with pytest.raises(WeightsError) as err:
        load_model(str(path), components=str(components), device="cpu")
    return str(err.value)


def test_a_truncated_single_file_is_named_with_the_fix(tiny_transformer, tiny_components, tmp_path, monkeypatch):
    path = truncate(save_bfl(tiny_transformer, tmp_path / "flux1-fill-dev.safetensors"), keep=0.6)
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("the tensors were read"))
    message = refused(path, tiny_components)
    assert message.startswith("flux1-fill-dev.safetensors is incomplete: it holds ")
    assert "as a download cut short leaves a file; download it again." in message


def test_a_file_that_is_no_safetensors_is_named_with_the_fix(tiny_components, tmp_path):
    path = tmp_path / "flux1-fill-dev.safetensors"
    path.write_text("<html><body>Access denied</body></html>")
    message = refused(path, tiny_components)
    assert message.startswith("flux1-fill-dev.safetensors is not a readable .safetensors file")
    assert message.endswith("download it again.")


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "truncated vae"])
def test_a_broken_file_in_a_weights_folder_is_named_before_loading(tiny_dir, tmp_path, monkeypatch, damage):
    from diffusers import FluxFillPipeline

    folder = tmp_path / "FLUX.1-Fill-dev"
    shutil.copytree(tiny_dir, folder)
    if damage == "truncated shard":
        truncate(next((folder / "transformer").glob("*.safetensors")), keep=0.9)
        expected = "has a broken file: transformer/diffusion_pytorch_model.safetensors is incomplete"
    elif damage == "truncated vae":
        truncate(next((folder / "vae").glob("*.safetensors")), keep=0.3)
        expected = "has a broken file: vae/diffusion_pytorch_model.safetensors is incomplete"
    else:
        (folder / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        expected = ("is incomplete: text_encoder_2/model.safetensors.index.json lists "
                    "model-00002-of-00002.safetensors, which is missing; download it again")
    monkeypatch.setattr(FluxFillPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    with pytest.raises(WeightsError) as err:
        load_model(str(folder), device="cpu")
    assert expected in str(err.value) and str(folder) in str(err.value)


def test_a_truncated_gguf_is_named_with_the_fix(tiny_transformer, tiny_components, tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "flux1-fill-dev-Q8_0.gguf"
    save_gguf(tiny_transformer, path, {})
    message = refused(truncate(path, keep=0.7), tiny_components)
    assert message.startswith("flux1-fill-dev-Q8_0.gguf is not a readable GGUF file (")
    assert "it is incomplete, as a download cut short leaves a file, or damaged; download it again." in message


@pytest.mark.parametrize(("layout", "expected"), [
    (dict(scales=False), "is marked as ComfyUI scaled fp8 (its scaled_fp8 tensor) but holds no scale for its weights"),
    (dict(scales=False, marker=False), "fp8 weights were scaled (the values of double_blocks.0.img_attn.proj.weight "
                                       "fill fp8's whole range) but the file has no scales at all"),
    (dict(scale_suffix=".weight_scale_2", input_suffix=".input_scale"),
     "keeps its fp8 scales under names this server does not read (e.g. double_blocks.0.img_attn.proj.weight_scale_2"),
])
def test_fp8_without_usable_scales_is_refused_at_load(tiny_transformer, tiny_components, tmp_path, layout, expected):
    """Read without its scales a scaled file gives NaN on every prediction: refused at load, never READY."""
    path = save_comfy_scaled_fp8(tiny_transformer, tmp_path / "flux1-fill-dev-fp8-scaled.safetensors", **layout)
    message = refused(path, tiny_components)
    assert message.startswith("flux1-fill-dev-fp8-scaled.safetensors") and expected in message, message
    assert "see weights.md" in message


def test_scales_named_weight_scale_one_a_row_are_read(real_width_transformer, components, tmp_path):
    """compressed-tensors' and ModelOpt's names (weight_scale, input_scale), one scale per output row: read
    as what they mean, through the BFL converter's splits of the fused layers."""
    path = save_comfy_scaled_fp8(real_width_transformer, tmp_path / "fill-fp8-channelwise.safetensors",
                                 scale_suffix=".weight_scale", input_suffix=".input_scale", marker=False, per_row=True)
    model = load_model(str(path), components=str(components), device="cpu")
    transformer = model.pipeline.transformer
    assert all(accel._is_fp8(m.weight) for m in accel._block_linears(transformer))
    reference = model_from(diffusers_names(file_values(path, scale_suffix=".weight_scale")))
    ours = forward(transformer, INPUTS)
    assert torch.isfinite(ours).all()
    same_values(ours, forward(reference, INPUTS))
    assert model.extras["checkpoint"] == "scaled fp8, BFL layout"


@pytest.mark.parametrize(("cut", "expected"), [
    (lambda data: b"", lambda n: "is incomplete: it holds nothing, as a download cut short leaves a file; download it "
                                 "again"),
    (lambda data: data[:40], lambda n: "is incomplete: it holds 40 bytes, less than its header alone ("),
    (lambda data: data[:-100], lambda n: f"is incomplete: it holds {n - 100} bytes of the {n} bytes its header "
                                         "describes"),
    (lambda data: data + b"\0" * 10, lambda n: f"is damaged: its tensors do not fill it as its header says ({n + 10} "
                                                f"bytes on disk, {n} bytes described)"),
    (lambda data: b"<!DOCTYPE html>" + data, lambda n: "is not a readable .safetensors file (its header cannot be "
                                                       "read)"),
])
def test_each_way_a_safetensors_file_breaks_is_said(tmp_path, cut, expected):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.zeros(10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(cut(data))
    with pytest.raises(ValueError) as err:
        checkpoints.safetensors_header(path, complete=True)
    assert str(err.value).startswith(f"model.safetensors {expected(len(data))}"), str(err.value)
