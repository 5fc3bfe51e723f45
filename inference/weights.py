"""Resolve ``--weights`` to a loaded FluxFillPipeline.

Accepted, in the order they are tried:

1. ``tiny``: the built-in random demo model (:mod:`inference.tiny`), saved once in the diffusers
   layout and loaded through the same path as real weights.
2. A folder in the diffusers layout of ``black-forest-labs/FLUX.1-Fill-dev`` (``model_index.json``
   plus ``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
   ``tokenizer_2/``, ``scheduler/``).
3. A single transformer file (``flux1-fill-dev.safetensors`` in BFL's layout, bare or under
   ``model.diffusion_model.``; fp8; ComfyUI's scaled fp8; or a ``.gguf``: :mod:`inference.checkpoints`)
   plus ``components``: a folder of the diffusers layout that provides the text encoders, tokenizers,
   VAE and scheduler.
4. A Hugging Face repo id (``owner/name``), taken from the local cache first and downloaded only
   when the network is allowed (``HF_HUB_OFFLINE`` unset).
5. ``random-real``: FLUX.1 Fill [dev]'s architecture at full size with random weights, built in
   memory on the device (for benchmarks; :mod:`inference.random_real`).

bf16 straight onto the GPU on CUDA; float32 on CPU. Weights that are not FLUX.1 Fill (FLUX.1 [dev],
[schnell], Canny, Depth) are refused from their config or header, before anything is loaded. Every
model comes back frozen: ``eval()`` and ``requires_grad`` off on every parameter, so no forward pass
can build an autograd graph.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoints
from .errors import WeightsError
from .tiny import DEMO_NOTICE, ensure_tiny_weights

log = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL_COMPONENTS = ("safety_checker",)
SINGLE_FILE_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")
RANDOM_REAL = "random-real"  # the real architecture with random weights, for benchmarks (inference.random_real)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A loaded pipeline and what it is."""

    pipeline: object
    source: str  # what --weights said
    name: str  # a name for people: "FLUX.1 Fill [dev]" or "tiny demo model"
    demo: bool
    device: str
    dtype: str
    folder: Path | None = None
    safety_checker: object | None = None
    feature_extractor: object | None = None
    extras: dict = field(default_factory=dict)
    notice: str | None = None  # a demo model's sentence for people: what its outputs are


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_for(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir())


def check_diffusers_folder(folder: Path, components=REQUIRED_COMPONENTS) -> None:
    """Name everything missing from a diffusers-layout folder in one message."""
    missing = []
    if not (folder / "model_index.json").is_file():
        missing.append("model_index.json")
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
        elif name.startswith(("tokenizer", "scheduler")):
            if not any(sub.iterdir()):
                missing.append(f"{name}/ (empty)")
        elif not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        elif not _has_weights(sub):
            missing.append(f"{name}/*.safetensors")
    if missing:
        raise WeightsError(
            f"The weights folder {folder} is incomplete: missing {', '.join(missing)}. "
            "See weights.md for the layout."
        )
    check_weight_files(folder, [*components, *OPTIONAL_COMPONENTS])


def check_weight_files(folder: Path, components) -> None:
    """Every .safetensors file of the components whole, and every shard an index names present, read
    from the headers alone: a download cut short is named, file by file, before anything loads
    (safetensors itself would say only "incomplete metadata, file not fully covered")."""
    import json

    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(sub.glob("*.safetensors")):
            try:
                checkpoints.safetensors_header(path, complete=True, name=f"{name}/{path.name}")
            except ValueError as exc:
                raise WeightsError(f"The weights folder {folder} has a broken file: {exc} (see weights.md).") from None
        for index in sorted(sub.glob("*.safetensors.index.json")):
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise WeightsError(f"The weights folder {folder} has a broken file: {name}/{index.name} is not a "
                                   "readable shard index; download it again (see weights.md).") from None
            absent = [shard for shard in shards if not (sub / shard).is_file()]
            if absent:
                raise WeightsError(f"The weights folder {folder} is incomplete: {name}/{index.name} lists {absent[0]}"
                                   f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''}, which is missing; "
                                   "download it again (see weights.md).")


def resolve_repo_id(repo_id: str) -> Path:
    """A local snapshot of a Hugging Face repo: the cache first, a download only when allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise WeightsError("huggingface_hub is needed to resolve a repo id") from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise WeightsError(
            f"The weights {repo_id!r} are not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}). Download them first (see weights.md) or pass a folder."
        ) from None


def resolve_weights(weights: str | None, components: str | None = None) -> tuple[str, Path, bool]:
    """Return (kind, path, demo) for a --weights value; kind is 'diffusers' or 'single_file'."""
    if not weights or weights == "tiny":
        return "diffusers", ensure_tiny_weights(), True
    path = Path(weights).expanduser()
    if path.is_dir():
        check_diffusers_folder(path)
        return "diffusers", path, (path / "flux_fill_tiny.json").exists()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise WeightsError(f"The weights file {path} does not exist.")
        if not components:
            raise WeightsError(
                f"{path.name} holds only the transformer: also pass --components, a folder with the VAE, "
                "text encoders, tokenizers and scheduler (see weights.md)."
            )
        comp = Path(components).expanduser()
        if not comp.is_dir():
            raise WeightsError(f"The components folder {comp} does not exist.")
        check_diffusers_folder(comp, SINGLE_FILE_COMPONENTS)
        return "single_file", path, False
    if REPO_ID.match(weights) and not weights.startswith((".", "/", "~")):
        folder = resolve_repo_id(weights)
        check_diffusers_folder(folder)
        return "diffusers", folder, False
    raise WeightsError(f"The weights path {weights} does not exist (expected a folder, a .safetensors or .gguf file, a repo id or 'tiny').")


def load_model(weights: str | None = None, *, components: str | None = None, device: str | None = None,
               offload: bool = False) -> LoadedModel:
    """Load the pipeline named by ``weights`` onto ``device``; every failure is a WeightsError.

    ``offload``: keep the weights in host memory (in the GPU's dtype) for a CPU-offload memory mode,
    which then moves each model to ``device`` while it runs (inference.accel)."""
    import torch

    quiet_library_noise()
    from diffusers import FluxFillPipeline
    from safetensors import SafetensorError

    device = pick_device(device)
    dtype = _dtype_for(device)
    place = "cpu" if offload else device
    if weights == RANDOM_REAL:
        from .random_real import build_random_real_pipeline

        pipe = build_random_real_pipeline(place, dtype)
        return LoadedModel(pipeline=pipe, source=RANDOM_REAL, name="FLUX.1 Fill [dev] architecture, random weights",
                           demo=True, device=device, dtype=str(dtype).replace("torch.", ""),
                           notice="FLUX.1 Fill [dev]'s architecture with random weights, for benchmarks: the "
                                  "outputs are noise.")
    kind, path, demo = resolve_weights(weights, components)
    extras = {}
    try:
        if kind == "single_file":
            comp = Path(components).expanduser()
            info = checkpoints.inspect(path)
            checkpoints.require_fill(path, info.in_channels, _latent_channels(comp), info.guidance)
            config = checkpoints.transformer_config(info, comp)
            transformer = checkpoints.load_transformer(info, config, dtype).to(place)
            pipe = _from_pretrained(FluxFillPipeline, comp, dtype, place, transformer=transformer)
            folder = comp
            extras["checkpoint"] = info.describe()
        else:
            transformer_config = _read_config(path / "transformer" / "config.json")
            checkpoints.require_fill(path, transformer_config.get("in_channels"), _latent_channels(path),
                                     bool(transformer_config.get("guidance_embeds", True)))
            pipe = _from_pretrained(FluxFillPipeline, path, dtype, place)
            folder = path
    except WeightsError:
        raise
    except SafetensorError as exc:  # checked above, file by file; a file that changed since, or a case missed
        raise WeightsError(f"Could not load the weights from {path}: a .safetensors file is damaged or incomplete "
                           f"({exc}); download it again (see weights.md).".split("\n")[0]) from exc
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
        raise WeightsError(f"Could not load the weights from {path}: {exc}".split("\n")[0]) from exc
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise WeightsError(f"{path} did not give a FLUX Fill transformer")
    freeze(pipe)
    model = LoadedModel(
        pipeline=pipe,
        source=str(weights or "tiny"),
        name="tiny demo model (random weights)" if demo else "FLUX.1 Fill [dev]",
        demo=demo,
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        folder=folder,
        extras=extras,
        notice=DEMO_NOTICE if demo else None,
    )
    _load_safety_checker(model, folder, dtype, device)
    return model


def freeze(pipe) -> None:
    """Every model of the pipeline in eval mode with ``requires_grad`` off. Weights loaded with
    ``from_pretrained`` come trainable; a forward pass outside ``torch.inference_mode()`` would then keep
    its activations for a backward pass that never comes (gigabytes a prompt in T5-XXL)."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)


def _read_config(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable config ({type(exc).__name__}).") from None


def _latent_channels(folder: Path) -> int:
    return int(_read_config(folder / "vae" / "config.json").get("latent_channels", 16))


def quiet_library_noise() -> None:
    """Warnings the libraries print on import that say nothing about this server's work: diffusers
    on torchao's serialised tensors (never loaded here), a torch deprecation that torchao triggers,
    and, without a GPU, torchao's CUDA kernels that cannot load."""
    import torch

    for name in ("diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        logging.getLogger("torchao").setLevel(logging.ERROR)


def _from_pretrained(cls, folder: Path, dtype, device: str, **components):
    kwargs = dict(dtype=dtype, **components)
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        try:
            with torch.cuda.device(index):
                # Straight onto the GPU: no full copy of the weights in host memory first.
                return cls.from_pretrained(str(folder), device_map="cuda", **kwargs)
        except (ValueError, NotImplementedError, TypeError) as exc:
            log.warning("loading straight to %s failed (%s); loading on the CPU and moving", device, exc)
    pipe = cls.from_pretrained(str(folder), **kwargs)
    return pipe.to(device)


def _load_safety_checker(model: LoadedModel, folder: Path, dtype, device: str) -> None:
    """An optional Stable Diffusion-style safety checker in ``safety_checker/`` + ``feature_extractor/``."""
    sc = folder / "safety_checker"
    fe = folder / "feature_extractor"
    if not (sc.is_dir() and fe.is_dir()):
        return
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        model.safety_checker = StableDiffusionSafetyChecker.from_pretrained(str(sc), torch_dtype=dtype).to(device)
        model.safety_checker.eval().requires_grad_(False)
        model.feature_extractor = CLIPImageProcessor.from_pretrained(str(fe))
    except Exception as exc:
        raise WeightsError(f"The safety checker in {sc} could not be loaded: {exc}".split("\n")[0]) from exc

