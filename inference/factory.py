"""One way to build a serving engine: the weights loaded, the speed options applied, warmed up.

The server (one engine per device), ``flux-fill predict`` and the benchmarks all build their engine
here, so what ``/health`` reports is what a benchmark measured and what the CLI ran::

    engine = build_engine(EngineOptions(weights="/models/fill", memory_mode="fp8"))

``build_engine`` is :func:`load` then :func:`assemble`; a benchmark that measures several
configurations on one set of weights loads once and assembles each configuration on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import accel
from .engine import Engine, EngineSettings
from .images import DEFAULT_MAX_PIXELS, FetchPolicy
from .inputs import MAX_OUTPUTS
from .lora import LoraSettings
from .weights import LoadedModel

LoadModel = Callable[..., LoadedModel]  # inference.weights.load_model's signature


@dataclass
class EngineOptions:
    """Everything that decides how an engine is built (every speed option off by default)."""

    weights: str | None = "tiny"  # a diffusers folder, a .safetensors file, a repo id, "tiny" or "random-real"
    components: str | None = None  # with a single-file ``weights``: the other components' folder
    device: str | None = None  # None: the first GPU, else the CPU
    # Speed (inference.accel): the memory mode also decides where the weights are loaded.
    memory_mode: accel.MemoryMode = "default"
    compile: bool | None = None  # None: on with a CUDA GPU, off on the CPU
    compile_backend: object = "inductor"
    fast_mode: bool = False  # honour go_fast
    step_cache: float = 0.0
    attention_backend: str = "default"
    cache_dir: Path | None = None  # compile caches kept across restarts
    warm_up: bool = True  # run the common shapes at build time when something was compiled or quantised
    warmup_shapes: tuple = accel.WARMUP_SHAPES
    # The engine's limits and inputs.
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = MAX_OUTPUTS
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    lora: LoraSettings = field(default_factory=LoraSettings)
    allow_paths: bool = False  # local file paths as image inputs (the CLI)

    def accel_options(self) -> accel.AccelOptions:
        return accel.AccelOptions(compile=self.compile, compile_backend=self.compile_backend,
                                  fast_mode=self.fast_mode, memory_mode=self.memory_mode,
                                  step_cache=self.step_cache, attention_backend=self.attention_backend,
                                  cache_dir=self.cache_dir, warmup=self.warm_up, warmup_shapes=self.warmup_shapes)

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(max_pixels=self.max_pixels, fetch_policy=self.fetch_policy, allow_paths=self.allow_paths,
                              max_batch=self.max_batch, lora=self.lora, fast_mode=self.fast_mode)


def build_engine(options: EngineOptions, *, load_model: LoadModel | None = None) -> Engine:
    """Load the weights and assemble the engine. ``load_model`` stands in for
    :func:`inference.weights.load_model` (tests). Raises WeightsError or AccelError in one sentence."""
    return assemble(load(options, load_model=load_model), options)


def load(options: EngineOptions, *, load_model: LoadModel | None = None) -> LoadedModel:
    """The weights, where the memory mode wants them: the memory modes place them on the GPU
    themselves (fp8 block by block, or offloaded), so they load into host memory first."""
    if load_model is None:
        from .weights import load_model
    offload = {"offload": True} if accel.loads_in_host_memory(options.memory_mode) else {}
    return load_model(options.weights, components=options.components, device=options.device, **offload)


def assemble(model: LoadedModel, options: EngineOptions) -> Engine:
    """The speed options applied to ``model``, the engine on it, warmed up; what was applied is
    in ``model.extras["speed"]`` (``/health`` shows it)."""
    speed = accel.apply(model, options.accel_options())
    engine = Engine(model, options.engine_settings())
    engine.accelerator = speed
    if speed.lora_slot is not None:  # compiled blocks: LoRAs are written into their slot
        engine.loras.use_slot(speed.lora_slot)
    speed.warm_up(engine)
    model.extras["speed"] = speed.describe()
    return engine


__all__ = ["EngineOptions", "assemble", "build_engine", "load"]
