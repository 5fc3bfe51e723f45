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
SCALE_SUFFIX = ".scale_weight"
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
        return any(k.endswith(SCALE_SUFFIX) for k in self.shapes)

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
        kind = "GGUF" if self.format == "gguf" else ("ComfyUI scaled fp8" if self.scaled_fp8 else
                                                     "fp8" if self.fp8 else "safetensors")
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


def safetensors_header(path: Path) -> dict:
    """A .safetensors file's header (name -> dtype, shape, offsets), its ``__metadata__`` left out;
    ValueError when the file is not one."""
    import struct

    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ValueError(f"{Path(path).name} is not a readable .safetensors file ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{Path(path).name} is not a readable .safetensors file")
    header.pop("__metadata__", None)
    return header


def _safetensors_header(path: Path) -> tuple[dict, dict]:
    try:
        header = safetensors_header(path)
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
        raise WeightsError(f"{path} is not a readable GGUF file ({type(exc).__name__}).") from None


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

    state = _unprefixed(load_file(str(info.path)), info.prefix) if info.prefix else load_file(str(info.path))
    scales = {k[: -len(SCALE_SUFFIX)] + ".weight": v.float().reshape(()) for k, v in state.items()
              if k.endswith(SCALE_SUFFIX)}
    state = {k: v for k, v in state.items()
             if not (k.endswith(SCALE_SUFFIX) or k.endswith(".scale_input") or k in COMFY_MARKERS)}
    fp8 = {k for k, v in state.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    if info.layout == "bfl":
        row_scales = _converted_row_scales(state, fp8, scales)
        state = _convert_bfl(state)
    elif info.layout == "diffusers":
        row_scales = {k: _row_scale(state[k], scales.get(k)) for k in fp8}
    else:
        raise WeightsError(f"{info.path.name} holds no FLUX.1 transformer (neither BFL's nor diffusers' names).")

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"an unexpected {unexpected[0]}"
        raise WeightsError(f"{info.path.name} does not fit FLUX.1 Fill [dev]'s transformer "
                           f"({len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. {what}).")
    plain, quantised = {}, {}
    for name, value in state.items():
        if name in row_scales and name in linears:
            quantised[name] = _float8_weight(value, row_scales[name], dtype)
        elif name in row_scales:  # an fp8 tensor outside a linear layer's weight: dequantised
            plain[name] = (value.float() * row_scales[name].reshape(-1, *([1] * (value.ndim - 1)))).to(dtype)
        else:
            plain[name] = value.to(dtype)
        state[name] = None  # each source tensor is freed as soon as it is placed
    model.load_state_dict(plain, strict=False, assign=True)
    for name, weight in quantised.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    if quantised:
        log.info("%s: %d linear layers kept in fp8%s", info.path.name, len(quantised),
                 " with their scales" if scales else "")
    return model


def _row_scale(weight, scale):
    import torch

    value = float(scale) if scale is not None else 1.0
    return torch.full((weight.shape[0], 1), value, dtype=torch.float32)


def _converted_row_scales(state: dict, fp8: set, scales: dict) -> dict:
    """Each converted fp8 tensor's scale, one per output row: the BFL names go through diffusers'
    converter as [rows, 1] columns of their scale (every other tensor as a column of zeros), so the
    converter's splits and reorderings carry each scale to wherever its rows end up."""
    import torch

    def rows(v) -> int:
        return v.shape[0] if v.ndim else 1

    converted = _convert_bfl({k: _row_scale(v, scales.get(k)) if k in fp8 else torch.zeros((rows(v), 1))
                              for k, v in state.items()})
    from_fp8 = _convert_bfl({k: torch.full((rows(v), 1), float(k in fp8)) for k, v in state.items()})
    return {k: v for k, v in converted.items() if bool(from_fp8[k].all())}


def _convert_bfl(state: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    try:
        return convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    except (KeyError, IndexError, RuntimeError) as exc:
        raise WeightsError(f"The checkpoint is not a complete FLUX.1 transformer in BFL's layout "
                           f"(missing or odd-sized {exc}).") from None


def _float8_weight(value, row_scale, dtype):
    """An fp8 weight and its per-row scale as a torchao Float8Tensor, dequantised to ``dtype`` per matmul."""
    try:
        from torchao.quantization import Float8Tensor
    except ImportError:
        raise WeightsError("This checkpoint holds fp8 weights, which need torchao: "
                           "pip install 'flux-fill-server[gpu]'.") from None
    return Float8Tensor(value, row_scale.to(value.device), block_size=[1, value.shape[1]], dtype=dtype)
