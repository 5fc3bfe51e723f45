"""The speed options on the CPU with the tiny model: what runs here, what is refused, and that the
default changes nothing. fp8 runs here as torchao's weight-only fp8 (the row-wise fp8 matmuls need
a GPU of compute capability 8.9+); offloading and real timings are in bench/bench.py on a GPU."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from inference import accel
from inference.engine import Engine, EngineSettings
from inference.inputs import parse_input
from tests.helpers import box_mask, data_uri, noise_image


def _engine(tiny_dir, options: accel.AccelOptions | None):
    from inference.weights import load_model

    model = load_model(str(tiny_dir), device="cpu")
    engine = Engine(model, EngineSettings(fast_mode=bool(options and options.fast_mode)))
    if options is not None:
        engine.accelerator = accel.apply(model, options)
    return engine


def _image(engine, **extra) -> np.ndarray:
    inp = parse_input({"prompt": "a red cat", "image": data_uri(noise_image(64, 64)),
                       "mask": data_uri(box_mask(64, 64, (16, 16, 48, 48))), "megapixels": "match_input",
                       "num_inference_steps": 4, "seed": 7, "output_format": "png", **extra})
    return np.asarray(Image.open(io.BytesIO(engine.predict(inp)[0].data)), dtype=np.float32)


@pytest.fixture(scope="module")
def eager(tiny_dir):
    return _image(_engine(tiny_dir, None))


def test_default_options_change_nothing(tiny_dir, eager):
    engine = _engine(tiny_dir, accel.AccelOptions())
    assert engine.accelerator.applied == [] and engine.accelerator.notes == []
    assert engine.accelerator.warm_up(engine) == 0.0  # nothing to warm up
    np.testing.assert_array_equal(_image(engine), eager)
    np.testing.assert_array_equal(_image(engine, go_fast=True), eager)


@pytest.mark.slow
def test_compile_runs_and_matches_eager(tiny_dir, tmp_path, eager):
    # Without the LoRA slot, whose graphs would double inductor's minutes of C++ here; LoRAs on compiled
    # blocks: test_lora_compiled.py (through dynamo) and the GPU check (inductor).
    options = accel.AccelOptions(compile=True, cache_dir=tmp_path / "compile-cache", warmup_shapes=((64, 64, 1),),
                                 lora_rank=0)
    engine = _engine(tiny_dir, options)
    assert engine.accelerator.compiled
    assert engine.accelerator.warm_up(engine) > 0
    compiled = _image(engine)
    assert np.abs(compiled - eager).max() <= 2  # float reassociation: at most a level or two in 8-bit
    assert (tmp_path / "compile-cache" / "inductor").is_dir()  # the persistent cache is where we said
    described = engine.accelerator.describe()
    assert described["compile"] is True and any("compile (--compile: 2 blocks" in a for a in described["applied"])
    assert described["recompiles_after_warmup"] == accel.WATCH.recompiles and "lora_slot_rank" not in described


def test_go_fast_on_cpu_runs_the_normal_path_and_says_so(tiny_dir, eager, caplog):
    with caplog.at_level(logging.INFO, logger="inference.accel"):
        engine = _engine(tiny_dir, accel.AccelOptions(fast_mode=True))
        assert "fp8 needs a CUDA GPU" in caplog.text  # at startup
        caplog.clear()
        first = _image(engine, go_fast=True)
        _image(engine, go_fast=True)
    notices = [r.message for r in caplog.records if "go_fast runs the normal path" in r.message]
    assert len(notices) == 1 and "fp8 needs a CUDA GPU" in notices[0]  # said once, not per request
    # go_fast scales lora_scale only; without a LoRA the image is the normal path's
    np.testing.assert_array_equal(first, eager)
    assert engine.accelerator.describe()["fast_mode"].startswith("unavailable (fp8 needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["offload", "fp8-offload", "sequential-offload"])
def test_memory_modes_are_refused_on_cpu(tiny_dir, mode):
    with pytest.raises(accel.AccelError, match=f"--memory-mode {mode} offloads to a GPU"):
        _engine(tiny_dir, accel.AccelOptions(memory_mode=mode))


def test_unknown_memory_mode_is_refused(tiny_dir):
    with pytest.raises(accel.AccelError, match="not one of default, fp8, fp8-offload, offload, sequential-offload"):
        _engine(tiny_dir, accel.AccelOptions(memory_mode="swap"))


def test_step_cache_changes_outputs_slightly_and_turns_off(tiny_dir, eager):
    cached = _engine(tiny_dir, accel.AccelOptions(step_cache=0.5))
    image = _image(cached)
    relative = np.abs(image - eager).mean() / np.abs(eager).mean()
    assert 0 < relative < 0.05, relative
    np.testing.assert_array_equal(_image(cached), image)  # the cache is reset between predictions
    assert cached.accelerator.describe()["step_cache"] == 0.5
    off = _engine(tiny_dir, accel.AccelOptions(step_cache=0.0))
    np.testing.assert_array_equal(_image(off), eager)
    assert off.accelerator.describe()["step_cache"] == 0.0


def test_describe_says_what_is_on_and_what_was_refused(tiny_dir):
    described = _engine(tiny_dir, accel.AccelOptions(fast_mode=True, step_cache=0.1)).accelerator.describe()
    assert described == {
        "compile": False,
        "fast_mode": "unavailable (fp8 needs a CUDA GPU and this server runs on cpu)",
        "memory_mode": "default",
        "step_cache": 0.1,
        "attention_backend": "default",
        "applied": ["first-block step cache, threshold 0.1"],
        "notes": ["--fast-mode: fp8 needs a CUDA GPU and this server runs on cpu; go_fast requests run the normal path"],
    }


def test_server_settings_carry_the_options(tmp_path):
    from pydantic import ValidationError

    from server.settings import Settings

    assert Settings().compile is None  # on with a CUDA GPU, off on the CPU
    s = Settings(compile=True, fast_mode=True, memory_mode="offload", step_cache=0.05, data_dir=tmp_path)
    assert (s.compile, s.fast_mode, s.memory_mode, s.step_cache) == (True, True, "offload", 0.05)
    assert Settings(memory_mode="fp8").memory_mode == "fp8"
    with pytest.raises(ValidationError):
        Settings(memory_mode="swap")
    with pytest.raises(ValidationError):
        Settings(step_cache=-1)


def test_server_refuses_offload_on_cpu_with_a_clear_setup_error(server_factory):
    with pytest.raises(RuntimeError, match="setup failed") as failed:
        server_factory("--memory-mode", "offload")
    assert "offloads to a GPU" in str(failed.value)


def test_random_real_is_the_real_architecture():
    from inference.random_real import transformer_parameter_count

    assert 11.8e9 < transformer_parameter_count() < 12.0e9  # FLUX.1's 11.9 B, counted on the meta device


def test_random_real_is_built_in_the_asked_dtype_without_a_float32_copy():
    import torch

    from inference.random_real import build_random_real_pipeline

    pipe = build_random_real_pipeline("meta", torch.bfloat16)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    assert torch.get_default_dtype() == torch.float32  # put back after building


# -- compiling by default on a GPU: a shape that fails to compile runs eager --------------------------


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("this compiler cannot build the graph")


def test_default_compile_falls_back_to_eager_when_compiling_fails(tiny_dir, eager, caplog):
    """What a GPU server does by default (compile is None there), made to fail to compile: the
    predictions run eager and match, and the fall-back is said in the log and counted in /health's
    speed; an explicit --compile lets the same failure surface."""
    engine = _engine(tiny_dir, accel.AccelOptions())
    speed = engine.accelerator
    speed.options.compile_backend = _failing_backend
    accel._compile(speed)  # as apply() does on CUDA when compile is None
    assert speed.compiled and any("default on a GPU" in line for line in speed.applied)
    status = speed.describe()
    fallbacks = accel.WATCH.eager_fallbacks
    with caplog.at_level(logging.WARNING, logger="inference.accel"):
        np.testing.assert_array_equal(_image(engine), eager)
    assert accel.WATCH.eager_fallbacks > fallbacks and status["eager_fallbacks"] == accel.WATCH.eager_fallbacks
    assert "compiled code runs eager from now on (slower): WON'T CONVERT forward" in caplog.text
    assert "this compiler cannot build the graph" in caplog.text

    import torch

    torch._dynamo.reset()  # forget that those frames were given up on
    explicit = _engine(tiny_dir, accel.AccelOptions(compile=True, compile_backend=_failing_backend,
                                                    warmup_shapes=((64, 64, 1),)))
    assert any("--compile" in line for line in explicit.accelerator.applied)
    with pytest.raises(Exception, match="cannot build the graph"):
        explicit.accelerator.warm_up(explicit)


# -- fp8 weights (the 24 GB and 16 GB modes) -----------------------------------------------------------


def _linears(module):
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_fp8_memory_mode_quantises_blocks_and_t5_and_stays_close(tiny_dir, eager):
    engine = _engine(tiny_dir, accel.AccelOptions(memory_mode="fp8"))
    pipe = engine.pipeline
    block_linears = _linears(pipe.transformer.transformer_blocks) + _linears(pipe.transformer.single_transformer_blocks)
    assert block_linears and all(accel._is_fp8(m.weight) for m in block_linears)
    assert not accel._is_fp8(pipe.transformer.proj_out.weight)  # the output projection stays as loaded
    assert all(accel._is_fp8(m.weight) for m in _linears(pipe.text_encoder_2.encoder.block))
    assert not any(accel._is_fp8(m.weight) for m in _linears(pipe.text_encoder))  # CLIP is small: left alone
    assert engine.accelerator.applied[0].startswith("fp8 weights in the transformer, fp8 weights in T5 (")
    elements = sum(m.weight.numel() for m in block_linears)
    assert accel._linear_bytes(pipe.transformer.transformer_blocks) + \
        accel._linear_bytes(pipe.transformer.single_transformer_blocks) == elements  # a byte each, was 4
    image = _image(engine)
    relative = np.abs(image - eager).mean() / np.abs(eager).mean()
    assert 0 < relative < 0.03, relative
    described = engine.accelerator.describe()
    assert described["memory_mode"] == "fp8" and described["compile"] is False
    # go_fast has nothing more to give: said, and the image is the fp8 one
    assert _image(engine, go_fast=True).tolist() == image.tolist()


def test_loras_apply_on_fp8_weights_and_leave_nothing_behind(tiny_dir, tmp_path):
    from inference.engine import EngineSettings
    from inference.lora import LoraSettings
    from inference.testing.lora_files import diffusers_lora
    from inference.weights import load_model

    model = load_model(str(tiny_dir), device="cpu")
    engine = Engine(model, EngineSettings(lora=LoraSettings(allow_paths=True)))
    engine.accelerator = accel.apply(model, accel.AccelOptions(memory_mode="fp8"))
    lora = str(diffusers_lora(model.pipeline.transformer, tmp_path / "style.safetensors"))
    plain = _image(engine)
    styled = _image(engine, lora_weights=lora, lora_scale=1.0)
    assert np.abs(styled - plain).mean() > 1  # the LoRA changes the picture
    np.testing.assert_array_equal(_image(engine, lora_weights=lora, lora_scale=0.0), plain)
    np.testing.assert_array_equal(_image(engine), plain)  # and is gone after


def test_go_fast_transformer_shares_everything_but_its_fp8_linears(tiny_dir, eager):
    """The second transformer of --fast-mode, built as on a GPU (with the weight-only fp8 config here):
    it shares every bf16 parameter, only its block linears are new, and the normal one is untouched."""
    from torchao.quantization import Float8WeightOnlyConfig

    engine = _engine(tiny_dir, accel.AccelOptions())
    speed = engine.accelerator
    engine.settings.fast_mode = True
    normal = engine.pipeline.transformer
    fast = accel._quantised_copy(normal, Float8WeightOnlyConfig())
    speed.fast_transformer = fast
    fast_linears = {id(m) for m in accel._block_linears(fast)}
    shared = {id(p) for p in normal.parameters()} & {id(p) for p in fast.parameters()}
    assert len(shared) == len(list(normal.parameters())) - len(fast_linears)  # all but the fp8 weights
    assert not any(accel._is_fp8(m.weight) for m in accel._block_linears(normal))
    assert all(accel._is_fp8(m.weight) for m in accel._block_linears(fast))

    fast_image = _image(engine, go_fast=True)
    relative = np.abs(fast_image - eager).mean() / np.abs(eager).mean()
    assert 0 < relative < 0.03, relative
    np.testing.assert_array_equal(_image(engine), eager)  # the normal path is the bf16 one, as before
    assert engine.pipeline.transformer is normal


def test_server_runs_the_fp8_memory_mode(server_factory):
    import httpx

    from tests.helpers import fast_input

    server = server_factory("--memory-mode", "fp8")
    speed = httpx.get(f"{server.url}/health").json()["speed"]
    assert speed["memory_mode"] == "fp8" and speed["applied"][0].startswith("fp8 weights in the transformer")
    r = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions", headers={"Prefer": "wait"},
                   json={"input": fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)))}, timeout=120)
    assert r.json()["status"] == "succeeded", r.text


@pytest.mark.parametrize("free_gib, separate", [(64, True), (4, False)])
def test_fast_mode_makes_a_second_transformer_only_when_the_gpu_has_room(tiny_dir, eager, monkeypatch,
                                                                       free_gib, separate):
    """--fast-mode's choice on a GPU, with the GPU's answers stood in for (free memory, fp8 support)
    and weight-only fp8 in place of the row-wise kind the CPU lacks."""
    from torchao.quantization import Float8WeightOnlyConfig

    monkeypatch.setattr(accel, "_fp8_unavailable", lambda _accel, _cuda: None)
    monkeypatch.setattr(accel, "_fp8_dynamic_config", Float8WeightOnlyConfig)
    monkeypatch.setattr(accel, "_free_gpu_bytes", lambda _device: free_gib * 1024**3)
    engine = _engine(tiny_dir, accel.AccelOptions(fast_mode=True, compile=False))
    speed = engine.accelerator
    assert (speed.fast_transformer is not None) == separate and speed.all_fast == (not separate)
    assert any("slower than bf16" in n for n in speed.notes)  # fp8 without compiling is said to be slow
    fast_image, normal_image = _image(engine, go_fast=True), _image(engine)
    if separate:
        assert speed.describe()["fast_mode"] == "fp8 transformer for go_fast requests"
        np.testing.assert_array_equal(normal_image, eager)
        assert np.abs(fast_image - eager).mean() > 0
    else:
        assert speed.describe()["fast_mode"] == "fp8 in place (every request runs fast)"
        np.testing.assert_array_equal(normal_image, fast_image)
        assert np.abs(normal_image - eager).mean() > 0


# -- torchao leaves inductor's settings alone ------------------------------------------------------------


def _inductor_settings() -> dict:
    import torch._inductor.config as inductor_config

    return inductor_config.get_config_copy()


@pytest.mark.parametrize("mode", ["fp8", "fp8-offload", "fast"])
def test_quantising_leaves_inductor_settings_as_the_server_set_them(tiny_dir, monkeypatch, mode):
    """torchao's configs switch on coordinate-descent autotuning (and more) for the whole process
    unless told not to; after each fp8 path the inductor settings are exactly what they were, so a
    later compile of the bf16 blocks autotunes no longer than it would have."""
    import torch._inductor.config as inductor_config

    # inductor's own defaults, whatever an earlier test in this process left
    with inductor_config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False,
                               force_fuse_int_mm_with_mul=False):
        before = _inductor_settings()
        _quantise_as(mode, tiny_dir, monkeypatch)
        after = _inductor_settings()
    assert {k: after[k] for k in after if after[k] != before.get(k)} == {}


def _quantise_as(mode: str, tiny_dir, monkeypatch) -> None:
    from torchao.quantization import Float8WeightOnlyConfig

    from inference.weights import load_model

    model = load_model(str(tiny_dir), device="cpu")
    if mode == "fp8":
        accel.apply(model, accel.AccelOptions(memory_mode="fp8"))
    elif mode == "fp8-offload":  # its quantising runs here; the offloading itself needs a GPU
        speed = accel.Accelerator(pipeline=model.pipeline, options=accel.AccelOptions(memory_mode=mode), device="cpu")
        accel._fp8_weights(speed, cuda=False)
    else:  # --fast-mode's second transformer, as on a GPU (weight-only fp8 in place of the row-wise kind)
        monkeypatch.setattr(accel, "_fp8_unavailable", lambda _accel, _cuda: None)
        monkeypatch.setattr(accel, "_fp8_dynamic_config", Float8WeightOnlyConfig)
        monkeypatch.setattr(accel, "_free_gpu_bytes", lambda _device: 64 * 1024**3)
        assert accel.apply(model, accel.AccelOptions(fast_mode=True, compile=False)).fast_transformer is not None
    assert accel._has_fp8(model.pipeline.transformer) or mode == "fast"
