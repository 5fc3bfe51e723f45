"""Speed options applied to a loaded pipeline, chosen by the server's settings.

``apply(model, options)`` returns an :class:`Accelerator`; the engine asks it for a context around
every denoising loop (``Accelerator.run(go_fast)``), which swaps in the fast transformer for
``go_fast`` requests and scopes the step cache to one loop. On the CPU the defaults change nothing:
the outputs are the plain engine's, bit for bit. On a GPU the default compiles the blocks, which
changes results only by float reassociation (a level in 8 bits here and there).

The options, and why each is built the way it is (figures from ``GPU-NOTES.md``, one H100):

- ``compile``: ``block.compile()`` on each of the 19 double and 38 single transformer blocks, not
  the whole model. On by default with a CUDA GPU (``None`` means that: on for CUDA, off on the
  CPU); then a shape that fails to compile falls back to eager for that call instead of failing the
  prediction (``suppress_errors``, and no ``fullgraph``, which would turn any error into an
  exception; the blocks have no graph breaks, so they still compile whole). ``True`` compiles on
  any device with ``fullgraph=True`` and lets errors surface. The default leaves fp8 transformers
  eager (compiling an fp8 block was measured to take minutes); ``True`` compiles them too.
  Identical blocks share one graph, so the transformer compiles in about 22 s (a whole-model
  ``max-autotune`` compile did not finish in 10 minutes); a 1 MP step goes from 0.184 to 0.133 s.
  Inductor's FX-graph cache and Triton's kernel cache live in ``<data-dir>/compile-cache`` so a
  restart reuses them. Shapes: the text is always 512 tokens; the image token count and the batch
  vary with the request. ``dynamic=None`` (PyTorch's automatic dynamic shapes) compiles the first
  shape statically and, on the first recompile for a new shape, marks the changed dimensions
  dynamic, so arbitrary ``match_input`` sizes do not recompile forever; ``dynamic=False`` would give
  each size its own static graph (slightly faster kernels) but recompile for every aspect ratio
  until the recompile limit sends the block back to eager. ``mark_dynamic`` up front would make
  even the 1 MP square dynamic. The warm-up runs the common shapes (1 MP and 0.25 MP squares, then
  0.25 MP with two outputs; 2 steps each) at startup so no request pays for compiling.
  LoRAs: before compiling, the transformer gets one LoRA adapter over every linear layer, the slot
  (:mod:`inference.lora_slot`, rank ``lora_rank``), which each LoRA is written into and each scale
  filled into as tensors, and the warm-up runs every shape with the slot on and off: no LoRA, scale
  or switch between them compiles anything. What still compiles after the warm-up (a recompile) and
  what dynamo gives up on (run eager from then on) is said in the log and counted in ``describe()``
  (``recompiles_after_warmup``, ``eager_fallbacks``; :data:`WATCH`).
- attention backend: PyTorch's SDPA picks cuDNN on an H100, which measured fastest (0.186 s a step
  against 0.208 flash, 0.249 efficient), so the default is left alone; ``attention_backend`` hands
  any other name to diffusers' ``set_attention_backend`` (e.g. ``_flash_3`` where installed).
- ``fast_mode`` (``go_fast``): fp8 row-wise weights and activations from torchao
  (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``) on the linear layers of the
  transformer blocks. When the GPU has room for both, a second transformer is made that shares every
  non-linear parameter with the bf16 one (only the fp8 weights are new, about 12 GB) and is used for
  ``go_fast`` requests; otherwise the transformer is quantised in place and every request runs fast.
  Eager fp8 is slower than bf16 on an H100 (0.300 vs 0.184 s a step): the gain needs the activation
  quantisation fused into the producing op, i.e. an explicit ``--compile`` as well. A LoRA is
  applied to the bf16 transformer only, so a ``go_fast`` request with a LoRA runs the bf16 one.
- ``step_cache``: diffusers' First Block Cache: when the first block's residual changes by less than
  the threshold (relative mean) from the last computed step, the other blocks are skipped and their
  cached residual reused. 0 turns it off. Its check reads a value back from the GPU each step, which
  breaks a compiled graph, so with ``compile`` the blocks are compiled without ``fullgraph``.
- torchao's configs are applied with ``set_inductor_config`` off: left on (torchao's default), they
  switch on inductor's coordinate-descent autotuning for the whole process, and every later compile,
  the bf16 blocks' too, autotunes far longer.
- ``memory_mode``: for cards smaller than the 34 GB the bf16 weights take.
  ``fp8`` (24 GB cards): the transformer's block linears and the T5 encoder's linears hold fp8
  weights (about 12 + 4.7 GB), everything stays on the GPU. The transformer is quantised one block at
  a time on the way to the GPU, so the bf16 transformer is never on the card whole. Its fp8 is
  weights dequantised per matmul (close to bf16 speed); with an explicit ``--compile`` on compute
  capability 8.9+, torchao's row-wise dynamic fp8 of weights and activations, whose activation
  quantisation the compiler fuses. T5 always gets the weight-only kind. LoRAs still apply (peft adds
  its layers beside the fp8 linears). ``fp8-offload`` (16 GB cards): the same fp8 weights, each model
  on the GPU only while it runs. ``offload`` (32 GB cards): bf16, each model on the GPU only while it
  runs (diffusers' ``enable_model_cpu_offload``); ``sequential-offload`` streams every layer (much
  slower, least memory). The engine calls ``pipe.transformer(...)``, ``pipe.vae.encode/decode`` and
  ``pipe.encode_prompt`` directly; accelerate's hooks sit on the modules' ``forward``, so they still
  apply, and ``pipe._execution_device`` reads the GPU from those hooks. The weights are then loaded
  on the CPU (in bf16) instead of straight onto the GPU.

Its length: each speed option (compile, fp8, step cache, offload, memory modes) needs its own
checks of the device and the weights, and they are combined in one order here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from .lora_slot import DEFAULT_RANK as DEFAULT_LORA_RANK

log = logging.getLogger(__name__)

MemoryMode = Literal["default", "fp8", "fp8-offload", "offload", "sequential-offload"]  # --memory-mode's choices
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)
FP8_MEMORY_MODES = ("fp8", "fp8-offload")
OFFLOAD_MODES = {"fp8-offload": "model", "offload": "model", "sequential-offload": "sequential"}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# The 1 MP and 0.25 MP squares, then a batch of two: after these the blocks have a static graph for
# the 1 MP square and one with dynamic sizes and batch for everything else, so no request compiles.
WARMUP_SHAPES = ((1024, 1024, 1), (512, 512, 1), (512, 512, 2))
WARMUP_STEPS = 2
# What a 1 MP, 4-output step needs beyond the weights, kept free when deciding on a second transformer.
FAST_COPY_HEADROOM_BYTES = 12 * 1024**3
RECOMPILE_LIMIT = 32  # per block: room for the sizes a server meets before going dynamic


class AccelError(ValueError):
    """A speed option that cannot be used here, said in one sentence."""


@dataclass
class AccelOptions:
    """The speed options, from the server's settings (every one off by default)."""

    compile: bool | None = None  # None: on with a CUDA GPU, off on the CPU
    compile_backend: object = "inductor"
    fast_mode: bool = False
    memory_mode: MemoryMode = "default"
    step_cache: float = 0.0  # First Block Cache threshold; 0 is off
    attention_backend: str = "default"  # "default": PyTorch SDPA's own choice
    cache_dir: Path | None = None  # persistent compile caches
    warmup: bool = True
    warmup_shapes: tuple = WARMUP_SHAPES  # (width, height, outputs)
    lora_rank: int = DEFAULT_LORA_RANK  # the compiled transformer's LoRA slot (inference.lora_slot)


@dataclass
class Accelerator:
    """What was applied to one pipeline, and the per-loop context the engine enters."""

    pipeline: object
    options: AccelOptions
    device: str
    applied: list[str] = field(default_factory=list)  # what is on, for people
    notes: list[str] = field(default_factory=list)  # what was asked and not done, and why
    fast_transformer: object | None = None  # the separate fp8 transformer, when there is one
    all_fast: bool = False  # the transformer itself was quantised: every request runs fast
    fast_unavailable: str | None = None  # why go_fast runs the normal path
    step_cache_on: bool = False
    compiled: bool = False
    warmup_s: float = 0.0  # what the warm-up took
    lora_slot: object | None = None  # the compiled transformer's LoRA slot (inference.lora_slot.LoraSlot)
    _fast_notice_logged: bool = False
    _status: dict | None = None  # what describe() last gave: kept current as compiles are counted

    # -- per request ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, go_fast: bool = False, lora_active: bool = False):
        """The context of one denoising loop: the fast transformer for go_fast, the step cache's scope."""
        with contextlib.ExitStack() as stack:
            if go_fast:
                stack.enter_context(self.fast(lora_active=lora_active))
            if self.step_cache_on:
                transformer = self.pipeline.transformer
                stack.enter_context(transformer.cache_context("cond"))
                stack.callback(transformer._reset_stateful_cache)
            if self.compiled:
                stack.callback(self._count_compiles)
            yield

    def _count_compiles(self) -> None:
        """After a denoising loop: any graph built since the warm-up, and any block given up on, in
        the log and in describe() (``/health``'s speed)."""
        WATCH.check()
        if self._status is not None:
            self._status.update(WATCH.figures())
            if self.lora_slot is not None:
                self._status["lora_slot_rank"] = self.lora_slot.rank

    @contextlib.contextmanager
    def fast(self, lora_active: bool = False):
        """Swap in the fp8 transformer for the duration; a no-op (logged once) when there is none."""
        pipe = self.pipeline
        if self.fast_transformer is None or lora_active:
            if not self.all_fast:
                reason = "a LoRA is active, and LoRAs apply to the bf16 transformer" if lora_active else self.fast_unavailable
                if lora_active or not self._fast_notice_logged:
                    log.info("go_fast runs the normal path: %s", reason or "fast mode is off")
                    self._fast_notice_logged = self._fast_notice_logged or not lora_active
            yield
            return
        normal = pipe.transformer
        pipe.transformer = self.fast_transformer
        try:
            yield
        finally:
            pipe.transformer = normal

    def describe(self) -> dict:
        """For /health and the logs: what is on and what was refused."""
        fast = "off"
        if self.all_fast:
            fast = "fp8 in place (every request runs fast)"
        elif self.fast_transformer is not None:
            fast = "fp8 transformer for go_fast requests"
        elif self.options.fast_mode:
            fast = f"unavailable ({self.fast_unavailable})"
        status = {
            "compile": self.compiled,
            "fast_mode": fast,
            "memory_mode": self.options.memory_mode,
            "step_cache": self.options.step_cache if self.step_cache_on else 0.0,
            "attention_backend": self.options.attention_backend,
            "applied": list(self.applied),
            "notes": list(self.notes),
        }
        if self.compiled:  # counts that grow while serving: the same dict is kept current
            status.update(WATCH.figures())
            if self.lora_slot is not None:
                status["lora_slot_rank"] = self.lora_slot.rank
        self._status = status
        return status

    # -- startup ----------------------------------------------------------------------------------

    def warm_up(self, engine) -> float:
        """Run the common shapes once so compiling happens now, not on the first request."""
        if not (self.options.warmup and (self.compiled or self.fast_transformer is not None or self.all_fast)):
            return 0.0
        import base64

        from PIL import Image

        from .images import encode_image
        from .inputs import parse_input

        started = time.monotonic()
        # (go_fast, LoRA): the LoRA variant runs the slot switched on, so a first request with a LoRA
        # finds its graphs built.
        variants = [(False, False)] + ([(False, True)] if self.lora_slot is not None else []) + \
            ([(True, False)] if self.fast_transformer is not None else [])
        for width, height, outputs in self.options.warmup_shapes:
            image = Image.new("RGB", (width, height), (128, 128, 128))
            mask = Image.new("L", (width, height), 0)
            mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))

            def uri(img):
                return "data:image/png;base64," + base64.b64encode(encode_image(img, "png", 100)).decode()

            for go_fast, lora in variants:
                inp = parse_input({"prompt": "warm-up", "image": uri(image), "mask": uri(mask), "seed": 0,
                                   "megapixels": "match_input", "num_inference_steps": WARMUP_STEPS,
                                   "num_outputs": outputs, "output_format": "png", "disable_safety_checker": True,
                                   "go_fast": go_fast})
                t = time.monotonic()
                with engine.loras.warming() if lora else contextlib.nullcontext():
                    engine.predict(inp, log=lambda _m: None)
                log.info("warm-up %dx%d x%d%s: %.1f s", width, height, outputs,
                         " go_fast" if go_fast else " with a LoRA" if lora else "", time.monotonic() - t)
        elapsed = self.warmup_s = time.monotonic() - started
        self.applied.append(f"warm-up {elapsed:.1f} s")
        if self.compiled:
            WATCH.arm()  # from here on, a new graph is a recompile
        return elapsed


def apply(model, options: AccelOptions | None = None) -> Accelerator:
    """Apply the speed options to ``model.pipeline`` (in this order: memory mode, attention backend,
    fp8, step cache, compile) and return the Accelerator the engine uses."""
    options = options or AccelOptions()
    accel = Accelerator(pipeline=model.pipeline, options=options, device=str(model.device))
    cuda = accel.device.startswith("cuda")
    _memory_mode(accel, cuda)
    _attention_backend(accel)
    _fast_mode(accel, cuda)
    _step_cache(accel)
    if options.compile or (options.compile is None and cuda):
        _compile(accel)
    for line in accel.notes:
        log.warning("speed: %s", line)
    log.info("speed options: %s", ", ".join(accel.applied) or "none (eager, as loaded)")
    return accel


def loads_in_host_memory(memory_mode: str) -> bool:
    """Whether the weights are first loaded into host memory (the memory modes place them on the GPU
    themselves) rather than straight onto the GPU."""
    return memory_mode != "default"


# -- the options, one function each ----------------------------------------------------------------


def _memory_mode(accel: Accelerator, cuda: bool) -> None:
    mode = accel.options.memory_mode
    if mode not in MEMORY_MODES:
        raise AccelError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    if mode == "default":
        return
    if mode in OFFLOAD_MODES and not cuda:
        raise AccelError(f"--memory-mode {mode} offloads to a GPU, and this server runs on {accel.device}; "
                         "use --memory-mode default (or fp8, which saves host memory) on the CPU")
    pipe = accel.pipeline
    if mode in FP8_MEMORY_MODES:
        _fp8_weights(accel, cuda)
    if mode == "fp8":
        pipe.to(accel.device)  # what is still in host memory: the embedders, CLIP, the VAE
        return
    index = _device_index(accel.device)
    if OFFLOAD_MODES[mode] == "model":
        pipe.enable_model_cpu_offload(gpu_id=index)
        accel.applied.append(f"model CPU offload to cuda:{index}")
    else:
        pipe.enable_sequential_cpu_offload(gpu_id=index)
        accel.applied.append(f"sequential CPU offload to cuda:{index}")
    if str(pipe._execution_device) != f"cuda:{index}":  # the engine puts its tensors there
        raise AccelError(f"after offloading, the pipeline runs on {pipe._execution_device}, not cuda:{index}")


def _fp8_weights(accel: Accelerator, cuda: bool) -> None:
    """fp8 weights for the transformer blocks and the T5 encoder, quantised one block at a time on
    ``accel.device`` so the bf16 model is never on the GPU whole."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig
    except ImportError as exc:
        raise AccelError(f"--memory-mode {accel.options.memory_mode} needs torchao "
                         "(pip install 'flux-fill-server[gpu]')") from exc
    pipe = accel.pipeline
    # Row-wise dynamic fp8 only when its activation quantisation gets fused (an explicit --compile):
    # eager, it measured 1.6x slower than bf16, while fp8 weights dequantised per matmul run close to bf16.
    dynamic = cuda and accel.options.compile is True and _fp8_matmuls(accel.device)
    config = _fp8_dynamic_config() if dynamic else Float8WeightOnlyConfig()
    started = time.monotonic()
    before = _linear_bytes(pipe.transformer) + _linear_bytes(pipe.text_encoder_2)
    # Offloading: each quantised block goes back to host memory at once, so a 16 GB card never holds
    # more than one block beside what is already there.
    home = "cpu" if accel.options.memory_mode in OFFLOAD_MODES else None
    # An fp8 or GGUF checkpoint's transformer already holds its own quantised weights: they are moved,
    # not quantised again.
    from_checkpoint = _has_quantised(pipe.transformer)
    for name in BLOCK_LISTS:
        for block in getattr(pipe.transformer, name, []):
            quantise_blockwise(block, accel.device, config, home)
    t5_blocks = getattr(getattr(pipe.text_encoder_2, "encoder", None), "block", [])
    for block in t5_blocks:
        quantise_blockwise(block, accel.device, Float8WeightOnlyConfig(), home)
    after = _linear_bytes(pipe.transformer) + _linear_bytes(pipe.text_encoder_2)
    kind = "the checkpoint's own quantised weights" if from_checkpoint else (
        "row-wise fp8 weights and activations" if dynamic else "fp8 weights")
    accel.applied.append(f"{kind} in the transformer, fp8 weights in T5 ({_size(before)} -> {_size(after)}, "
                         f"{time.monotonic() - started:.1f} s)")
    if cuda:
        _empty_cuda_cache()


def quantise_blockwise(block, device: str, config, home: str | None = None) -> None:
    """Move one block to ``device``, give its linear layers fp8 weights there (layers a checkpoint
    already quantised, fp8 or GGUF, keep theirs), and move it to ``home`` after, when given."""
    import torch

    block.to(device)
    _quantize(block, config, lambda m, _fqn: isinstance(m, torch.nn.Linear) and not is_quantised(m.weight))
    if home is not None:
        block.to(home)


def _quantize(module, config, filter_fn) -> None:
    """torchao's ``quantize_`` with the config's ``set_inductor_config`` off. torchao's configs set
    it by default, and then switch on inductor's coordinate-descent autotuning (and more) for the
    whole process, so every later compile, the bf16 blocks' included, autotunes for far longer;
    inductor's settings stay as the server set them (``configure_compile_cache``)."""
    import dataclasses

    from torchao.quantization import quantize_

    if dataclasses.is_dataclass(config) and any(f.name == "set_inductor_config" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, set_inductor_config=False)
    quantize_(module, config, filter_fn=filter_fn)


def _linear_bytes(module) -> int:
    """The bytes of the linear layers' weights, fp8 ones counted at a byte an element (scales aside)."""
    import torch

    return sum(m.weight.numel() * (1 if _is_fp8(m.weight) else m.weight.element_size())
               for m in module.modules() if isinstance(m, torch.nn.Linear))


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _is_fp8(weight) -> bool:
    """torchao's quantised weights are tensor subclasses (Float8Tensor, or AffineQuantizedTensor before it)."""
    return getattr(weight, "qdata", None) is not None or "Float8" in type(weight).__name__ or \
        "Quantized" in type(weight).__name__


def _attention_backend(accel: Accelerator) -> None:
    name = accel.options.attention_backend
    if not name or name == "default":
        return
    transformer = accel.pipeline.transformer
    if not hasattr(transformer, "set_attention_backend"):
        accel.notes.append(f"attention backend {name} asked for, but this diffusers has no set_attention_backend")
        return
    try:
        transformer.set_attention_backend(name)
    except Exception as exc:  # an unknown name, or its kernels are not installed
        raise AccelError(f"attention backend {name!r} cannot be used here: {exc}".split("\n")[0]) from exc
    accel.applied.append(f"attention {name}")


def _fast_mode(accel: Accelerator, cuda: bool) -> None:
    if not accel.options.fast_mode:
        accel.fast_unavailable = "the server was started without --fast-mode"
        return
    why = _fp8_unavailable(accel, cuda)
    if why:
        accel.fast_unavailable = why
        accel.notes.append(f"--fast-mode: {why}; go_fast requests run the normal path")
        return
    pipe = accel.pipeline
    transformer = pipe.transformer
    fp8_bytes = sum(m.weight.numel() for m in _block_linears(transformer))
    free = _free_gpu_bytes(accel.device)
    if free >= fp8_bytes + FAST_COPY_HEADROOM_BYTES:
        accel.fast_transformer = _quantised_copy(transformer)
        accel.applied.append(f"fp8 transformer for go_fast ({fp8_bytes / 1024**3:.1f} GiB beside the bf16 one)")
    else:
        _quantise(transformer)
        accel.all_fast = True
        accel.applied.append(f"fp8 in place: {free / 1024**3:.1f} GiB free is too little for a second "
                             f"transformer ({fp8_bytes / 1024**3:.1f} GiB), so every request runs fp8")
    if accel.options.compile is False:
        accel.notes.append("fp8 without compiling is slower than bf16 on an H100 (the activation quantisation "
                           "is not fused); leave compiling on with --fast-mode")


def _fp8_unavailable(accel: Accelerator, cuda: bool) -> str | None:
    if not cuda:
        return f"fp8 needs a CUDA GPU and this server runs on {accel.device}"
    if accel.options.memory_mode in FP8_MEMORY_MODES:
        return f"the transformer already has fp8 weights (--memory-mode {accel.options.memory_mode})"
    if _has_quantised(accel.pipeline.transformer):
        return "the transformer's weights are already quantised (an fp8 or GGUF checkpoint)"
    if accel.options.memory_mode != "default":
        return f"fp8 is not combined with --memory-mode {accel.options.memory_mode}"
    if not _fp8_matmuls(accel.device):
        import torch

        major, minor = torch.cuda.get_device_capability(_device_index(accel.device))
        return f"fp8 matmuls need compute capability 8.9 or newer (Ada, Hopper); this GPU is {major}.{minor}"
    try:
        _fp8_dynamic_config()
    except ImportError:
        return "torchao is not installed (pip install 'flux-fill-server[gpu]')"
    return None


def _fp8_matmuls(device: str) -> bool:
    """Whether the GPU multiplies in fp8 (compute capability 8.9+: Ada, Hopper and newer)."""
    import torch

    return torch.cuda.get_device_capability(_device_index(device)) >= (8, 9)


def _fp8_dynamic_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _block_linears(transformer):
    import torch

    for name in BLOCK_LISTS:
        for block in getattr(transformer, name, []):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    yield module


def _quantise(module, config=None) -> None:
    """fp8 on the linears of the transformer blocks only (the embedders and the output projection
    stay bf16: they are small and sensitive). ``config``: torchao's; row-wise dynamic fp8 if none."""
    import torch

    block_linears = {id(m) for m in _block_linears(module)}
    _quantize(module, config or _fp8_dynamic_config(),
              lambda m, _fqn: isinstance(m, torch.nn.Linear) and id(m) in block_linears)


def _quantised_copy(transformer, config=None):
    """A second transformer sharing every parameter and buffer with ``transformer``, then quantised:
    quantize_ gives the copy's linears new fp8 weights and leaves the shared bf16 ones alone, so the
    copy costs only its fp8 weights (no transient second bf16 transformer)."""
    memo = {id(t): t for t in list(transformer.parameters()) + list(transformer.buffers())}
    fast = copy.deepcopy(transformer, memo)
    _quantise(fast, config)
    return fast


def _step_cache(accel: Accelerator) -> None:
    threshold = accel.options.step_cache
    if not threshold:
        return
    if threshold < 0:
        raise AccelError("--step-cache is a threshold >= 0 (0 turns it off)")
    try:
        from diffusers.hooks import FirstBlockCacheConfig
    except ImportError:
        accel.notes.append("--step-cache: this diffusers has no FirstBlockCacheConfig; the cache is off")
        return
    for transformer in _transformers(accel):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    accel.step_cache_on = True
    accel.applied.append(f"first-block step cache, threshold {threshold:g}")


def _compile(accel: Accelerator) -> None:
    import torch

    explicit = accel.options.compile is True
    if accel.options.memory_mode == "sequential-offload":
        accel.notes.append("compiling is not combined with sequential offload (its per-layer hooks break the graphs)")
        return
    configure_compile_cache(accel.options.cache_dir)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # The default: a shape that fails to compile runs eager (logged) rather than failing its prediction.
    torch._dynamo.config.suppress_errors = not explicit
    # The step cache reads a GPU value in the block hooks: a graph break, so no fullgraph then. By
    # default no fullgraph either: it would turn any compile error into an exception (the block has no
    # graph breaks, so it still compiles whole).
    fullgraph = explicit and not accel.step_cache_on
    transformers = list(_transformers(accel))
    if not explicit and _has_fp8(accel.pipeline.transformer):
        transformers = []
        accel.notes.append("the fp8 transformer is not compiled by default (compiling fp8 blocks was measured "
                           "to take minutes); pass --compile to compile it")
    elif not explicit and _has_quantised(accel.pipeline.transformer):
        transformers = []
        accel.notes.append("the GGUF transformer is not compiled by default (its layers dequantise in Python "
                           "per matmul); pass --compile to try")
    elif not explicit and accel.fast_transformer is not None:
        transformers = transformers[:1]
        accel.notes.append("the go_fast fp8 transformer is not compiled by default: eager fp8 is slower than bf16 "
                           "on an H100 and compiling fp8 blocks was measured to take minutes; pass --compile to "
                           "compile it too")
    if accel.options.lora_rank and transformers and transformers[0] is accel.pipeline.transformer:
        # Before compiling: LoRAs are written into this slot, so none compiles the blocks again.
        from .lora_slot import LoraSlot

        try:
            slot = accel.lora_slot = LoraSlot.on(accel.pipeline.transformer, accel.options.lora_rank)
            accel.applied.append(f"LoRA slot: every linear layer at rank {slot.rank} ({_size(slot.nbytes())}), "
                                 "so LoRAs and their scales compile nothing")
        except Exception as exc:  # serve anyway: LoRAs then compile the blocks again, as without a slot
            log.exception("the LoRA slot could not be prepared")
            accel.notes.append(f"no LoRA slot ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                               "each new LoRA and scale compiles the blocks again")
    WATCH.install()
    blocks = 0
    for transformer in transformers:
        for name in BLOCK_LISTS:
            for block in getattr(transformer, name, []):
                block.compile(fullgraph=fullgraph, dynamic=None, backend=accel.options.compile_backend)
                blocks += 1
    if not blocks:
        return
    accel.compiled = True
    how = "--compile" if explicit else "default on a GPU"
    accel.applied.append(f"compile ({how}: {blocks} blocks, fullgraph={fullgraph}, cache {accel.options.cache_dir})")


def _has_fp8(transformer) -> bool:
    return any(_is_fp8(m.weight) for m in _block_linears(transformer))


def is_quantised(weight) -> bool:
    """fp8 (torchao), or a GGUF checkpoint's packed weight (diffusers' GGUFParameter)."""
    return _is_fp8(weight) or type(weight).__name__ == "GGUFParameter"


def _has_quantised(transformer) -> bool:
    return any(is_quantised(m.weight) for m in _block_linears(transformer))


def configure_compile_cache(cache_dir: Path | None) -> None:
    """Inductor's FX-graph cache and Triton's kernels in ``cache_dir``, kept across restarts. Both
    read their folder from the environment when they first compile, so it is set before."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if cache_dir is None:
        return
    cache_dir = Path(cache_dir)
    (cache_dir / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")


# -- helpers ---------------------------------------------------------------------------------------


def _transformers(accel: Accelerator):
    yield accel.pipeline.transformer
    if accel.fast_transformer is not None:
        yield accel.fast_transformer


def _device_index(device: str) -> int:
    import torch

    return int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()


def _empty_cuda_cache() -> None:
    import torch

    torch.cuda.empty_cache()


def _free_gpu_bytes(device: str) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(_device_index(device))
    return free


class CompileWatch:
    """What dynamo does after startup, for the whole process (its counters are the process's): graphs
    built after the warm-up (a recompile: seconds to a minute each on a GPU) and code it gave up
    compiling (the recompile limit reached, or a compile that failed under ``suppress_errors``),
    which then runs eager, slower, from then on. Each is said in the log in words, and counted in
    ``/health``'s speed (``recompiles_after_warmup``, ``eager_fallbacks``)."""

    GAVE_UP = ("torch._dynamo hit config.", "WON'T CONVERT")

    def __init__(self):
        self.graphs_at_warmup: int | None = None
        self.seen = 0
        self.recompiles = 0
        self.eager_fallbacks = 0
        self._handler = None

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def install(self) -> None:
        """Listen for dynamo giving up (once a process)."""
        if self._handler is not None:
            return
        watch = self

        class GaveUp(logging.Handler):
            def emit(self, record):
                message = record.getMessage()
                if message.startswith(watch.GAVE_UP):
                    watch.eager_fallbacks += 1
                    lines = [line.strip() for line in message.splitlines() if line.strip()]
                    # the recompile limit: which limit, the function, the last reason; a failed compile:
                    # the function and the exception
                    what = " ".join(lines[:3]) if message.startswith(watch.GAVE_UP[0]) else f"{lines[0]}: {lines[-1]}"
                    log.warning("compiled code runs eager from now on (slower): %s; TORCH_LOGS=recompiles tells why "
                                "(%d such fall-backs so far)", what[:400], watch.eager_fallbacks)

        self._handler = GaveUp(logging.WARNING)
        logging.getLogger("torch._dynamo.convert_frame").addHandler(self._handler)

    def arm(self) -> None:
        """The warm-up is over: every graph from now on is one a request paid for."""
        self.graphs_at_warmup = self.seen = self.graphs()

    def check(self) -> int:
        """New graphs since the last check, logged as recompiles when the warm-up is over."""
        now = self.graphs()
        new, self.seen = now - self.seen, now
        if new > 0 and self.graphs_at_warmup is not None:
            self.recompiles += new
            log.warning("the compiled blocks compiled again after the warm-up (%d new graphs, %d in all): each costs "
                        "seconds to a minute on a GPU; TORCH_LOGS=recompiles tells why", new, self.recompiles)
        return max(new, 0)

    def figures(self) -> dict:
        return {"recompiles_after_warmup": self.recompiles, "eager_fallbacks": self.eager_fallbacks}


WATCH = CompileWatch()


__all__ = ["AccelError", "AccelOptions", "Accelerator", "MEMORY_MODES", "MemoryMode", "WATCH", "apply",
           "configure_compile_cache", "is_quantised", "loads_in_host_memory", "quantise_blockwise"]
