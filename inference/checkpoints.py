"""Single-file transformer checkpoints, in the layouts users have them.

- **BFL's layout** (``flux1-fill-dev.safetensors``: ``double_blocks.0.img_attn.qkv.weight`` ...), bare
  or under ``model.diffusion_model.``, and a transformer saved in diffusers' names
  (``transformer_blocks.0.attn.to_q.weight`` ...). BFL names are converted by diffusers' own
  converter.
- **fp8** (``float8_e4m3fn`` / ``float8_e5m2`` weights): the linear layers keep their fp8 weights,
  held as torchao ``Float8Tensor`` s (a byte an element, dequantised per matmul), so an fp8 file takes
  half the memory of bf16 on the GPU and never becomes a bf16 copy. The fp8 memory modes find the
  transformer already in fp8 and quantise only T5.
- **ComfyUI's scaled fp8** (a ``<layer>.scale_weight`` beside each fp8 weight, and a ``scaled_fp8``
  marker): each weight is its fp8 values times its scale; the scale is kept with the fp8 values, so
  the layer computes exactly what the file means. (Ignoring the scales gives NaN.) ``scale_input``
  keys serve fp8 matmuls of the activations, which a weight-only layer does not do; they are not used.
- **GGUF** (``*.gguf``, the quantised Fill checkpoints: Q8_0, Q5_K, Q4_K ...): loaded by diffusers
  with ``GGUFQuantizationConfig``, each layer dequantised per matmul. Needs the ``gguf`` package
  (``pip install 'flux-fill-server[gguf]'``).

The transformer's config comes from ``components/transformer/config.json`` when the components folder
has one; otherwise it is read off the checkpoint's own shapes (blocks, widths, channels), so a single
file loads offline with no config from the Hugging Face Hub. Before any tensor is read, the header
says what model the file is: FLUX.1 [dev], [schnell], Canny or Depth files are refused in words.

Its length: every checkpoint layout (BFL's single file, ComfyUI's, fp8 with scales, GGUF) is
recognised from its header and converted here, so a layout is added in one file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError

log = logging.getLogger(__name__)

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's; compressed-tensors' and ModelOpt's
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")  # for fp8 activations: not used by weight-only layers
BLOCK_SCALE_SUFFIXES = (".weight_scale_inv",)  # DeepSeek's 128x128 blocks: refused
COMFY_MARKERS = ("scaled_fp8",)
HEAD_DIM_ROPE = {128: (16, 56, 56)}  # FLUX.1's RoPE axes for its head size
FILL_MASK_CHANNELS = 256  # the packed mask Fill reads beside the packed latents and conditioning


@dataclass
class CheckpointInfo:
    """What a checkpoint's header says, read without loading a tensor."""

    path: Path
    format: str  # "safetensors" or "gguf"
    shapes: dict  # name (prefix removed) -> shape, in torch's order
    dtypes: dict  # name -> dtype name as the file gives it
    prefix: str  # the prefix every key had ("" when none)

    @property
    def layout(self) -> str:
        if any(k.startswith("double_blocks.") for k in self.shapes):
            return "bfl"
        if any(k.startswith("transformer_blocks.") for k in self.shapes):
            return "diffusers"
        return "unknown"

    @property
    def fp8(self) -> bool:
        return any(str(d) in FP8_DTYPES for d in self.dtypes.values())

    @property
    def scaled_fp8(self) -> bool:
        return any(k.endswith(SCALE_SUFFIXES) for k in self.shapes)

    def shape(self, bfl: str, diffusers: str) -> tuple | None:
        return self.shapes.get(bfl if self.layout == "bfl" else diffusers)

    @property
    def in_channels(self) -> int | None:
        shape = self.shape("img_in.weight", "x_embedder.weight")
        return int(shape[1]) if shape else None

    @property
    def guidance(self) -> bool:
        return any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in self.shapes)

    def describe(self) -> str:
        comfy = any(k.endswith(SCALE_SUFFIXES[0]) for k in self.shapes)
        kind = "GGUF" if self.format == "gguf" else (("ComfyUI scaled fp8" if comfy else "scaled fp8") if self.scaled_fp8
                                                     else "fp8" if self.fp8 else "safetensors")
        return f"{kind}, {'BFL' if self.layout == 'bfl' else self.layout} layout"


def inspect(path: Path) -> CheckpointInfo:
    """Read a checkpoint's header: names, shapes and dtypes, no tensor data."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        shapes, dtypes = _gguf_header(path)
        fmt = "gguf"
    else:
        shapes, dtypes = _safetensors_header(path)
        fmt = "safetensors"
    prefix = next((p for p in BFL_PREFIXES if any(k.startswith(p) for k in shapes)), "")
    if prefix:
        shapes, dtypes = _unprefixed(shapes, prefix), _unprefixed(dtypes, prefix)
    return CheckpointInfo(path=path, format=fmt, shapes=shapes, dtypes=dtypes, prefix=prefix)


def _unprefixed(values: dict, prefix: str) -> dict:
    """Keys without ``prefix`` where they have it (ComfyUI's markers, such as ``scaled_fp8``, have none)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in values.items()}


def safetensors_header(path: Path, *, complete: bool = False, name: str | None = None) -> dict:
    """A .safetensors file's header (name -> dtype, shape, offsets), its ``__metadata__`` left out.

    ValueError, in one sentence that names the file and says what to do, when the file is not one;
    with ``complete``, also when its tensors do not fill it exactly: a download cut short leaves
    the header whole and the data short, which safetensors reports only as "incomplete metadata,
    file not fully covered", naming no file. ``name``: the file as the message calls it (its name)."""
    import struct

    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
        if size == 0:
            raise _Short(8)
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            if 8 + length > size:  # cut short within the header itself
                raise _Short(8 + length)
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("not a dict")
        header.pop("__metadata__", None)
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    except OSError as exc:
        raise ValueError(f"{name} could not be read: {exc.strerror or exc}") from None
    except _Short as short:
        held = "nothing" if size == 0 else f"{_amount(size)}, less than its header alone ({_amount(short.args[0])})"
        raise ValueError(f"{name} is incomplete: it holds {held}, as a download cut short leaves a file; "
                         "download it again") from None
    except (ValueError, struct.error, KeyError, TypeError):
        raise ValueError(f"{name} is not a readable .safetensors file (its header cannot be read): it is "
                         "damaged or not a .safetensors file at all (an error page saved under that name?); "
                         "download it again") from None
    if complete:
        end = spans[-1][1] if spans else 0
        expected = 8 + length + end
        if size < expected:
            raise ValueError(f"{name} is incomplete: it holds {_amount(size)} of the {_amount(expected)} its "
                             "header describes, as a download cut short leaves a file; download it again")
        if size > expected or sum(e - b for b, e in spans) != end:
            raise ValueError(f"{name} is damaged: its tensors do not fill it as its header says ({_amount(size)} "
                             f"on disk, {_amount(expected)} described); download it again")
    return header


class _Short(Exception):
    """A file shorter than its own header says (the header's end, in bytes)."""


def _amount(n: int) -> str:
    """Bytes for people: 23.8 GB, 310.2 MB, 512 bytes."""
    if n >= 1000**3:
        return f"{n / 1000**3:.1f} GB"
    if n >= 1000**2:
        return f"{n / 1000**2:.1f} MB"
    return f"{n} bytes"


def _safetensors_header(path: Path) -> tuple[dict, dict]:
    try:
        header = safetensors_header(path, complete=True)
    except ValueError as exc:
        raise WeightsError(f"{exc}.") from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    return shapes, dtypes


def _gguf_header(path: Path) -> tuple[dict, dict]:
    reader = _gguf_reader(path)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    dtypes = {t.name: t.tensor_type.name for t in reader.tensors}
    return shapes, dtypes


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise WeightsError(f"{path.name} is a GGUF file, which needs the gguf package: "
                           "pip install 'flux-fill-server[gguf]'.") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise WeightsError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}): it is incomplete, as a "
                           "download cut short leaves a file, or damaged; download it again.") from None


# -- what model is this? ---------------------------------------------------------------------------


def variant_name(in_channels: int, latent_channels: int, guidance: bool) -> str | None:
    """None for FLUX.1 Fill (its transformer reads the packed latents, the packed conditioning and the
    packed mask); otherwise the FLUX.1 model its input width belongs to."""
    packed = 4 * latent_channels
    if in_channels == 2 * packed + FILL_MASK_CHANNELS:
        return None
    if in_channels == packed:
        return "FLUX.1 [dev]" if guidance else "FLUX.1 [schnell]"
    if in_channels == 2 * packed:
        return "FLUX.1 Canny [dev] or FLUX.1 Depth [dev]"
    return f"a model whose transformer takes {in_channels} input channels"


def require_fill(source, in_channels: int | None, latent_channels: int, guidance: bool = True) -> None:
    """Refuse weights that are not FLUX.1 Fill, naming what they are, before anything is loaded."""
    if in_channels is None:
        raise WeightsError(f"{source} does not look like a FLUX.1 transformer (it has no input layer, "
                           "img_in or x_embedder).")
    other = variant_name(in_channels, latent_channels, guidance)
    if other is not None:
        fill = 8 * latent_channels + FILL_MASK_CHANNELS
        raise WeightsError(
            f"{source} is {other}, not FLUX.1 Fill [dev]: its transformer takes {in_channels} input channels "
            f"where Fill takes {fill}. See weights.md for the FLUX.1 Fill [dev] files.")


# -- the transformer's config ----------------------------------------------------------------------


def transformer_config(info: CheckpointInfo, components: Path) -> dict:
    """The components folder's transformer config, or one read off the checkpoint's shapes."""
    given = components / "transformer" / "config.json"
    if given.is_file():
        config = json.loads(given.read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}
    if info.layout != "bfl":
        raise WeightsError(f"{info.path.name} is in diffusers' layout: put its config.json in "
                           f"{components / 'transformer'}/ (see weights.md).")
    s = info.shapes
    try:
        inner, in_channels = s["img_in.weight"]
        head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        config = dict(
            patch_size=1,
            in_channels=in_channels,
            out_channels=s["final_layer.linear.weight"][0],
            num_layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("double_blocks.")),
            num_single_layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("single_blocks.")),
            attention_head_dim=head_dim,
            num_attention_heads=inner // head_dim,
            joint_attention_dim=s["txt_in.weight"][1],
            pooled_projection_dim=s["vector_in.in_layer.weight"][1],
            guidance_embeds=info.guidance,
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise WeightsError(f"{info.path.name} is missing the tensor {exc} of a FLUX.1 transformer.") from None
    if head_dim not in HEAD_DIM_ROPE:
        raise WeightsError(f"{info.path.name} has attention heads of {head_dim}, not FLUX.1's 128: put its "
                           f"config.json in {components / 'transformer'}/.")
    config["axes_dims_rope"] = HEAD_DIM_ROPE[head_dim]
    return {k: int(v) if isinstance(v, int) else v for k, v in config.items()}


# -- loading ---------------------------------------------------------------------------------------


def load_transformer(info: CheckpointInfo, config: dict, dtype):
    """The FluxTransformer2DModel in ``info.path``, on the CPU, every module frozen (eval, no grad)."""
    if info.format == "gguf":
        model = _load_gguf(info, config, dtype)
    else:
        model = _load_safetensors(info, config, dtype)
    return model.eval().requires_grad_(False)


def _load_gguf(info: CheckpointInfo, config: dict, dtype):
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    _gguf_reader(info.path)  # the clear error when gguf is not installed
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "transformer").mkdir()
        (Path(folder) / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
        try:
            return FluxTransformer2DModel.from_single_file(
                str(info.path), config=folder, subfolder="transformer", torch_dtype=dtype,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), local_files_only=True)
        except (KeyError, ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise WeightsError(f"Could not load the GGUF file {info.path}: {exc}".split("\n")[0]) from exc


def _load_safetensors(info: CheckpointInfo, config: dict, dtype):
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    name = info.path.name
    state, others = _transformer_part(load_file(str(info.path)), info.prefix)
    if others:
        log.info("%s: %d tensors outside %s (other models' parts, e.g. %s) are not the transformer's; not read",
                 name, len(others), info.prefix, sorted(others)[0])
    marked = any(k in COMFY_MARKERS for k in [*state, *others])
    state = {k: v for k, v in state.items() if k not in COMFY_MARKERS}
    state, scales = _split_scales(state, name)
    fp8_dtypes = (torch.float8_e4m3fn, torch.float8_e5m2)
    fp8 = {k for k, v in state.items() if v.dtype in fp8_dtypes}
    _require_scales(name, state, fp8, scales, marked)
    if info.layout == "bfl":
        row_scales = _converted_row_scales(state, fp8, scales, name)
        state, leftover = _convert_bfl(state)
    elif info.layout == "diffusers":
        row_scales = {k: _row_scale(state[k], scales.get(k), k, name) for k in fp8 | set(scales)}
        leftover = set()
    else:
        raise WeightsError(f"{name} holds no FLUX.1 transformer (neither BFL's nor diffusers' names).")

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    linears = {f"{module}.weight" for module, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(leftover | (set(state) - expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"an unexpected {unexpected[0]}"
        raise WeightsError(f"{name} does not fit FLUX.1 Fill [dev]'s transformer "
                           f"({len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. {what}).")
    fp8 = {k for k, v in state.items() if v.dtype in fp8_dtypes}  # by the transformer's names now
    plain, quantised = {}, {}
    for key, value in state.items():
        if key in row_scales and key in linears and key in fp8:
            quantised[key] = _float8_weight(value, row_scales[key], dtype)
        elif key in row_scales:  # a scaled tensor outside a linear layer's fp8 weight: dequantised
            plain[key] = (value.float() * row_scales[key].reshape(-1, *([1] * (value.ndim - 1)))).to(dtype)
        else:
            plain[key] = value.to(dtype)
        state[key] = None  # each source tensor is freed as soon as it is placed
    model.load_state_dict(plain, strict=False, assign=True)
    for key, weight in quantised.items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    if quantised:
        log.info("%s: %d linear layers kept in fp8%s", name, len(quantised), " with their scales" if scales else "")
    return model


def _transformer_part(raw: dict, prefix: str) -> tuple[dict, set]:
    """The transformer's tensors (``prefix`` removed) and the names of the others: a file with the
    transformer under ``model.diffusion_model.`` may also hold the VAE and the text encoders (an
    "all in one" checkpoint), which --components provides; markers such as ``scaled_fp8`` count as
    the transformer's."""
    if not prefix:
        return raw, set()
    state, others = {}, set()
    for key, value in raw.items():
        if key.startswith(prefix):
            state[key[len(prefix):]] = value
        elif key in COMFY_MARKERS:
            state[key] = value
        else:
            others.add(key)
    return state, others


def _split_scales(state: dict, name: str) -> tuple[dict, dict]:
    """The tensors without their scales, and each weight's scale (by the weight's name). Input
    scales serve fp8 matmuls of the activations, which a weight-only layer does not do: dropped.
    Block-wise scales (DeepSeek's ``weight_scale_inv``) are refused in words."""
    blocks = [k for k in state if k.endswith(BLOCK_SCALE_SUFFIXES)]
    if blocks:
        raise WeightsError(f"{name} holds block-wise fp8 scales ({blocks[0]}), a layout this server does not read; "
                           "use a bf16, fp8, ComfyUI scaled fp8 or GGUF file (see weights.md).")
    scales, rest = {}, {}
    for key, value in state.items():
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            weight = key[: -len(suffix)] + ".weight"
            if weight in scales:
                raise WeightsError(f"{name} gives {weight} two scales (under two names); it is damaged or made by a "
                                   "tool this server does not know. Use another file (see weights.md).")
            scales[weight] = value
        elif not key.endswith(INPUT_SCALE_SUFFIXES):
            rest[key] = value
    unscaled = sorted(set(scales) - set(rest))
    if unscaled:
        raise WeightsError(f"{name} has a scale for {unscaled[0]} but no such weight; it is damaged or incomplete: "
                           "download it again (see weights.md).")
    return rest, scales


def _require_scales(name: str, state: dict, fp8: set, scales: dict, marked: bool) -> None:
    """Refuse, before it serves NaN, an fp8 file whose weights were scaled and whose scales are gone
    or unreadable: scales under names this server does not know, the ``scaled_fp8`` marker with no
    scale at all, or fp8 weights whose values fill fp8's whole range (a plain cast of FLUX.1's
    weights stays far below it; a scaled weight's largest value is fp8's largest) with no scale of
    their own. With no scale in the file, its first few weights tell."""
    if not fp8:
        return
    renamed = sorted(k for k in state if "scale" in k.rsplit(".", 1)[-1] and k.rsplit(".", 1)[-1] != "scale")
    if renamed:
        raise WeightsError(f"{name} keeps its fp8 scales under names this server does not read (e.g. {renamed[0]}, "
                           f"{len(renamed)} in all); it reads .scale_weight (ComfyUI's) and .weight_scale. Use a "
                           "bf16, fp8, ComfyUI scaled fp8 or GGUF file (see weights.md).")
    if marked and not scales:
        raise WeightsError(f"{name} is marked as ComfyUI scaled fp8 (its scaled_fp8 tensor) but holds no scale for its "
                           "weights (no .scale_weight tensors): they were stripped, or the file is incomplete. Download "
                           "it again, or use a bf16, fp8 or GGUF file (see weights.md).")
    unscaled = sorted(k for k in fp8 if k not in scales and state[k].ndim == 2)
    full = next((k for k in (unscaled if scales else unscaled[:4]) if _fills_fp8_range(state[k])), None)
    if full is not None:
        where = "no scale for it" if scales else "no scales at all"
        raise WeightsError(f"{name}'s fp8 weights were scaled (the values of {full} fill fp8's whole range) but the "
                           f"file has {where}: the scales were stripped or are stored under a name this server does "
                           "not read. Download it again, or use a bf16, fp8, ComfyUI scaled fp8 or GGUF file (see "
                           "weights.md).")


def _fills_fp8_range(weight) -> bool:
    """Whether an fp8 tensor's largest magnitude is in the top half of its format's range (or not
    finite). The magnitude order of fp8 values is their bit patterns' order with the sign bit off."""
    import math

    import torch

    codes = weight.view(torch.uint8).bitwise_and(0x7F)
    peak = float(codes.max().reshape(1).view(weight.dtype).float())
    return not math.isfinite(peak) or peak >= torch.finfo(weight.dtype).max / 2


def _row_scale(weight, scale, key: str, name: str):
    """A weight's scale as one value per output row: a file stores one value (ComfyUI) or one a row."""
    import torch

    rows = weight.shape[0] if weight.ndim else 1
    if scale is None:
        return torch.ones((rows, 1), dtype=torch.float32)
    if scale.numel() == 1:
        return torch.full((rows, 1), float(scale.float().reshape(())), dtype=torch.float32)
    if scale.numel() == rows:
        return scale.float().reshape(rows, 1)
    raise WeightsError(f"{name} gives {key} a scale of shape {tuple(scale.shape)}, neither one value nor one a row of "
                       f"its {rows} rows; this server does not read that layout (see weights.md).")


def _converted_row_scales(state: dict, fp8: set, scales: dict, name: str) -> dict:
    """Each converted scaled tensor's scale, one per output row: the BFL names go through diffusers'
    converter as [rows, 1] columns of their scale (every other tensor as a column of zeros), so the
    converter's splits and reorderings carry each scale to wherever its rows end up."""
    import torch

    def rows(v) -> int:
        return v.shape[0] if v.ndim else 1

    scaled = fp8 | set(scales)
    converted, _ = _convert_bfl({k: _row_scale(v, scales.get(k), k, name) if k in scaled else torch.zeros((rows(v), 1))
                                 for k, v in state.items()})
    from_scaled, _ = _convert_bfl({k: torch.full((rows(v), 1), float(k in scaled)) for k, v in state.items()})
    return {k: v for k, v in converted.items() if bool(from_scaled[k].all())}


def _convert_bfl(state: dict) -> tuple[dict, set]:
    """diffusers' converter on BFL names: the converted tensors, and the names it did not convert
    (it drops what it does not know; those are reported, not lost without a word)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    source = dict(state)
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(source)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise WeightsError(f"The checkpoint is not a complete FLUX.1 transformer in BFL's layout "
                           f"(missing or odd-sized {exc}).") from None
    return converted, set(source)


def _float8_weight(value, row_scale, dtype):
    """An fp8 weight and its per-row scale as a torchao Float8Tensor, dequantised to ``dtype`` per matmul."""
    try:
        from torchao.quantization import Float8Tensor
    except ImportError:
        raise WeightsError("This checkpoint holds fp8 weights, which need torchao: "
                           "pip install 'flux-fill-server[gpu]'.") from None
    return Float8Tensor(value, row_scale.to(value.device), block_size=[1, value.shape[1]], dtype=dtype)
