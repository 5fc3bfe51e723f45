"""One engine factory (inference.factory) for the server, `flux-fill predict` and the benchmarks."""

from __future__ import annotations

import ast
import dataclasses
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from inference import factory
from inference.factory import EngineOptions, build_engine
from tests.helpers import ROOT, box_mask, data_uri, noise_image


def _recording(monkeypatch) -> list[EngineOptions]:
    """Record every build_engine call's options; the real factory still builds."""
    calls: list[EngineOptions] = []
    real = factory.build_engine

    def build(options, **kw):
        calls.append(options)
        return real(options, **kw)

    monkeypatch.setattr(factory, "build_engine", build)
    return calls


def test_the_factory_builds_an_engine_as_the_options_say(tiny_dir):
    from inference.inputs import parse_input

    options = EngineOptions(weights=str(tiny_dir), device="cpu", max_batch=2, max_pixels=5_000_000, step_cache=0.05,
                            allow_paths=True)
    engine = build_engine(options)
    assert engine.settings.max_batch == 2 and engine.settings.max_pixels == 5_000_000 and engine.settings.allow_paths
    assert engine.accelerator is not None and engine.accelerator.step_cache_on
    speed = engine.model.extras["speed"]
    assert speed == engine.accelerator.describe()
    assert speed["step_cache"] == 0.05 and speed["compile"] is False and speed["memory_mode"] == "default"
    image, mask = noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))
    out = engine.predict(parse_input({"prompt": "x", "image": data_uri(image), "mask": data_uri(mask), "seed": 1,
                                      "num_inference_steps": 2, "num_outputs": 3, "megapixels": "match_input"}),
                         log=lambda _m: None)
    assert [o.seed for o in out] == [1, 2, 3]


def test_the_memory_mode_decides_where_the_weights_load():
    seen = []

    def load_model(weights, *, components=None, device=None, **kw):
        seen.append((weights, components, device, kw))
        raise RuntimeError("stop here")

    for mode, offload in (("default", {}), ("fp8", {"offload": True}), ("offload", {"offload": True})):
        with pytest.raises(RuntimeError):
            factory.load(EngineOptions(weights="w", components="c", device="cuda:1", memory_mode=mode),
                         load_model=load_model)
        assert seen.pop() == ("w", "c", "cuda:1", offload)


def test_server_settings_map_onto_the_engine_options(tmp_path):
    """Every engine option the server has a setting for comes from that setting (nothing dropped)."""
    from server.engines import engine_options
    from server.settings import Settings

    settings = Settings(weights="/w", components="/c", data_dir=tmp_path, memory_mode="fp8", compile=True,
                        fast_mode=True, step_cache=0.1, attention_backend="_flash_3", max_image_pixels=1234,
                        max_batch=2, fetch_timeout_s=7, fetch_max_redirects=1, block_private_urls=True,
                        lora_dir=tmp_path / "named", allow_lora_paths=True, max_lora_bytes=99)
    options = engine_options(settings, "cuda:1", "mark")
    assert (options.weights, options.components, options.device) == ("/w", "/c", "cuda:1")
    assert (options.memory_mode, options.compile, options.fast_mode, options.step_cache, options.attention_backend) \
        == ("fp8", True, True, 0.1, "_flash_3")
    assert options.cache_dir == tmp_path / "compile-cache"
    assert (options.max_pixels, options.max_batch, options.allow_paths) == (1234, 2, False)
    policy = options.fetch_policy
    assert (policy.timeout_s, policy.max_redirects, policy.allow_private) == (7, 1, False)
    assert ("flux-fill-fetch", "mark") in policy.headers
    lora = options.lora
    assert (lora.folder, lora.allow_paths, lora.fetch_policy.max_bytes) == (tmp_path / "named", True, 99)
    assert lora.cache_dir == tmp_path / "loras" and ("flux-fill-fetch", "mark") in lora.fetch_policy.headers
    # The defaults agree too: a server with no options builds the factory's default engine.
    plain = engine_options(Settings(data_dir=tmp_path))
    default = EngineOptions()
    for f in dataclasses.fields(EngineOptions):
        if f.name not in ("fetch_policy", "lora", "cache_dir", "device"):
            assert getattr(plain, f.name) == getattr(default, f.name), f.name


def test_the_server_builds_its_engine_with_the_factory(tmp_path, tiny_dir, monkeypatch):
    """create_app's engine comes from build_engine, with the load_model given to create_app, and
    /health shows the speed the factory describes for the same options."""
    from server.app import create_app
    from server.engines import engine_options
    from server.settings import Settings
    from inference.weights import load_model as real_load

    calls = _recording(monkeypatch)
    loads = []

    def load_model(*args, **kw):
        loads.append(args)
        return real_load(*args, **kw)

    settings = Settings(weights=str(tiny_dir), data_dir=tmp_path / "data", step_cache=0.05, max_batch=2,
                        gpus=["cpu"])
    with TestClient(create_app(settings, load_model=load_model)) as client:
        deadline = time.monotonic() + 120
        while (health := client.get("/health").json())["status"] not in ("READY", "SETUP_FAILED"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert health["status"] == "READY", health
    assert loads == [(str(tiny_dir),)]
    assert len(calls) == 1
    expected = engine_options(settings, "cpu", "any")
    assert {k: v for k, v in vars(calls[0]).items() if k not in ("fetch_policy", "lora")} == \
        {k: v for k, v in vars(expected).items() if k not in ("fetch_policy", "lora")}
    built = build_engine(dataclasses.replace(expected, cache_dir=tmp_path / "cache"))
    assert health["speed"] == built.model.extras["speed"]


def test_flux_fill_predict_builds_its_engine_with_the_factory(tmp_path, tiny_dir, monkeypatch):
    from inference.cli import main

    calls = _recording(monkeypatch)
    noise_image(64, 64).save(tmp_path / "in.png")
    box_mask(64, 64, (8, 8, 40, 40)).save(tmp_path / "mask.png")
    code = main(["--weights", str(tiny_dir), "--device", "cpu", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--prompt", "a cat", "--megapixels", "match_input",
                 "--num-inference-steps", "1", "--output-format", "png", "-o", str(tmp_path / "out")])
    assert code == 0
    [options] = calls
    assert (options.weights, options.device, options.allow_paths) == (str(tiny_dir), "cpu", True)
    assert options.compile is False and options.warm_up is False  # one prediction: nothing to compile for
    assert (tmp_path / "out" / "out-0.png").is_file()


@pytest.mark.parametrize("path", ["bench/bench.py", "bench/gpu_check.py", "bench/make_pictures.py",
                                  "inference/cli.py", "server/app.py"])
def test_no_engine_is_built_outside_the_factory(path):
    """Engine(...) and accel.apply(...) are called by the factory alone; the bench's diffusers
    baseline loads weights itself (it measures plain diffusers, not an engine)."""
    tree = ast.parse(Path(ROOT, path).read_text())
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    names = {f.id if isinstance(f, ast.Name) else f.attr for f in calls if isinstance(f, (ast.Name, ast.Attribute))}
    assert "Engine" not in names and "apply" not in names and "AccelOptions" not in names
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert any(module in ("factory", "inference.factory") or name == "factory" for module, name in imported)
