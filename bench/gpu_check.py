"""The GPU check: everything only a GPU can show, in one command, within 7 minutes on one H100.

    python bench/gpu_check.py --out gpu-report.json          # a CUDA machine: random-real, every section
    python bench/gpu_check.py --device cpu --out smoke.json   # the same code on the CPU (tiny model)
    python bench/gpu_check.py --fp8-compile ...               # also the slow, optional fp8 compile, last

One process, one JSON report, written again after every section (so a run cut short keeps what it
measured) and printed section by section. It imports the package and bench/ only (never tests/), so
it runs inside the CUDA image as well (bench/README.md). FLUX.1 Fill [dev]'s architecture is built
once on the GPU with random weights (``--weights random-real``; the time a step takes does not depend
on the weights' values), then each section runs on it in an order that needs no second build. Every
timed run records the module tree it ran on (``tree``: peft layers, compiled blocks), so no section
is measured on what an earlier one left behind:

1. ``build``: random-real made on the device; seconds and GPU memory.
2. ``baseline``: plain diffusers, ``FluxFillPipeline.__call__``, bf16 eager: end to end and per step.
3. ``eager``: this server's engine, nothing compiled: end to end, per step, ratio to the baseline.
   Every timed run starts with the engine's prompt cache empty, so T5 runs as in the baseline.
3b. ``previews``: the same prediction with previews off and on (every preview the cadence allows,
   encoded as the server does), alternating: the previews' share of a prediction's time, and one
   projection's cost (bench/previews.py); on a GPU it must stay within 2%.
4. ``formats``: what only a GPU can check of the loading paths: a LoRA with norms applied and
   removed on the real model (the base back bit for bit), and one-block real-width checkpoints (BFL
   bf16, fp8, ComfyUI scaled fp8, GGUF) loaded onto the GPU in bf16 and compared with their values
   (on the CPU, BFL and fp8 only). The LoRA's peft layers are unloaded after it: later sections run
   on the plain transformer.
5. ``lora_eager``: LoRAs on the eager engine: the first request with a new LoRA (reading and
   loading it), the same LoRA again (steady state), another LoRA; then unloaded.
6. ``step_cache``: the first-block step cache (``--step-cache``): speed and relative error against eager.
7. ``compiled``: the default on a GPU (the LoRA slot prepared, blocks compiled, common shapes warmed
   up with and without a LoRA): compile time, speed, ratios to eager and the baseline, relative error.
8. ``lora_compiled``: the same LoRA requests as ``lora_eager`` on the compiled engine, and the graphs
   dynamo built meanwhile (none is the goal): the LoRA-switch cost compiled against eager.
9. ``memory_flat``: GPU memory allocated before and after 20 predictions with 20 new prompts; it
   may grow by the prompt cache's own entries (16 at most), nothing more.
10. ``memory_modes``: each memory mode's peak (``torch.cuda.max_memory_allocated`` over a 1 MP
   prediction, and over loading): default, offload, fp8-offload, fp8, in that order (the weights go
   to host memory once; fp8 can follow fp8-offload, not the other way round), on the transformer
   without its LoRA slot or compiled blocks.
11. ``fp8_compiled`` (optional, ``--fp8-compile``, last): fp8 with an explicit ``--compile``
   (row-wise fp8 activations fused by the compiler) in a child process with what is left of the
   time budget; compiling fp8 blocks has been measured to take minutes, more than a 7-minute run has.
12. ``segmenter`` (with ``--segmenter`` folders; skipped without): masks without a brush, after
   FLUX is freed: a click, a box and a phrase to mask at 1024x768 and 2048x1536 (bench/masks.py),
   median and p90 in ms, and the ratio text/click.

A section that fails records its error and the others go on; a section the budget cannot fit says so.
Relative error: mean |a - b| / mean |b| of the decoded 8-bit pixels, same input and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(ROOT / "bench"))
from bench import data_uri, picture, relative_error  # noqa: E402  (bench/bench.py, the HTTP benchmark)

PROMPT = "a red armchair in a sunlit room"
GIB = 1024**3


class Check:
    """The run's settings, its deadline and the report it fills in."""

    def __init__(self, args):
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.report: dict = {"device": args.device, "weights": args.weights, "budget_s": args.budget_s,
                             "side": args.side, "steps": args.steps, "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        Path(self.args.out).write_text(json.dumps(self.report, indent=2))

    def section(self, name: str, fn, *, needs_s: float = 0.0, needs_cuda: bool = False):
        """Run one section, recording its figures, or its error, or why it did not run."""
        why = "needs a CUDA GPU" if needs_cuda and not self.cuda else (
            f"{self.left():.0f} s of the budget left, the section needs about {needs_s:.0f} s"
            if self.left() < needs_s else None)
        if why:
            self.report["sections"][name] = {"skipped": why}
            print(f"[{time.monotonic() - self.started:6.1f} s] {name}: skipped, {why}", flush=True)
            return None
        started = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # one section's failure is a figure too; the others still run
            result = {"error": f"{type(exc).__name__}: {exc}".split("\n")[0], "traceback": traceback.format_exc()}
        result = dict(result or {})
        result["section_s"] = round(time.monotonic() - started, 2)
        self.report["sections"][name] = result
        self.write()
        print(f"[{time.monotonic() - self.started:6.1f} s] {name}: "
              f"{json.dumps({k: v for k, v in result.items() if k != 'traceback'})}", flush=True)
        return result


# -- measuring -------------------------------------------------------------------------------------


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gib(value: float | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def peak(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    return gib(torch.cuda.max_memory_allocated())


def allocated(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def engine_input(check: Check, *, prompt: str = PROMPT, steps: int | None = None, side: int | None = None,
                 lora_weights: str | None = None):
    from inference.inputs import parse_input

    side = side or check.args.side
    img, mask = picture(side)
    lora = {"lora_weights": lora_weights} if lora_weights else {}
    return parse_input({"prompt": prompt, "image": data_uri(img), "mask": data_uri(mask), "seed": 42,
                        "megapixels": "match_input", "num_inference_steps": steps or check.args.steps,
                        "guidance": 30, "output_format": "png", "disable_safety_checker": True, **lora})


def timed_engine_run(check: Check, engine, inp) -> dict:
    """End to end through Engine.predict, each step's time (the GPU synchronised at each step), pixels.
    The prompt cache is emptied first: T5 runs, as it does in the baseline, and the same input gives
    comparable pixels across sections."""
    import io

    import numpy as np
    from PIL import Image

    stamps = []

    def on_step(_done, _total):
        sync(check.cuda)
        stamps.append(time.perf_counter())

    engine._prompts.clear()
    sync(check.cuda)
    t = time.perf_counter()
    out = engine.predict(inp, on_step=on_step, log=lambda _m: None)[0]
    total = time.perf_counter() - t
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    pixels = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), dtype=np.float32)
    return {"e2e_s": round(total, 3), "step_s": round(statistics.median(steps), 4) if steps else None,
            "tree": tree(engine.pipeline.transformer), "pixels": pixels}


def tree(transformer) -> dict:
    """The module tree a run ran on: peft's layers in it (a LoRA's, or the compiled transformer's LoRA
    slot) and blocks compiled."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from inference.accel import BLOCK_LISTS

    blocks = [b for name in BLOCK_LISTS for b in getattr(transformer, name, [])]
    return {"peft_layers": sum(isinstance(m, BaseTunerLayer) for m in transformer.modules()),
            "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)}


def figures(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "pixels"}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- the sections ----------------------------------------------------------------------------------


def options(check: Check, **speed):
    """The engine options of this run's weights and device, with the speed options given (the
    factory the server builds its engines with: inference.factory)."""
    from inference.factory import EngineOptions

    return EngineOptions(weights=check.args.weights, device=check.args.device, **speed)


def build(check: Check, state: dict) -> dict:
    from inference import factory

    reset_peak(check.cuda)
    t = time.perf_counter()
    state["model"] = factory.load(options(check))
    sync(check.cuda)
    return {"seconds": round(time.perf_counter() - t, 1), "name": state["model"].name,
            "dtype": state["model"].dtype, "peak_gib": peak(check.cuda)}


def baseline(check: Check, state: dict) -> dict:
    """diffusers' own __call__ on the same components: one short warm-up, then the timed run."""
    pipe = state["model"].pipeline
    pipe.set_progress_bar_config(disable=True)
    img, mask = picture(check.args.side)
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        sync(check.cuda)
        stamps.append(time.perf_counter())
        return kwargs

    def call(steps):
        import torch

        return pipe(prompt=PROMPT, image=img, mask_image=mask, height=check.args.side, width=check.args.side,
                    num_inference_steps=steps, guidance_scale=30, max_sequence_length=512,
                    generator=torch.Generator("cpu").manual_seed(42), callback_on_step_end=on_step).images[0]

    call(2)
    stamps.clear()
    sync(check.cuda)
    t = time.perf_counter()
    call(check.args.steps)
    total = time.perf_counter() - t
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"e2e_s": round(total, 3), "step_s": round(statistics.median(steps), 4) if steps else None,
            "tree": tree(pipe.transformer)}


def eager(check: Check, state: dict) -> dict:
    from inference import factory

    engine = state["engine"] = factory.assemble(state["model"], options(check, compile=False))
    timed_engine_run(check, engine, engine_input(check, steps=2))  # the same warm-up the baseline had
    run = timed_engine_run(check, engine, engine_input(check))
    state["eager"] = run
    base = check.report["sections"].get("baseline", {})
    return {**figures(run), "speedup_vs_baseline": ratio(base.get("e2e_s"), run["e2e_s"]),
            "step_speedup_vs_baseline": ratio(base.get("step_s"), run["step_s"])}


def previews(check: Check, state: dict) -> dict:
    from previews import measure  # bench/previews.py

    return measure(state["engine"], engine_input(check), cuda=check.cuda, repeats=2)


def formats(check: Check, state: dict) -> dict:
    """The loading paths on the device itself: a LoRA with norms on the model being measured, and each
    checkpoint layout (one block of each kind at FLUX.1's width, 3072, which diffusers' converter
    needs) loaded onto the device in the compute dtype and compared with the values it was made from."""
    import torch
    from diffusers import FluxTransformer2DModel

    from inference.checkpoints import inspect, load_transformer, transformer_config
    from inference.lora import LoraManager, LoraSettings
    from inference.testing.checkpoint_files import save_bfl, save_comfy_scaled_fp8, save_fp8, save_gguf
    from inference.testing.lora_files import peft_lora

    device, dtype = check.args.device, (torch.bfloat16 if check.cuda else torch.float32)
    tokens = 256 if check.cuda else 16
    result: dict = {}
    engine = state["engine"]
    transformer = engine.pipeline.transformer
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lora = peft_lora(transformer, folder / "norms.safetensors", rank=8, norms=True)
        inputs = _real_inputs(transformer.config, device, next(transformer.parameters()).dtype, tokens)
        base = _forward(transformer, inputs)
        manager = LoraManager(engine.pipeline, LoraSettings(allow_paths=True))
        with manager.applied(str(lora), 1.0):
            with_lora = _forward(transformer, inputs)
        after = _forward(transformer, inputs)
        manager.clear()
        engine.pipeline.unload_lora_weights()  # peft's layers out: later sections measure the plain transformer
        result["lora"] = {"base_back_bit_for_bit": bool(torch.equal(base, after)),
                          "changed_the_output": not bool(torch.equal(base, with_lora)),
                          "tree_after": tree(transformer)}
        names = ("patch_size", "in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim",
                 "guidance_embeds")
        config = {**{k: transformer.config[k] for k in names}, "attention_head_dim": 128, "num_attention_heads": 24,
                  "axes_dims_rope": (16, 56, 56), "num_layers": 1, "num_single_layers": 1}
        torch.manual_seed(0)
        with torch.device(device):
            small = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
        small_inputs = _real_inputs(small.config, device, dtype, tokens)
        reference = _forward(small, small_inputs)
        files = {"bfl": save_bfl(small, folder / "bfl.safetensors", prefix="model.diffusion_model."),
                 "fp8": save_fp8(small, folder / "fp8.safetensors")}
        if check.cuda:
            files["scaled_fp8"] = save_comfy_scaled_fp8(small, folder / "scaled.safetensors")
            try:
                save_gguf(small.float().cpu(), folder / "q8.gguf", {"double_blocks.0.img_attn.qkv.weight": "Q8_0",
                                                                     "single_blocks.0.linear1.weight": "Q8_0"})
                files["gguf"] = folder / "q8.gguf"
            except ImportError:
                result["gguf"] = {"skipped": "the gguf package is not installed"}
        else:  # the same loop as the two above; writing these at FLUX.1's width takes the CPU most of a minute
            for name in ("scaled_fp8", "gguf"):
                result[name] = {"skipped": "on a GPU only (on the CPU, tests/inference/test_checkpoints.py loads it)"}
        del small
        for name, path in files.items():
            try:
                info = inspect(path)
                started = time.perf_counter()
                model = load_transformer(info, transformer_config(info, folder), dtype).to(device)
                sync(check.cuda)
                load_s = time.perf_counter() - started
                out = _forward(model, small_inputs)
                error = float((out.float() - reference.float()).abs().mean() / reference.float().abs().mean())
                stored = sum(getattr(p, "qdata", p).numel() * getattr(p, "qdata", p).element_size()
                             for p in model.parameters())
                result[name] = {"load_s": round(load_s, 2), "finite": bool(torch.isfinite(out).all()),
                                "rel_error_vs_source": round(error, 4), "weights_mib": round(stored / 1024**2, 1),
                                "layout": info.describe()}
                del model
            except Exception as exc:
                result[name] = {"error": f"{type(exc).__name__}: {exc}".split("\n")[0]}
    if check.cuda:
        torch.cuda.empty_cache()
    return result


def _real_inputs(config, device, dtype, tokens: int):
    import torch

    gen = torch.Generator("cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    text = max(8, tokens // 4)
    return dict(hidden_states=rand(1, tokens, config.in_channels), encoder_hidden_states=rand(1, text, config.joint_attention_dim),
                pooled_projections=rand(1, config.pooled_projection_dim),
                timestep=torch.tensor([0.5], device=device, dtype=dtype), img_ids=rand(tokens, 3),
                txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)


def _forward(transformer, inputs):
    import torch

    with torch.inference_mode():
        return transformer(**inputs)[0]


def step_cache(check: Check, state: dict) -> dict:
    from diffusers.hooks import FirstBlockCacheConfig

    engine, transformer = state["engine"], state["engine"].pipeline.transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=check.args.step_cache))
    accelerator = engine.accelerator
    accelerator.step_cache_on = True  # the engine scopes the cache to each denoising loop
    try:
        run = timed_engine_run(check, engine, engine_input(check))
    finally:
        accelerator.step_cache_on = False
        transformer.disable_cache()
    return {**figures(run), "threshold": check.args.step_cache,
            "speedup_vs_eager": ratio(state["eager"]["e2e_s"], run["e2e_s"]),
            "rel_error_vs_eager": round(relative_error(run["pixels"], state["eager"]["pixels"]), 5)}


def lora_requests(check: Check, state: dict, label: str) -> dict:
    """The LoRA requests both engines get: a new LoRA (read, loaded: the switch), the same again
    (steady state), another new one, and a request without a LoRA; their times and pixels, and the
    graphs dynamo built meanwhile."""
    from inference.accel import WATCH
    from inference.lora import LoraSettings

    engine = state["engine"]
    folder = state.setdefault("lora_folder", Path(state["tmp"]) / "loras")
    if not folder.is_dir():  # the same two files for both engines: rank 16 over the attention and MLP inputs
        from inference.testing.lora_files import peft_lora

        folder.mkdir(parents=True)
        for i in range(2):
            peft_lora(engine.pipeline.transformer, folder / f"style{i}.safetensors", rank=16, seed=50 + i)
    engine.loras.settings = LoraSettings(folder=folder)
    graphs = WATCH.graphs()
    runs = {}
    for name, lora in (("first_a", "style0"), ("steady_a", "style0"), ("first_b", "style1"), ("steady_b", "style1"),
                       ("none", None)):
        runs[name] = timed_engine_run(check, engine, engine_input(check, lora_weights=lora))
    result = {name: {k: v for k, v in run.items() if k in ("e2e_s", "step_s")} for name, run in runs.items()}
    result["switch_s"] = round(runs["first_a"]["e2e_s"] - runs["steady_a"]["e2e_s"], 3)
    result["graphs_built"] = WATCH.graphs() - graphs
    result["tree"] = runs["steady_a"]["tree"]
    state[label] = {**result, "pixels": runs["steady_a"]["pixels"]}
    return result


def lora_eager(check: Check, state: dict) -> dict:
    """LoRA requests on the eager engine, each LoRA its own peft adapter; unloaded after."""
    result = lora_requests(check, state, "lora_eager")
    engine = state["engine"]
    engine.loras.clear()
    engine.pipeline.unload_lora_weights()
    return result


def lora_compiled(check: Check, state: dict) -> dict:
    """The same LoRA requests on the compiled engine (its LoRA slot): the switch's cost against eager."""
    result = lora_requests(check, state, "lora_compiled")
    eager_run = state.get("lora_eager", {})
    result["first_a_vs_eager"] = ratio(eager_run.get("first_a", {}).get("e2e_s"), result["first_a"]["e2e_s"])
    result["steady_a_vs_eager"] = ratio(eager_run.get("steady_a", {}).get("e2e_s"), result["steady_a"]["e2e_s"])
    if "pixels" in eager_run:
        result["rel_error_vs_eager"] = round(relative_error(state["lora_compiled"]["pixels"], eager_run["pixels"]), 5)
    state["engine"].loras.clear()
    return result


def compiled(check: Check, state: dict) -> dict:
    from inference import factory
    from inference.accel import WATCH

    # On the CPU (the smoke test) the blocks go through dynamo to its "eager" backend: the same path, no
    # minutes of C++ compiling.
    compiling = options(check, compile=None if check.cuda else True,
                        compile_backend="inductor" if check.cuda else "eager",
                        warmup_shapes=((check.args.side, check.args.side, 1),
                                       (check.args.side // 2, check.args.side // 2, 1)))
    t = time.perf_counter()
    engine = state["engine"] = factory.assemble(state["model"], compiling)
    warm = engine.accelerator.warmup_s
    compile_s = time.perf_counter() - t
    run = timed_engine_run(check, engine, engine_input(check))
    base = check.report["sections"].get("baseline", {})
    return {**figures(run), "compile_and_warmup_s": round(compile_s, 1), "warmup_s": round(warm, 1),
            "applied": engine.accelerator.applied, "recompiles_after_warmup": WATCH.recompiles,
            "speedup_vs_eager": ratio(state["eager"]["e2e_s"], run["e2e_s"]),
            "step_speedup_vs_eager": ratio(state["eager"]["step_s"], run["step_s"]),
            "speedup_vs_baseline": ratio(base.get("e2e_s"), run["e2e_s"]),
            "rel_error_vs_eager": round(relative_error(run["pixels"], state["eager"]["pixels"]), 5)}


def memory_flat(check: Check, state: dict) -> dict:
    """20 new prompts: GPU memory may grow by the prompt cache's own entries and by nothing else."""
    import torch

    from inference import engine as engine_module

    engine = state["engine"]
    side = max(64, check.args.side // 2)
    engine.predict(engine_input(check, prompt="memory warm-up", steps=2, side=side), log=lambda _m: None)
    before = allocated(check.cuda)
    cached_before = len(engine._prompts)
    for i in range(check.args.prompts):
        engine.predict(engine_input(check, prompt=f"prompt {i}: a house with {i} windows", steps=2, side=side),
                       log=lambda _m: None)
    after = allocated(check.cuda)
    entry = sum(t.numel() * t.element_size() for t in next(iter(engine._prompts.values())))
    cache_growth = (len(engine._prompts) - cached_before) * entry
    graphs = sum(1 for pair in engine._prompts.values() for t in pair if t.grad_fn is not None or t.requires_grad)
    result = {"prompts": check.args.prompts, "cache_entries": len(engine._prompts),
              "cache_limit": engine_module.PROMPT_CACHE_SIZE, "entry_mib": round(entry / 1024**2, 2),
              "embeddings_with_a_graph": graphs}
    if check.cuda:
        growth = after - before
        result.update(allocated_growth_mib=round(growth / 1024**2, 1),
                      beyond_the_cache_mib=round((growth - cache_growth) / 1024**2, 1),
                      flat=bool(growth - cache_growth < 64 * 1024**2 and graphs == 0))
    else:
        result["flat"] = graphs == 0
    torch.cuda.empty_cache() if check.cuda else None
    return result


def memory_modes(check: Check, state: dict) -> dict:
    """Each mode's peak over a 1 MP prediction, from the weights in host memory (as the mode loads)."""
    import torch

    from inference import accel, factory

    model = state.pop("model")
    engine = state.pop("engine")
    pipe = model.pipeline
    if engine.loras.slot is not None:  # the modes' own figures: no LoRA slot ...
        engine.loras.slot.remove()
    for transformer in (pipe.transformer,):
        for name in accel.BLOCK_LISTS:  # ... and no compiled blocks
            for block in getattr(transformer, name):
                block._compiled_call_impl = None
    del engine
    results = {}
    reset_peak(check.cuda)
    run = timed_engine_run(check, factory.assemble(model, options(check, compile=False)), engine_input(check))
    results["default"] = {"peak_gib": peak(check.cuda), "e2e_s": run["e2e_s"], "tree": run["tree"]}
    pipe.to("cpu")
    torch.cuda.empty_cache()
    for mode in ("offload", "fp8-offload", "fp8"):
        if check.left() < 45:
            results[mode] = {"skipped": "time budget"}
            continue
        try:
            if hasattr(pipe, "remove_all_hooks"):
                pipe.remove_all_hooks()
            pipe.to("cpu")
            torch.cuda.empty_cache()
            reset_peak(check.cuda)
            t = time.perf_counter()
            engine = factory.assemble(model, options(check, memory_mode=mode, compile=False))
            speed = engine.accelerator
            load_s = time.perf_counter() - t
            load_peak = peak(check.cuda)
            reset_peak(check.cuda)
            run = timed_engine_run(check, engine, engine_input(check))
            results[mode] = {"peak_gib": peak(check.cuda), "load_peak_gib": load_peak, "apply_s": round(load_s, 1),
                             "e2e_s": run["e2e_s"], "step_s": run["step_s"], "applied": speed.applied,
                             "rel_error_vs_eager": round(relative_error(run["pixels"], state["eager"]["pixels"]), 5)}
        except Exception as exc:
            results[mode] = {"error": f"{type(exc).__name__}: {exc}".split("\n")[0]}
    return results


def fp8_compiled(check: Check, _state: dict) -> dict:
    """fp8 with an explicit --compile, in a child process with the budget that is left."""
    timeout = max(30.0, check.left() - 10)
    cmd = [sys.executable, __file__, "--child-fp8-compile", "--device", check.args.device, "--weights",
           check.args.weights, "--side", str(check.args.side), "--steps", str(check.args.steps)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within the {timeout:.0f} s left of the budget (compiling fp8 blocks)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(lines[-1])


def segmenter(check: Check, _state: dict) -> dict:
    """Click, box and phrase to mask with --segmenter's models (bench/masks.py's measure), 5 runs each."""
    import torch
    from masks import measure  # bench/masks.py

    from inference.segment import DEFAULT_THRESHOLD, load_segmenter

    t = time.perf_counter()
    reset_peak(check.cuda)
    model = load_segmenter(check.args.segmenter, check.args.device)
    result: dict = {"sources": model.sources, "load_s": round(time.perf_counter() - t, 1)}
    threshold = 0.01 if model.demo else DEFAULT_THRESHOLD  # random weights find regions only at a low score
    with torch.inference_mode():
        for width, height in ((1024, 768), (2048, 1536)):
            figures = measure(model, width, height, runs=5, warmup=1, threshold=threshold)
            size = figures.pop("size")
            result[size] = {k: ({q: round(v, 1) for q, v in f.items()} if isinstance(f, dict) else round(f, 2))
                            for k, f in figures.items()}
    result["peak_gib"] = peak(check.cuda)
    del model
    if check.cuda:
        torch.cuda.empty_cache()
    return result


def child_fp8_compile(args) -> None:
    """Build, quantise to row-wise fp8 with compiling, warm up, time one run; print one JSON line."""
    from inference import factory

    check = Check(args)
    t = time.perf_counter()
    # Built on the device (as random-real is fastest made), then quantised there block by block.
    model = factory.load(options(check))
    built = time.perf_counter() - t
    t = time.perf_counter()
    engine = factory.assemble(model, options(check, memory_mode="fp8", compile=True,
                                             warmup_shapes=((args.side, args.side, 1),)))
    speed = engine.accelerator
    compile_s = time.perf_counter() - t
    reset_peak(check.cuda)
    run = timed_engine_run(check, engine, engine_input(check))
    print(json.dumps({**figures(run), "build_s": round(built, 1), "quantise_compile_warmup_s": round(compile_s, 1),
                      "peak_gib": peak(check.cuda), "applied": speed.applied}))


# -- the run -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of this script)")
    parser.add_argument("--weights", default=None, help="random-real on a GPU (default), the tiny model on the CPU")
    parser.add_argument("--out", default="gpu-report.json", help="where the JSON report goes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="the whole run's time budget (7 minutes on one H100: with a machine's start, under 8)")
    parser.add_argument("--side", type=int, default=None, help="image side: 1024 (1 MP) on a GPU, 64 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps: 28 on a GPU, 2 on the CPU")
    parser.add_argument("--prompts", type=int, default=20, help="new prompts for the memory check")
    parser.add_argument("--step-cache", type=float, default=0.08, help="the step cache's threshold")
    parser.add_argument("--fp8-compile", action="store_true",
                        help="also run fp8_compiled, last (compiling fp8 blocks takes minutes: give it --budget-s)")
    parser.add_argument("--segmenter", default=None,
                        help="SAM and Grounding DINO folders (comma-separated, as serve takes them): time click "
                             "and text to mask last but fp8_compiled")
    parser.add_argument("--child-fp8-compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.weights = args.weights or ("random-real" if cuda else "tiny")
    args.side = args.side or (1024 if cuda else 64)
    args.steps = args.steps or (28 if cuda else 2)
    if args.child_fp8_compile:
        child_fp8_compile(args)
        return 0
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --device cpu for the smoke test", file=sys.stderr)
            return 2
    check = Check(args)
    import diffusers
    import torch

    check.report.update(torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
                        gpu=torch.cuda.get_device_name() if cuda else None)
    state: dict = {"tmp": tempfile.mkdtemp(prefix="gpu-check-")}
    check.section("build", lambda: build(check, state))
    if "model" not in state:
        return finish(check, 1)
    check.section("baseline", lambda: baseline(check, state), needs_s=20 if cuda else 0)
    check.section("eager", lambda: eager(check, state), needs_s=20 if cuda else 0)
    if "engine" in state:
        check.section("previews", lambda: previews(check, state), needs_s=40 if cuda else 0)
        check.section("formats", lambda: formats(check, state), needs_s=30 if cuda else 0)
        check.section("lora_eager", lambda: lora_eager(check, state), needs_s=40 if cuda else 0)
        check.section("step_cache", lambda: step_cache(check, state), needs_s=15 if cuda else 0)
        check.section("compiled", lambda: compiled(check, state), needs_s=90 if cuda else 0)
        check.section("lora_compiled", lambda: lora_compiled(check, state), needs_s=30 if cuda else 0)
        check.section("memory_flat", lambda: memory_flat(check, state), needs_s=20 if cuda else 0)
        check.section("memory_modes", lambda: memory_modes(check, state), needs_s=90, needs_cuda=True)
    tmp = state["tmp"]
    state.clear()
    shutil.rmtree(tmp, ignore_errors=True)
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    if args.segmenter:
        check.section("segmenter", lambda: segmenter(check, state), needs_s=30 if cuda else 0)
    else:
        check.report["sections"]["segmenter"] = {
            "skipped": "no --segmenter: give the SAM and Grounding DINO folders to time click and text to mask"}
    if args.fp8_compile:
        check.section("fp8_compiled", lambda: fp8_compiled(check, state), needs_s=120, needs_cuda=True)
    else:
        check.report["sections"]["fp8_compiled"] = {
            "skipped": "optional: --fp8-compile runs it last (compiling fp8 blocks takes minutes)"}
    return finish(check, 0)


def finish(check: Check, code: int) -> int:
    check.write()
    print(f"report: {check.args.out} ({check.report['elapsed_s']} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
