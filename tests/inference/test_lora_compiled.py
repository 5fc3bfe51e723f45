"""LoRAs on the compiled engine: the blocks are compiled once, with the LoRA slot prepared, and no LoRA,
scale or switch between them compiles anything after the warm-up; the pictures are the eager engine's
within float rounding, and a LoRA still never outlives its prediction.

The blocks are compiled through dynamo with the ``aot_eager`` backend: the graphs and the guards that
decide every recompile are dynamo's and AOTAutograd's, the same as with inductor, whose C++ kernels
would add minutes on a CPU and nothing to what is counted here. (On a GPU, bench/gpu_check.py times a
LoRA switch with inductor.)"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from inference import accel
from inference.errors import LoraError
from inference.factory import EngineOptions, build_engine
from inference.inputs import parse_input
from inference.lora import LoraSettings
from inference.testing.lora_files import comfyui_diff_lora, kohya_lora, peft_lora, xlabs_lora
from tests.helpers import box_mask, fast_input, noise_image

SCALES = (0.5, 0.8, 1.2)
pytestmark = pytest.mark.slow  # a compiled engine and an eager one, 20 LoRA requests on each


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    """Five LoRAs in five formats: diffusers' with norms set directly, peft with its alpha in the metadata,
    Kohya, XLabs, and ComfyUI's with whole differences (.diff, .diff_b)."""
    import torch

    from inference.testing.checkpoint_files import base_tensors

    folder = tmp_path_factory.mktemp("loras")
    transformer = tiny_model.pipeline.transformer
    gen = torch.Generator().manual_seed(8)
    base = base_tensors(transformer)
    deltas = {k: torch.randn(base[k].shape, generator=gen) * 0.1
              for k in ("transformer_blocks.0.attn.to_q.bias", "single_transformer_blocks.0.attn.norm_k.weight")}
    peft_lora(transformer, folder / "l0.safetensors", rank=4, seed=30, norms=True)
    peft_lora(transformer, folder / "l1.safetensors", rank=8, alpha=16.0, seed=31)
    kohya_lora(transformer, folder / "l2.safetensors", rank=6)
    xlabs_lora(transformer, folder / "l3.safetensors", rank=4)
    comfyui_diff_lora(transformer, folder / "l4.safetensors", deltas, rank=2)
    return folder


@pytest.fixture(scope="module")
def engines(tiny_dir, loras):
    settings = LoraSettings(folder=loras, allow_paths=True)
    compiled = build_engine(EngineOptions(weights=str(tiny_dir), device="cpu", compile=True,
                                          compile_backend="aot_eager", warmup_shapes=((64, 64, 1),), lora=settings))
    eager = build_engine(EngineOptions(weights=str(tiny_dir), device="cpu", compile=False, lora=settings))
    yield compiled, eager
    compiled.loras.clear(), eager.loras.clear()


@pytest.fixture(scope="module")
def scene():
    return noise_image(64, 64, seed=3), box_mask(64, 64, (16, 16, 48, 48))


def picture(engine, scene, **kw) -> np.ndarray:
    img, mask = scene
    data = engine.predict(parse_input(fast_input(img, mask, seed=4, **kw)), log=lambda _m: None)[0].data
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same picture but for float rounding: a zero-padded LoRA sums in another order, which moves an
    8-bit level here and there."""
    return int(np.abs(a - b).max()) <= 1


def test_twenty_requests_with_five_loras_and_three_scales_compile_nothing_after_the_warm_up(engines, scene):
    compiled, eager = engines
    speed = compiled.accelerator
    assert speed.compiled and speed.lora_slot is not None and compiled.loras.slot is speed.lora_slot
    assert any(line.startswith("LoRA slot: every linear layer at rank 64") for line in speed.applied)
    base = picture(compiled, scene)
    graphs, recompiles = accel.WATCH.graphs(), accel.WATCH.recompiles
    seen = {}
    for r in range(20):
        name, scale = f"l{r % 5}", SCALES[r % 3]
        ours = picture(compiled, scene, lora_weights=name, lora_scale=scale)
        if (name, scale) in seen:  # isolation: the same LoRA and scale again, after others, bit for bit
            assert np.array_equal(ours, seen[name, scale]), (name, scale)
        else:
            assert close(ours, picture(eager, scene, lora_weights=name, lora_scale=scale)), (name, scale)
        seen[name, scale] = ours
        assert accel.WATCH.graphs() == graphs, f"request {r} ({name} at {scale}) compiled"
    # Every LoRA changes the picture (the same engine is deterministic, so any change is the LoRA's). On
    # the demo model, whose outer layers keep the known picture, a LoRA on the blocks moves some
    # pictures by a level or two only, so this asks for a change, not for a large one.
    assert len(seen) == 15 and all(not np.array_equal(picture_, base) for picture_ in seen.values())
    assert np.array_equal(picture(compiled, scene), base)  # no LoRA after twenty: the base, bit for bit
    assert close(base, picture(eager, scene))
    assert accel.WATCH.graphs() == graphs and accel.WATCH.recompiles == recompiles
    health = compiled.model.extras["speed"]
    assert health["recompiles_after_warmup"] == recompiles and health["lora_slot_rank"] == 64


def test_a_lora_above_the_slot_rank_grows_it_once_said_and_counted(engines, scene, tmp_path, caplog):
    compiled, eager = engines
    transformer = compiled.pipeline.transformer
    wide = peft_lora(transformer, tmp_path / "rank-100.safetensors", rank=100, seed=40)
    before = accel.WATCH.recompiles
    lines = []
    img, mask = scene
    with caplog.at_level(logging.WARNING):
        data = compiled.predict(parse_input(fast_input(img, mask, seed=4, lora_weights=str(wide))),
                                log=lines.append)[0].data
    ours = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
    assert close(ours, picture(eager, scene, lora_weights=str(wide)))
    assert "a LoRA of rank 100 is above the 64 the compiled blocks were prepared for: the LoRA slot grows to rank 128" \
        in caplog.text
    assert "The compiled blocks compile once more for a LoRA of rank 100 (above 64)" in lines
    assert accel.WATCH.recompiles > before and "the compiled blocks compiled again after the warm-up" in caplog.text
    health = compiled.model.extras["speed"]
    assert health["recompiles_after_warmup"] == accel.WATCH.recompiles and health["lora_slot_rank"] == 128
    graphs = accel.WATCH.graphs()  # grown once: the smaller LoRAs fit it without compiling
    for name in ("l1", "l4"):
        picture(compiled, scene, lora_weights=name)
    assert accel.WATCH.graphs() == graphs

    huge = peft_lora(transformer, tmp_path / "rank-300.safetensors", rank=300, seed=41, modules=("to_q",))
    with pytest.raises(LoraError) as err:
        picture(compiled, scene, lora_weights=str(huge))
    assert str(err.value) == ("lora_weights: rank-300.safetensors has rank 300, more than the 256 this server's "
                              "compiled blocks take; start it with --no-compile to use this file (LoRAs of any rank "
                              "then apply, more slowly)")
    assert accel.WATCH.graphs() == graphs
