"""The speed options on the CPU with the tiny model: what runs here, what is refused, and that the
default changes nothing. The GPU-only parts (fp8, offload, real timings) are in bench/bench.py."""

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
    options = accel.AccelOptions(compile=True, cache_dir=tmp_path / "compile-cache", warmup_sizes=((64, 64),))
    engine = _engine(tiny_dir, options)
    assert engine.accelerator.compiled
    assert engine.accelerator.warm_up(engine) > 0
    compiled = _image(engine)
    assert np.abs(compiled - eager).max() <= 2  # float reassociation: at most a level or two in 8-bit
    assert (tmp_path / "compile-cache" / "inductor").is_dir()  # the persistent cache is where we said
    described = engine.accelerator.describe()
    assert described["compile"] is True and any("compile (2 blocks" in a for a in described["applied"])


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


@pytest.mark.parametrize("mode", ["offload", "sequential-offload"])
def test_memory_modes_are_refused_on_cpu(tiny_dir, mode):
    with pytest.raises(accel.AccelError, match=f"--memory-mode {mode} offloads to a GPU"):
        _engine(tiny_dir, accel.AccelOptions(memory_mode=mode))


def test_unknown_memory_mode_is_refused(tiny_dir):
    with pytest.raises(accel.AccelError, match="not one of default, offload, sequential-offload"):
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

    s = Settings(compile=True, fast_mode=True, memory_mode="offload", step_cache=0.05, data_dir=tmp_path)
    assert (s.compile, s.fast_mode, s.memory_mode, s.step_cache) == (True, True, "offload", 0.05)
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
