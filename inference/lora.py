"""Resolve, read, apply and cache FLUX.1 [dev] LoRAs on the Fill transformer, one prediction at a time.

``lora_weights`` may be:

- a name in the configured LoRA folder (``name`` or ``name.safetensors``), so offline servers need
  no downloads;
- a local ``.safetensors`` path (the CLI, or a server that allows paths);
- an ``https`` URL to a ``.safetensors`` file, downloaded once into the cache folder, which keeps
  at most ``cache_bytes`` (the least recently used files go first; a file that turns out not to be
  a LoRA this server can read is deleted at once);
- a Hugging Face repo id (``owner/name``) already in the local Hugging Face cache.

**Formats.** A file is read exactly as ``FluxFillPipeline.load_lora_weights`` reads it: diffusers'
own reader recognises the format (diffusers/peft, Kohya, ComfyUI, XLabs, BFL Control), converts the
names and takes the alpha, from ``.alpha`` keys or from the file's ``lora_adapter_metadata`` (what
diffusers' training scripts write). One format it does not recognise is read too: BFL module names
with peft's ``lora_A``/``lora_B`` (``double_blocks.0.img_attn.qkv.lora_A.weight``, bare or under
``diffusion_model.``), which is the ComfyUI layout with other suffixes; it is renamed to that layout
and read by the same reader. Text-encoder parts are dropped: the hosted model applies only the
transformer part to Fill. ComfyUI's whole differences (``.diff``, ``.diff_b``), which diffusers
drops, are kept and applied as ComfyUI applies them (:mod:`inference.lora_diffs`). A file that no
reader recognises, that was made for a model of another size (named with its width when diffusers'
converter fails on it), or that is cut short, fails its prediction with one sentence naming the file
and the reason; nothing is loaded.

**A LoRA never outlives its prediction.** Adapters are peft layers beside the base weights; with
every adapter disabled the transformer computes exactly what the base computes. Some LoRAs also
carry tensors that diffusers writes straight into the transformer (the ``norm_q``/``norm_k``
weights of BFL's Canny and Depth LoRAs): those are kept with the adapter and written in for the
prediction that asks for the LoRA only; the base values go back when it ends or fails. A LoRA that
would widen a layer of the transformer (diffusers replaces the layer) is refused: Fill's
``x_embedder`` takes 384 channels, more than any FLUX.1 LoRA's, so only a LoRA for another model
could ask for it. A load that fails part way leaves no adapter, no cache entry and the base values.

**Compiled blocks.** When the transformer's blocks are compiled, a LoRA is not an adapter of its own
but is written into the one adapter the transformer was compiled with, so no LoRA compiles anything
(:mod:`inference.lora_slot`); the rest (resolving, reading, norms, differences, the cache) is the same.

Loaded adapters stay cached (least recently used first out, ``max_loaded`` at most).

Its length: every LoRA format people use (diffusers, kohya, ComfyUI, BFL's, norms and differences)
is resolved, read and undone here, so a format is added in one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from . import lora_diffs
from .accel import is_quantised
from .errors import LoraError
from .images import FetchPolicy, fetch_url
from .lora_slot import LoraSlot, SlotLora
from .weights import REPO_ID

log = logging.getLogger(__name__)

FIELD = "lora_weights"
_NAME = re.compile(r"^[\w.-]+$")
# What diffusers' converters name the parts of a FLUX.1 LoRA.
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# The tensors diffusers loads straight into the transformer (FluxLoraLoaderMixin's supported norm keys).
DIRECT_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# BFL's module names with peft's lora_A/lora_B suffixes, bare or under diffusion_model.
_BFL_LORA_KEY = re.compile(
    r"^(?:diffusion_model\.)?(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)"
    r"\..*\.(?:lora_A|lora_B)\.weight$"
)
# Layers whose input a FLUX.1 [dev] LoRA may cover only in part: Fill's x_embedder reads the noisy
# latents (the 64 channels FLUX.1 [dev] has) followed by the conditioning; diffusers zero-pads the rest.
PADDED_INPUTS = ("x_embedder",)


@dataclass
class LoraSettings:
    folder: Path | None = None  # named LoRAs live here
    cache_dir: Path | None = None  # downloaded LoRAs are kept here
    allow_paths: bool = False  # local paths (the CLI allows them; the server only if configured)
    max_loaded: int = 4  # adapters kept on the model at once
    fetch_policy: FetchPolicy = FetchPolicy(max_bytes=2 * 1024**3, timeout_s=300)
    cache_bytes: int = 20 * 1024**3  # downloaded LoRAs kept on disk, least recently used out first


def _bad(description: str) -> LoraError:
    return LoraError.one(FIELD, "lora", description)


# -- finding the file ------------------------------------------------------------------------------


def resolve(value: str, settings: LoraSettings, cancelled=None) -> Path:
    """The local .safetensors file behind a lora_weights value; ``cancelled`` stops a download."""
    value = value.strip()
    if value.startswith("https://") or value.startswith("http://"):
        if not value.startswith("https://"):
            raise _bad("lora_weights URLs must use https")
        return _download(value, settings, cancelled)
    if settings.folder is not None and _NAME.match(value):
        for candidate in (settings.folder / value, settings.folder / f"{value}.safetensors"):
            if candidate.is_file() and candidate.resolve().parent == settings.folder.resolve():
                return candidate
    path = Path(value).expanduser()
    if settings.allow_paths and path.suffix == ".safetensors":
        if not path.is_file():
            raise _bad(f"no LoRA file at {value}")
        return path
    if REPO_ID.match(value):
        return _from_hf_cache(value)
    if settings.folder is not None:
        raise _bad(f"no LoRA named {value!r} in the server's LoRA folder")
    raise _bad(f"{value!r} is not a LoRA this server can find: give a LoRA name, an https URL or a repo id")


def _download(url: str, settings: LoraSettings, cancelled=None) -> Path:
    if settings.cache_dir is None:
        raise _bad("this server does not download LoRAs (no cache folder configured)")
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    target = settings.cache_dir / f"{key}.safetensors"
    if target.is_file():
        _used(target)
        return target
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.part")
    try:
        with open(tmp, "wb") as fh:  # straight to disk: a LoRA of gigabytes is never in memory whole
            fetch_url(url, FIELD, settings.fetch_policy, cancelled, into=fh)
        trim_cache(settings.cache_dir, settings.cache_bytes - tmp.stat().st_size)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    _used(target)
    return target


def _used(path: Path) -> None:
    """Mark a cached file as just used: its access time, set explicitly (mounts may not keep atime),
    orders the cache; the modification time, which names the loaded adapter, is left alone."""
    try:
        os.utime(path, (time.time(), path.stat().st_mtime))
    except OSError:
        pass


def trim_cache(folder: Path, budget: int) -> None:
    """Delete the least recently used downloads until the folder holds at most ``budget`` bytes;
    unfinished downloads (``.part``) older than an hour go first."""
    try:
        entries = [(p, p.stat()) for p in folder.iterdir() if p.is_file()]
    except OSError:
        return
    now = time.time()
    for path, stat in entries:
        if path.suffix == ".part" and now - stat.st_mtime > 3600:
            path.unlink(missing_ok=True)
    cached = sorted(((p, s) for p, s in entries if p.suffix == ".safetensors" and p.exists()), key=lambda e: e[1].st_atime)
    total = sum(s.st_size for _, s in cached)
    for path, stat in cached:
        if total <= max(budget, 0):
            break
        path.unlink(missing_ok=True)
        total -= stat.st_size
        log.info("LoRA cache: removed %s (%d MB) to stay within its size", path.name, stat.st_size // 2**20)


def _from_hf_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.safetensors"]))
    except Exception:
        raise _bad(f"the LoRA repo {repo_id} is not in the local Hugging Face cache") from None
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise _bad(f"the LoRA repo {repo_id} has no .safetensors file")
    return files[0]


# -- reading it ------------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A LoRA as diffusers reads it: transformer keys in diffusers' names, the alphas and the metadata;
    and the whole-tensor differences (ComfyUI's ``.diff``/``.diff_b``) diffusers drops, as the file has them."""

    path: Path
    state: dict  # "transformer.<module>.lora_A.weight" ... and any direct tensors ("...norm_q.weight")
    alphas: dict | None
    metadata: dict | None
    diffs: dict = field(default_factory=dict)  # the file's own keys (inference.lora_diffs)

    @property
    def direct_keys(self) -> list[str]:
        """Transformer tensors the file sets directly, without the ``transformer.`` prefix."""
        return sorted(k[len(TRANSFORMER_PREFIX):] for k in self.state
                      if "lora" not in k and any(part in k for part in DIRECT_KEYS))

    @property
    def has_layers(self) -> bool:
        return any(".lora_" in k for k in self.state)


def file_header(path: Path) -> dict:
    """A .safetensors file's header (tensor name -> dtype, shape, offsets), the file checked whole: a
    LoRA cut short or damaged is named with the fix."""
    from .checkpoints import safetensors_header

    try:
        return safetensors_header(path, complete=True)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def file_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file, read from its header alone."""
    return list(file_header(path))


def is_bfl_lora_a_b(keys) -> bool:
    """BFL module names with lora_A/lora_B suffixes, a layout diffusers does not recognise by itself."""
    lora_keys = [k for k in keys if ".lora_" in k]
    return bool(lora_keys) and all(_BFL_LORA_KEY.match(k) for k in lora_keys)


def bfl_a_b_to_comfyui(state: dict) -> dict:
    """Rename BFL lora_A/lora_B keys to the ComfyUI layout (diffusion_model.<name>.lora_down/lora_up),
    which diffusers' reader converts, alphas included."""
    renamed = {}
    for key, value in state.items():
        key = key if key.startswith("diffusion_model.") else f"diffusion_model.{key}"
        key = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        renamed[key] = value
    return renamed


def read_lora(path: Path, width: int | None = None) -> LoraFile:
    """Read ``path`` as ``FluxFillPipeline.load_lora_weights`` would, text-encoder parts dropped and
    ``.diff``/``.diff_b`` tensors kept apart. ``width``: the transformer's, to name a LoRA made for
    a model of another width when diffusers' reader cannot convert it."""
    from diffusers import FluxFillPipeline

    header = file_header(path)
    keys = list(header)
    diff_keys = [k for k in keys if lora_diffs.is_diff(k)]
    lora_keys = [k for k in keys if k not in diff_keys]
    diffs: dict = {}
    try:
        if diff_keys or is_bfl_lora_a_b(lora_keys):
            from safetensors.torch import load_file

            source = load_file(str(path))
            diffs = {k: source.pop(k) for k in diff_keys}
            source = bfl_a_b_to_comfyui(source) if is_bfl_lora_a_b(lora_keys) else source
            metadata = _adapter_metadata(path)  # diffusers reads none from a dict
        else:
            source, metadata = str(path), None
        if isinstance(source, dict) and not any("lora" in k or "alpha" in k for k in source):
            state, alphas = {}, None  # differences alone
        else:
            state, alphas, read_metadata = FluxFillPipeline.lora_state_dict(
                source, return_alphas=True, return_lora_metadata=True, use_safetensors=True)
            metadata = read_metadata if metadata is None else metadata
    except LoraError:
        raise
    except Exception as exc:
        log.info("diffusers could not read the LoRA %s: %s", path, exc)
        if width is not None:
            _refuse_other_width(path.name, header, width)
        example = next((k for k in keys if "lora" in k), keys[0] if keys else "none")
        raise _bad(f"{path.name} is not a FLUX.1 LoRA this server can read: its keys (e.g. {example}) "
                   "are in no format diffusers recognises") from None
    state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    if alphas is not None:
        alphas = {k: v for k, v in alphas.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    if not any(k.startswith(TRANSFORMER_PREFIX) for k in state) and not diffs:
        example = next(iter(keys), "none")
        raise _bad(f"{path.name} holds no FLUX.1 transformer LoRA this server can read (keys like {example})")
    return LoraFile(path=path, state=state, alphas=alphas, metadata=metadata, diffs=diffs)


def _adapter_metadata(path: Path) -> dict | None:
    """The file's ``lora_adapter_metadata`` (its LoRA config, alpha included), as diffusers reads it."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else None


# BFL layers whose input is the model's width, as LoRA formats name them (dots or Kohya's underscores).
_WIDE_INPUT = re.compile(
    r"(?:double_blocks[._]\d+[._](?:img|txt)_(?:attn[._](?:qkv|proj)|mlp[._]0|mod[._]lin)"
    r"|single_blocks[._]\d+[._](?:linear1|modulation[._]lin)"
    r"|double_blocks[._]\d+[._]processor[._](?:qkv|proj)_lora\d)"
    r"(?=\.(?:lora_down|lora_A|down)\.weight$)")


def _refuse_other_width(name: str, header: dict, width: int) -> None:
    """A LoRA in BFL's names whose layers take another width than this model's (FLUX.1's converters
    fail on it without saying so): refused naming the width."""
    for key in sorted(header):
        found = _WIDE_INPUT.search(key)
        shape = header[key].get("shape", [])
        if found and len(shape) == 2 and shape[1] != width:
            layer = re.sub(r"^(double|single)_blocks_(\d+)_", r"\1_blocks.\2.", found.group(0))
            layer = re.sub(r"(attn|mlp|mod|modulation)_(qkv|proj|0|lin)$", r"\1.\2", layer)
            raise _bad(f"{name} was made for a model of another size: its {layer} takes {shape[1]} input "
                       f"features where this model's takes {width}")


def check_fits(lora: LoraFile, transformer) -> None:
    """Refuse a LoRA made for another model before anything is loaded: every layer it names must be
    the transformer's, with the same number of features (Fill's x_embedder may be covered in part)."""
    modules = dict(transformer.named_modules())
    tensors = {name.replace(".base_layer", ""): t for name, t in transformer.state_dict(keep_vars=True).items()
               if "lora_" not in name}
    unknown, mismatched = [], []
    for key, value in lora.state.items():
        if not key.startswith(TRANSFORMER_PREFIX):
            continue
        name = key[len(TRANSFORMER_PREFIX):]
        if ".lora_A." in name or ".lora_B." in name:
            module_name = name.split(".lora_")[0]
            module = modules.get(module_name)
            module = getattr(module, "base_layer", module)  # a layer that already has adapters
            if module is None or not hasattr(module, "in_features"):
                unknown.append(module_name)
                continue
            if ".lora_A." in name and value.ndim == 2:
                padded = module_name in PADDED_INPUTS and value.shape[1] < module.in_features
                if padded and type(module.weight).__name__ == "GGUFParameter":
                    raise _bad(f"{lora.path.name} covers part of {module_name}'s input, which diffusers cannot "
                               "pad on a GGUF checkpoint's quantised layer; use bf16 or fp8 weights with it")
                if not (value.shape[1] == module.in_features or padded):
                    mismatched.append((module_name, "input", value.shape[1], module.in_features))
            if ".lora_B." in name and value.ndim == 2 and value.shape[0] != module.out_features:
                mismatched.append((module_name, "output", value.shape[0], module.out_features))
        else:
            target = tensors.get(name)
            if target is None:
                unknown.append(name)
            elif tuple(target.shape) != tuple(value.shape):
                mismatched.append((name, "", tuple(value.shape), tuple(target.shape)))
    where = lora.path.name
    if unknown:
        raise _bad(f"{where} was made for another model: its layer {sorted(unknown)[0]} is not in FLUX.1 Fill "
                   f"[dev]'s transformer ({len(set(unknown))} such layers)")
    if mismatched:
        module, kind, theirs, ours = mismatched[0]
        if kind:
            raise _bad(f"{where} was made for a model of another size: its {module} has {theirs} {kind} "
                       f"features where this model's has {ours}")
        raise _bad(f"{where} was made for a model of another size: its {module} is {theirs} where this "
                   f"model's is {ours}")


# -- applying it -----------------------------------------------------------------------------------


@dataclass
class Adapter:
    name: str
    path: Path
    direct: dict = field(default_factory=dict)  # transformer key -> the LoRA's value, set per prediction
    deltas: dict = field(default_factory=dict)  # transformer key -> a difference, added times the scale
    peft: bool = True  # loaded as a peft adapter of its own (nothing compiled); False: differences alone
    slot: SlotLora | None = None  # its layers as the compiled transformer's slot takes them


class LoraManager:
    """Keeps LoRA adapters loaded on one pipeline and applies one for the length of a prediction.

    Two ways, by whether the transformer's blocks are compiled (:mod:`inference.accel`):

    - nothing compiled: each LoRA is its own peft adapter, loaded by ``load_lora_weights`` itself
      and switched on with ``set_adapters``: diffusers' own result, bit for bit;
    - compiled: the transformer has one prepared adapter, the slot (:mod:`inference.lora_slot`),
      and a LoRA is written into it, so that no LoRA, scale or switch compiles the blocks again.

    Either way, what a LoRA sets directly (norms, ComfyUI's differences) is written for its
    prediction and the base values put back after it."""

    def __init__(self, pipeline, settings: LoraSettings):
        self.pipeline = pipeline
        self.settings = settings
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()  # file key -> adapter
        self.base: dict = {}  # transformer key -> the base value, for every key an adapter sets directly
        self.lock = threading.RLock()
        self.slot: LoraSlot | None = None
        self._adapters_on = False
        self._warming = False

    @property
    def transformer(self):
        return self.pipeline.transformer

    def use_slot(self, slot: LoraSlot) -> None:
        """From now on LoRAs go into ``slot`` (the transformer was prepared for it and compiled)."""
        with self.lock:
            self.clear()
            self.slot = slot

    def _key(self, path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"

    @contextlib.contextmanager
    def applied(self, lora_weights: str | None, scale: float, cancelled=None, log_line=None):
        """The LoRA at ``scale`` (or none) for the length of the block; the base model after it.
        ``cancelled`` stops a download of the LoRA between two reads; ``log_line`` gets what the
        prediction's logs should say."""
        with self.lock:
            try:
                if lora_weights:
                    yield self._activate(lora_weights, scale, cancelled, log_line)
                else:
                    self._restore()
                    if self._warming and self.slot is not None:
                        self._adapters_on = True
                        self.slot.put(SlotLora(), 1.0)
                    yield None
            finally:
                self._restore()

    @contextlib.contextmanager
    def warming(self):
        """Predictions without a LoRA run with the slot switched on (and empty): the warm-up builds the
        compiled blocks' LoRA graphs at startup, not on the first request with a LoRA."""
        with self.lock:
            self._warming = True
            try:
                yield
            finally:
                self._warming = False

    def clear(self) -> None:
        """Remove every cached adapter; the base model stays."""
        with self.lock:
            self._restore()
            names = [adapter.name for adapter in self.loaded.values() if adapter.peft and self.slot is None]
            self.loaded.clear()
            self.base.clear()
            if self.slot is not None:
                self.slot.clear()
            if names:
                self.pipeline.delete_adapters(names)

    def _activate(self, lora_weights: str, scale: float, cancelled=None, log_line=None) -> str:
        path = resolve(lora_weights, self.settings, cancelled)
        key = self._key(path)
        self._restore()  # loading and activating start from the base model
        adapter = self.loaded.get(key)
        if adapter is None:
            adapter = self._load(path, key)
        else:
            self.loaded.move_to_end(key)
        self._adapters_on = True  # from here on, a failure still leaves _restore something to undo
        if self.slot is not None:
            self.slot.put(adapter.slot, float(scale), log_line)
        elif adapter.peft:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([adapter.name], adapter_weights=[float(scale)])
        values = dict(adapter.direct)
        for name, delta in adapter.deltas.items():
            values[name] = values.get(name, self.base[name]) + float(scale) * delta
        self._write(values)
        return adapter.name

    def _restore(self) -> None:
        """Every adapter off and every directly set tensor back to its base value."""
        if self._adapters_on:
            if self.slot is not None:
                self.slot.disable()
            elif getattr(self.transformer, "peft_config", None):
                self.pipeline.disable_lora()
            self._adapters_on = False
        self._write(self.base)

    def _write(self, values: dict) -> None:
        """Copy ``values`` (transformer key -> tensor) into the transformer's own tensors."""
        import torch

        if not values:
            return
        tensors = self._tensors()
        with torch.no_grad():
            for name, value in values.items():
                tensors[name].copy_(value)

    def _tensors(self) -> dict:
        """The transformer's parameters and buffers by their base names (peft's ``.base_layer`` removed)."""
        out = {}
        for name, tensor in list(self.transformer.named_parameters()) + list(self.transformer.named_buffers()):
            if "lora_" not in name:
                out[name.replace(".base_layer", "")] = tensor
        return out

    def _load(self, path: Path, key: str) -> Adapter:
        import torch

        transformer = self.transformer
        try:
            lora = read_lora(path, width=transformer.config.num_attention_heads * transformer.config.attention_head_dim)
            check_fits(lora, transformer)
            tensors = self._tensors()
            deltas = lora_diffs.split(lora.diffs, transformer, tensors, path.name, _bad) if lora.diffs else {}
        except LoraError:
            self._forget_download(path)
            raise
        direct = lora.direct_keys
        touched = [*direct, *deltas]
        if any(tensors[k].is_meta for k in touched):
            # Sequential offload keeps the weights in its hooks, out of reach of a restore.
            raise _bad(f"{path.name} sets tensors of the transformer directly (norms, as BFL's Canny and Depth LoRAs "
                       "do, or ComfyUI's .diff differences), which this server cannot undo after the prediction "
                       "with --memory-mode sequential-offload")
        packed = next((k for k in deltas if is_quantised(tensors[k])), None)
        if packed is not None:
            raise _bad(f"{path.name} changes {packed} by a whole difference (a .diff key, as ComfyUI applies them), which "
                       "cannot be added to the quantised weights of an fp8 or GGUF checkpoint; use bf16 weights with it")
        name = "lora_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        snapshot = {k: tensors[k].detach().clone() for k in touched if k not in self.base}
        offload = _offload_kind(self.pipeline)
        adapter = Adapter(name=name, path=path, peft=lora.has_layers and self.slot is None,
                          deltas={k: d.to(device=tensors[k].device, dtype=tensors[k].dtype) for k, d in deltas.items()})
        try:
            if self.slot is not None:
                adapter.slot = self.slot.read(lora.state, lora.alphas, lora.metadata, path.name)
                adapter.direct = {k: lora.state[TRANSFORMER_PREFIX + k].to(device=tensors[k].device,
                                                                          dtype=tensors[k].dtype) for k in direct}
            elif adapter.peft:
                with torch.no_grad(), _reading_as(self.pipeline, lora):
                    self.pipeline.load_lora_weights(str(path), adapter_name=name)
                if name not in (getattr(transformer, "peft_config", None) or {}):
                    raise _bad(f"{path.name} holds no LoRA layer this server can apply to FLUX.1 Fill [dev]")
                after = self._tensors()
                adapter.direct = {k: after[k].detach().clone() for k in direct}
        except Exception as exc:
            self._undo_load(name, snapshot, offload)
            if isinstance(exc, LoraError):
                raise
            log.exception("could not load LoRA %s", path)
            raise _bad(f"{path.name} is not a FLUX.1 LoRA this server can apply ({type(exc).__name__})") from None
        self.base.update(snapshot)
        self._write(snapshot)  # the base values back until a prediction asks for this LoRA
        # diffusers keeps its own copy of the overwritten norms for unload_lora_weights; here the base
        # values are put back after every prediction instead.
        transformer._transformer_norm_layers = None
        transformer.requires_grad_(False)  # peft makes adapter weights trainable
        self.loaded[key] = adapter
        while len(self.loaded) > self.settings.max_loaded:  # the least recently used go, after a good load
            _, old = self.loaded.popitem(last=False)
            if old.peft:
                self.pipeline.delete_adapters([old.name])
            self._forget_direct(old)
        what = [f"{len(direct)} tensors set directly"] if direct else []
        what += [f"{len(deltas)} differences added"] if deltas else []
        log.info("loaded LoRA %s as %s%s%s", path.name, name, " into the compiled blocks' slot" if self.slot else "",
                 f" ({', '.join(what)} per prediction)" if what else "")
        return adapter

    def _undo_load(self, name: str, snapshot: dict, offload: str | None) -> None:
        """A failed load: no adapter left, every tensor it may have written back to its base value,
        and the CPU offload diffusers took off for loading put back on."""
        try:
            if name in (getattr(self.transformer, "peft_config", None) or {}):
                self.pipeline.delete_adapters([name])
        except Exception:
            log.exception("could not remove the partly loaded adapter %s", name)
        self._adapters_on = True  # disable whatever peft left enabled
        self._restore()
        self._write(snapshot)
        if offload is not None and _offload_kind(self.pipeline) is None:
            getattr(self.pipeline, f"enable_{offload}_cpu_offload")()

    def _forget_download(self, path: Path) -> None:
        """A downloaded file that is no LoRA this server can use is not kept in the cache."""
        cache = self.settings.cache_dir
        if cache is not None and path.parent.resolve() == cache.resolve():
            path.unlink(missing_ok=True)

    def _forget_direct(self, old: Adapter) -> None:
        """Base values no cached adapter sets any more are not kept."""
        still = {k for a in self.loaded.values() for k in (*a.direct, *a.deltas)}
        for name in (*old.direct, *old.deltas):
            if name not in still:
                self.base.pop(name, None)


def _offload_kind(pipeline) -> str | None:
    """"model" or "sequential" when accelerate's CPU offload hooks are on the pipeline (diffusers takes
    them off to load a LoRA and puts them back only when the load succeeds)."""
    for component in pipeline.components.values():
        hook = getattr(component, "_hf_hook", None)
        if hook is None:
            continue
        kinds = [type(h).__name__ for h in getattr(hook, "hooks", [hook])]
        if "CpuOffload" in kinds:
            return "model"
        if "AlignDevicesHook" in kinds:
            return "sequential"
    return None


@contextlib.contextmanager
def _reading_as(pipeline, lora: LoraFile):
    """``load_lora_weights`` reads its file through ``lora_state_dict``; give it what ``read_lora``
    read (text-encoder parts dropped, alphas and metadata kept) so everything else it does, from
    naming the adapter's layers to the alphas' scaling, is diffusers' own."""
    alphas = dict(lora.alphas) if lora.alphas is not None else None
    pipeline.lora_state_dict = lambda *_args, **_kwargs: (dict(lora.state), alphas, lora.metadata)
    try:
        yield
    finally:
        del pipeline.lora_state_dict


# peft warns on every adapter after the first; keeping several is what the cache is for.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
