"""Resolve, load, scale and cache FLUX.1 [dev] LoRAs on the Fill transformer.

``lora_weights`` may be:

- a name in the configured LoRA folder (``name`` or ``name.safetensors``), so offline servers need
  no downloads;
- a local ``.safetensors`` path (the CLI, or a server that allows paths);
- an ``https`` URL to a ``.safetensors`` file, downloaded once into the cache folder;
- a Hugging Face repo id (``owner/name``) already in the local Hugging Face cache.

The diffusers, Kohya and XLabs formats are read by diffusers' own converters. Text-encoder keys are
dropped: the hosted model applies only the transformer part to Fill.

Loaded adapters stay cached (least recently used first out). A prediction without a LoRA runs with
every adapter disabled, which computes exactly what the base model computes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraError
from .images import FetchPolicy, fetch_url
from .weights import REPO_ID

log = logging.getLogger(__name__)

FIELD = "lora_weights"
_NAME = re.compile(r"^[\w.-]+$")
_TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_", "lora_te1_", "lora_te2_")


@dataclass
class LoraSettings:
    folder: Path | None = None  # named LoRAs live here
    cache_dir: Path | None = None  # downloaded LoRAs are kept here
    allow_paths: bool = False  # local paths (the CLI allows them; the server only if configured)
    max_loaded: int = 4  # adapters kept on the model at once
    fetch_policy: FetchPolicy = FetchPolicy(max_bytes=2 * 1024**3, timeout_s=300)


def _bad(description: str) -> LoraError:
    return LoraError.one(FIELD, "lora", description)


def resolve(value: str, settings: LoraSettings) -> Path:
    """The local .safetensors file behind a lora_weights value."""
    value = value.strip()
    if value.startswith("https://") or value.startswith("http://"):
        if not value.startswith("https://"):
            raise _bad("lora_weights URLs must use https")
        return _download(value, settings)
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


def _download(url: str, settings: LoraSettings) -> Path:
    if settings.cache_dir is None:
        raise _bad("this server does not download LoRAs (no cache folder configured)")
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    target = settings.cache_dir / f"{key}.safetensors"
    if target.is_file():
        return target
    data = fetch_url(url, FIELD, settings.fetch_policy)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


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


def read_state_dict(path: Path) -> dict:
    """The LoRA's tensors, text-encoder keys dropped."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception:
        raise _bad(f"{path.name} is not a readable .safetensors file") from None
    kept = {k: v for k, v in state.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)}
    if not kept:
        raise _bad(f"{path.name} holds no transformer weights")
    return kept


class LoraManager:
    """Keeps LoRA adapters loaded on one pipeline and activates one per prediction."""

    def __init__(self, pipeline, settings: LoraSettings):
        self.pipeline = pipeline
        self.settings = settings
        self.loaded: OrderedDict[str, str] = OrderedDict()  # file key -> adapter name
        self.lock = threading.Lock()

    def _key(self, path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"

    def activate(self, lora_weights: str | None, scale: float) -> str | None:
        """Enable the LoRA at ``scale`` (or none), loading it if needed; returns the adapter name."""
        with self.lock:
            if not lora_weights:
                if self.loaded:
                    self.pipeline.disable_lora()
                return None
            path = resolve(lora_weights, self.settings)
            key = self._key(path)
            name = self.loaded.get(key)
            if name is None:
                name = self._load(path, key)
            else:
                self.loaded.move_to_end(key)
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name], adapter_weights=[float(scale)])
            return name

    def _load(self, path: Path, key: str) -> str:
        while len(self.loaded) >= self.settings.max_loaded:
            _, old = self.loaded.popitem(last=False)
            self.pipeline.delete_adapters([old])
        name = "lora_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        state = read_state_dict(path)
        try:
            self.pipeline.load_lora_weights(state, adapter_name=name)
        except Exception as exc:
            log.exception("could not load LoRA %s", path)
            try:
                self.pipeline.delete_adapters([name])
            except Exception:
                pass
            raise _bad(f"{path.name} is not a FLUX.1 LoRA this server can apply ({type(exc).__name__})") from None
        self.loaded[key] = name
        log.info("loaded LoRA %s as %s", path.name, name)
        return name
