"""LoRAs: read exactly as diffusers' FluxFillPipeline.load_lora_weights reads them, and never outliving
their prediction.

The formats are compared with diffusers' own loading at FLUX.1's real width (its converters split
the fused layers at 3072), each on a transformer of its own, so nothing ours does can leak into the
reference. The lifecycle (norms, A then B, failed loads, refusals) runs on the tiny model, through
the engine, and checks the transformer's every tensor bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from inference.engine import Engine, EngineSettings
from inference.errors import LoraError
from inference.inputs import parse_input
from inference.lora import LoraManager, LoraSettings
from inference.testing.lora_files import (bfl_a_b_lora, comfyui_lora, diffusers_lora, kohya_full_lora, peft_lora,
                                          xlabs_lora)
from tests.helpers import box_mask, fast_input, noise_image
from tests.inference.conftest import REAL_WIDTH_CONFIG, forward, transformer_inputs

INPUTS = transformer_inputs(REAL_WIDTH_CONFIG)
SCALE = 0.7


def make_pipeline(tiny_model, transformer):
    """A FluxFillPipeline of the tiny components around ``transformer``, with its own text encoders
    (a reference load may put a LoRA on CLIP)."""
    from diffusers import FluxFillPipeline

    pipe = tiny_model.pipeline
    return FluxFillPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=copy.deepcopy(pipe.text_encoder),
                            tokenizer=pipe.tokenizer, text_encoder_2=copy.deepcopy(pipe.text_encoder_2),
                            tokenizer_2=pipe.tokenizer_2, transformer=transformer)


def snapshot(transformer) -> dict:
    """Every base tensor, by its base name (peft's base_layer removed)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in transformer.state_dict().items()
            if "lora_" not in k}


def assert_same_tensors(transformer, before: dict):
    """Every base tensor as in ``before``, bit for bit (compared in place: no copy of the model)."""
    after = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"changed: {changed[:5]}"


def sharing_copy(transformer):
    """A copy of the module tree sharing every tensor with ``transformer``: a LoRA's peft layers go into
    the copy's modules, and a LoRA that wrote into a base tensor would show in ``real_width_base``. (A
    deep copy of FLUX.1's real width costs seconds and gigabytes.)"""
    shared = {id(t): t for t in [*transformer.parameters(), *transformer.buffers()]}
    return copy.deepcopy(transformer, shared)


@pytest.fixture(scope="module")
def real_width_base(real_width_transformer):
    """The real-width transformer's tensors, copied once for the module's bit-for-bit checks."""
    return snapshot(real_width_transformer)


@pytest.fixture(scope="module")
def ours(tiny_model, real_width_transformer):
    return make_pipeline(tiny_model, sharing_copy(real_width_transformer))


@pytest.fixture(scope="module")
def reference(tiny_model, real_width_transformer):
    return make_pipeline(tiny_model, sharing_copy(real_width_transformer))


@pytest.fixture(scope="module")
def base_output(real_width_transformer):
    return forward(real_width_transformer, INPUTS)


def ours_with(pipe, path, scale=SCALE):
    manager = LoraManager(pipe, LoraSettings(allow_paths=True))
    with manager.applied(str(path), scale):
        out = forward(pipe.transformer, INPUTS)
    return out, manager


def reference_with(pipe, path, scale=SCALE):
    pipe.load_lora_weights(str(path), adapter_name="reference")
    pipe.set_adapters(["reference"], adapter_weights=[scale])
    try:
        return forward(pipe.transformer, INPUTS)
    finally:
        pipe.unload_lora_weights()


FORMATS = {
    # name: (writer of the file we load, writer of the file diffusers loads as the reference: the same
    # tensors, without the text-encoder part Fill ignores, or in a layout diffusers recognises)
    "diffusers/peft": (lambda t, p: peft_lora(t, p), None),
    "peft, alpha in the metadata": (lambda t, p: peft_lora(t, p, rank=4, alpha=16.0), None),
    "kohya, double and single blocks": (lambda t, p: kohya_full_lora(t, p),
                                        lambda t, p: kohya_full_lora(t, p, text_encoder=False)),
    "comfyui": (lambda t, p: comfyui_lora(t, p), lambda t, p: comfyui_lora(t, p, text_encoder=False)),
    "xlabs": (lambda t, p: xlabs_lora(t, p, rank=4), None),
    "bfl lora_A/lora_B under diffusion_model.": (lambda t, p: bfl_a_b_lora(t, p, prefix="diffusion_model."),
                                                 lambda t, p: comfyui_lora(t, p, text_encoder=False)),
    "bfl lora_A/lora_B bare": (lambda t, p: bfl_a_b_lora(t, p, prefix=""),
                               lambda t, p: comfyui_lora(t, p, text_encoder=False)),
    "bfl lora_A/lora_B without alpha": (lambda t, p: bfl_a_b_lora(t, p, alpha=None),
                                        lambda t, p: comfyui_lora(t, p, alpha=4.0, text_encoder=False)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_gives_what_diffusers_gives(fmt, ours, reference, base_output, tmp_path,
                                                 real_width_transformer, real_width_base):
    write, write_reference = FORMATS[fmt]
    path = write(real_width_transformer, tmp_path / "lora.safetensors")
    reference_path = write_reference(real_width_transformer, tmp_path / "ref.safetensors") if write_reference else path
    before = real_width_base
    out, manager = ours_with(ours, path)
    try:
        expected = reference_with(reference, reference_path)
        assert torch.equal(out, expected), f"{fmt}: {(out - expected).abs().max()}"
        assert not torch.equal(out, base_output)
        assert torch.equal(forward(ours.transformer, INPUTS), base_output)  # the base after the prediction
        assert_same_tensors(ours.transformer, before)
        assert not any(p.requires_grad for p in ours.transformer.parameters())
    finally:
        manager.clear()


def test_the_alpha_in_the_metadata_is_not_dropped(ours, reference, tmp_path, real_width_transformer):
    """diffusers' training scripts store alpha only in the file's metadata: alpha 16 at rank 4 is
    4 times the LoRA's update of the same file read without it."""
    with_alpha = peft_lora(real_width_transformer, tmp_path / "alpha16.safetensors", rank=4, alpha=16.0)
    without = peft_lora(real_width_transformer, tmp_path / "plain.safetensors", rank=4)
    a, manager_a = ours_with(ours, with_alpha, scale=0.25)
    b, manager_b = ours_with(ours, without, scale=1.0)
    manager_a.clear(), manager_b.clear()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # scale 0.25 x (16 / 4) = 1


def test_a_lora_for_another_width_is_refused_in_words(ours, tmp_path, real_width_transformer, real_width_base):
    path = peft_lora(real_width_transformer, tmp_path / "flux-lite.safetensors", fan_in=2048, modules=("to_q",))
    before = real_width_base
    manager = LoraManager(ours, LoraSettings(allow_paths=True))
    with pytest.raises(LoraError) as err:
        with manager.applied(str(path), 1.0):
            pass
    message = str(err.value)
    assert "flux-lite.safetensors was made for a model of another size" in message
    assert "2048 input features where this model's has 3072" in message
    assert not manager.loaded and not getattr(ours.transformer, "peft_config", None)
    assert_same_tensors(ours.transformer, before)


# -- the lifecycle, through the engine on the tiny model -------------------------------------------


@pytest.fixture
def lora_engine(tiny_model, tmp_path):
    engine = Engine(tiny_model, EngineSettings(lora=LoraSettings(folder=tmp_path)))
    yield engine
    engine.loras.clear()
    assert not getattr(tiny_model.pipeline.transformer, "peft_config", None)


@pytest.fixture(scope="module")
def scene():
    return noise_image(64, 64, seed=3), box_mask(64, 64, (16, 16, 48, 48))


def predict(engine, scene, **kw):
    img, mask = scene
    return engine.predict(parse_input(fast_input(img, mask, seed=4, **kw)))[0].data


def test_a_lora_with_norms_never_outlives_its_prediction(lora_engine, scene, tmp_path):
    transformer = lora_engine.pipeline.transformer
    peft_lora(transformer, tmp_path / "canny.safetensors", norms=True)
    peft_lora(transformer, tmp_path / "canny-lora-only.safetensors", norms=False)
    before = snapshot(transformer)
    base = predict(lora_engine, scene)
    with_norms = predict(lora_engine, scene, lora_weights="canny")
    assert_same_tensors(transformer, before)
    after = predict(lora_engine, scene)
    assert after == base and with_norms != base
    # The norms were in force during the prediction: the same LoRA without them gives another image.
    assert predict(lora_engine, scene, lora_weights="canny-lora-only") != with_norms
    assert predict(lora_engine, scene, lora_weights="canny") == with_norms  # from the cache, norms again
    assert predict(lora_engine, scene) == base
    assert_same_tensors(transformer, before)


def test_a_then_b_equals_b_alone(lora_engine, scene, tmp_path):
    transformer = lora_engine.pipeline.transformer
    peft_lora(transformer, tmp_path / "a.safetensors", norms=True, seed=11)
    diffusers_lora(transformer, tmp_path / "b.safetensors", seed=12)
    b_alone = predict(lora_engine, scene, lora_weights="b", lora_scale=0.8)
    lora_engine.loras.clear()
    predict(lora_engine, scene, lora_weights="a")
    assert predict(lora_engine, scene, lora_weights="b", lora_scale=0.8) == b_alone


def test_a_failed_load_leaves_the_base_and_the_cache_clean(lora_engine, scene, tmp_path, monkeypatch):
    """The load fails after the adapter was injected and the norms were written into the transformer."""
    from diffusers import FluxFillPipeline

    transformer = lora_engine.pipeline.transformer
    peft_lora(transformer, tmp_path / "broken.safetensors", norms=True)
    before = snapshot(transformer)
    base = predict(lora_engine, scene)
    load_norms = FluxFillPipeline._load_norm_into_transformer.__func__

    def fails_after_writing(cls, state_dict, transformer, **kw):
        load_norms(cls, state_dict, transformer, **kw)
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(FluxFillPipeline, "_load_norm_into_transformer", classmethod(fails_after_writing))
    with pytest.raises(LoraError, match="broken.safetensors is not a FLUX.1 LoRA this server can apply"):
        predict(lora_engine, scene, lora_weights="broken")
    monkeypatch.undo()
    assert not lora_engine.loras.loaded and not lora_engine.loras.base
    assert not getattr(transformer, "peft_config", None)
    assert_same_tensors(transformer, before)
    assert predict(lora_engine, scene) == base


@pytest.mark.parametrize(("keys", "reason"), [
    ({"transformer.down_blocks.0.attentions.0.to_q.lora_A.weight": (4, 8),
      "transformer.down_blocks.0.attentions.0.to_q.lora_B.weight": (8, 4)},
     "was made for another model: its layer down_blocks.0.attentions.0.to_q is not in FLUX.1 Fill [dev]"),
    ({"foo.bar": (2, 2)}, "holds no FLUX.1 transformer LoRA"),
    ({"transformer.x_embedder.lora_A.weight": (4, 512), "transformer.x_embedder.lora_B.weight": (32, 4)},
     "its x_embedder has 512 input features where this model's has 288"),
])
def test_a_file_no_reader_fits_is_refused_naming_the_file(lora_engine, scene, tmp_path, keys, reason):
    save_file({k: torch.randn(*shape) for k, shape in keys.items()}, str(tmp_path / "odd.safetensors"))
    before = snapshot(lora_engine.pipeline.transformer)
    with pytest.raises(LoraError) as err:
        predict(lora_engine, scene, lora_weights="odd")
    assert "odd.safetensors" in str(err.value) and reason in str(err.value)
    assert err.value.errors[0].field == "lora_weights"
    assert not lora_engine.loras.loaded
    assert_same_tensors(lora_engine.pipeline.transformer, before)


def test_a_cached_adapter_is_evicted_least_recently_used_first(tiny_model, scene, tmp_path):
    engine = Engine(tiny_model, EngineSettings(lora=LoraSettings(folder=tmp_path, max_loaded=2)))
    transformer = engine.pipeline.transformer
    try:
        for i, norms in enumerate((True, False, False)):
            peft_lora(transformer, tmp_path / f"l{i}.safetensors", seed=20 + i, norms=norms)
        first = predict(engine, scene, lora_weights="l0")
        predict(engine, scene, lora_weights="l1")
        predict(engine, scene, lora_weights="l2")  # l0 goes, and with it the base norms kept for it
        assert [a.path.name for a in engine.loras.loaded.values()] == ["l1.safetensors", "l2.safetensors"]
        assert not engine.loras.base
        assert set(transformer.peft_config) == {a.name for a in engine.loras.loaded.values()}
        assert predict(engine, scene, lora_weights="l0") == first  # loaded again, the same
    finally:
        engine.loras.clear()


def test_the_lora_file_metadata_is_what_diffusers_training_writes(tmp_path, tiny_model):
    """The writer above stores the alpha where diffusers' training scripts do."""
    from safetensors import safe_open

    path = peft_lora(tiny_model.pipeline.transformer, tmp_path / "meta.safetensors", alpha=16.0)
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 16.0 and metadata["transformer.r"] == 4


# -- a LoRA of another width, and ComfyUI's whole differences -----------------------------------------


def test_a_kohya_lora_of_another_width_is_refused_naming_the_width(ours, tmp_path, real_width_transformer,
                                                                   real_width_base):
    """diffusers' Kohya converter splits the single blocks at FLUX.1's width and fails on any other
    without a word about widths; the refusal names the width."""
    path = kohya_full_lora(real_width_transformer, tmp_path / "flux-lite-style.safetensors", width=2048)
    before = real_width_base
    manager = LoraManager(ours, LoraSettings(allow_paths=True))
    with pytest.raises(LoraError) as err:
        with manager.applied(str(path), 1.0):
            pass
    assert str(err.value) == ("lora_weights: flux-lite-style.safetensors was made for a model of another size: its "
                              "double_blocks.0.img_attn.qkv takes 2048 input features where this model's takes 3072")
    assert not manager.loaded and not getattr(ours.transformer, "peft_config", None)
    assert_same_tensors(ours.transformer, before)


def test_the_bfl_names_of_differences_map_onto_every_tensor(tiny_model):
    """Every tensor of the transformer, written as a difference in BFL's names (fused layers fused,
    the final modulation's halves swapped) by the inverse of diffusers' converter, comes back as
    itself: the mapping of .diff/.diff_b keys covers every layer, row for row."""
    from inference import lora_diffs
    from inference.testing.checkpoint_files import base_tensors, to_bfl

    transformer = tiny_model.pipeline.transformer
    tensors = base_tensors(transformer)
    diffs = {}
    for key, value in to_bfl(tensors).items():
        stem, kind = key.rsplit(".", 1)
        name = f"diffusion_model.{key}.diff" if kind == "scale" else \
            f"diffusion_model.{stem}.diff" if kind == "weight" else f"lora_unet_{stem.replace('.', '_')}.diff_b"
        diffs[name] = value + 1.0  # no all-zero difference is left out
    back = lora_diffs.split(diffs, transformer, tensors, "all.safetensors", LoraError)
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k] + 1.0) for k in tensors)


def clean_copy(transformer):
    """A copy without the peft layers the LoRAs of earlier tests left in the tiny model: diffusers
    leaves a layer switched off when it loads the next LoRA into it, so a reference starts clean."""
    copied = copy.deepcopy(transformer)
    copied.unload_lora()
    return copied


@pytest.fixture
def deltas(tiny_model):
    """Differences for a fused qkv bias (split three ways), a norm, the single block's fused linear1
    weight (split four ways) and the final modulation (its halves swapped)."""
    from inference.testing.checkpoint_files import base_tensors

    gen = torch.Generator().manual_seed(5)
    base = base_tensors(tiny_model.pipeline.transformer)
    names = ["transformer_blocks.0.attn.to_k.bias", "transformer_blocks.0.attn.norm_q.weight",
             "single_transformer_blocks.0.proj_mlp.weight", "single_transformer_blocks.0.attn.to_v.weight",
             "norm_out.linear.weight"]
    return {k: torch.randn(base[k].shape, generator=gen) * 0.1 for k in names}


def test_comfyui_differences_apply_as_comfyui_applies_them(tiny_model, tmp_path, deltas):
    """Each tensor is its base value plus lora_scale times the difference for the prediction, and the
    LoRA's pairs are diffusers' own: the same as diffusers loading the pairs into a transformer whose
    tensors were changed by hand; the base is back after."""
    from diffusers import FluxFillPipeline

    from inference.testing.lora_files import comfyui_diff_lora

    inputs = transformer_inputs(dict(tiny_model.pipeline.transformer.config))
    path = comfyui_diff_lora(tiny_model.pipeline.transformer, tmp_path / "trained-norms.safetensors", deltas)
    pairs_only = comfyui_diff_lora(tiny_model.pipeline.transformer, tmp_path / "pairs.safetensors", {})
    pipe = make_pipeline(tiny_model, clean_copy(tiny_model.pipeline.transformer))
    before = snapshot(pipe.transformer)
    base = forward(pipe.transformer, inputs)
    manager = LoraManager(pipe, LoraSettings(allow_paths=True))
    with manager.applied(str(path), SCALE):
        out = forward(pipe.transformer, inputs)
    assert torch.equal(forward(pipe.transformer, inputs), base)
    assert_same_tensors(pipe.transformer, before)
    manager.clear()

    reference = FluxFillPipeline(**{**pipe.components, "transformer": clean_copy(tiny_model.pipeline.transformer)})
    with torch.no_grad():
        params = {k.replace(".base_layer", ""): p for k, p in reference.transformer.named_parameters()}
        for name, delta in deltas.items():
            params[name].copy_(params[name] + SCALE * delta)
    expected = reference_with(reference, pairs_only)
    assert torch.equal(out, expected), (out - expected).abs().max()
    assert not torch.equal(out, base)


@pytest.mark.parametrize(("key", "shape", "reason"), [
    ("diffusion_model.double_blocks.7.img_attn.qkv.diff_b", (96,),
     "changes double_blocks.7.img_attn.qkv, which is not a layer of FLUX.1 Fill [dev]'s transformer"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.diff_b", (3 * 3072,),
     "was made for a model of another size: its diffusion_model.double_blocks.0.img_attn.qkv.diff_b is (9216,) "
     "where this model's double_blocks.0.img_attn.qkv is (96,)"),
])
def test_a_difference_that_does_not_fit_is_refused_in_words(lora_engine, scene, tmp_path, key, shape, reason):
    save_file({key: torch.ones(shape)}, str(tmp_path / "odd-diff.safetensors"))
    before = snapshot(lora_engine.pipeline.transformer)
    with pytest.raises(LoraError) as err:
        predict(lora_engine, scene, lora_weights="odd-diff")
    assert f"odd-diff.safetensors {reason}" in str(err.value), str(err.value)
    assert not lora_engine.loras.loaded
    assert_same_tensors(lora_engine.pipeline.transformer, before)
