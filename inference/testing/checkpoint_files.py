"""Transformer checkpoints in the on-disk layouts users have them, made from a diffusers transformer:
BFL's single file (bare or under ``model.diffusion_model.``), plain fp8, ComfyUI's scaled fp8, GGUF.

diffusers' BFL converter splits the single blocks' fused projection at FLUX.1's real width (3072), so
these files are written from a transformer of real width (one block of each kind keeps it cheap)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # the largest float8_e4m3fn value


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def base_tensors(transformer) -> dict:
    """The transformer's own tensors by their base names: a LoRA loaded into it before leaves peft's
    wrappers (``….base_layer.weight``, ``….lora_A…``), which are seen through."""
    return {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}


def to_bfl(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's names (the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers)."""
    s = {k: v.detach().clone() for k, v in state.items()}
    out = {}

    def move(src, dst):
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in s:
                out[f"{dst}.{kind}"] = s.pop(f"{src}.{kind}")

    def fuse(srcs, dst):
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([s.pop(f"{src}.{kind}") for src in srcs])

    move("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    move("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    move("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    move("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    move("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    move("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    doubles = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    for i in doubles:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        move(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv")
        fuse([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv")
        out[f"{b}.img_attn.norm.query_norm.scale"] = s.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.img_attn.norm.key_norm.scale"] = s.pop(f"{d}.attn.norm_k.weight")
        out[f"{b}.txt_attn.norm.query_norm.scale"] = s.pop(f"{d}.attn.norm_added_q.weight")
        out[f"{b}.txt_attn.norm.key_norm.scale"] = s.pop(f"{d}.attn.norm_added_k.weight")
        move(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        move(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        move(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        move(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        move(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        move(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    singles = sorted({int(k.split(".")[1]) for k in s if k.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{d}.norm.linear", f"{b}.modulation.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1")
        out[f"{b}.norm.query_norm.scale"] = s.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = s.pop(f"{d}.attn.norm_k.weight")
        move(f"{d}.proj_out", f"{b}.linear2")
    move("proj_out", "final_layer.linear")
    out["final_layer.adaLN_modulation.1.weight"] = swap_scale_shift(s.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_scale_shift(s.pop("norm_out.linear.bias"))
    assert not s, f"not converted: {sorted(s)[:5]}"
    return out


def fp8_linear_weights(bfl: dict) -> set[str]:
    """The 2-D weights fp8 checkpoints store in fp8 (norms, biases and the rest stay wider)."""
    return {k for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2}


def save_bfl(transformer, path, prefix: str = "", dtype=torch.bfloat16):
    state = {f"{prefix}{k}": v.to(dtype).contiguous() for k, v in to_bfl(base_tensors(transformer)).items()}
    save_file(state, str(path))
    return path


def save_fp8(transformer, path, prefix: str = "model.diffusion_model."):
    """Plain fp8 (what most fp8 FLUX files are): the linear weights cast to float8_e4m3fn, no scales."""
    bfl = to_bfl(base_tensors(transformer))
    fp8 = fp8_linear_weights(bfl)
    state = {f"{prefix}{k}": (v.to(torch.float8_e4m3fn) if k in fp8 else v.to(torch.bfloat16)).contiguous()
             for k, v in bfl.items()}
    save_file(state, str(path))
    return path


def save_comfy_scaled_fp8(transformer, path, prefix: str = "model.diffusion_model.", *, scale_suffix: str = ".scale_weight",
                          input_suffix: str = ".scale_input", marker: bool = True, scales: bool = True,
                          per_row: bool = False):
    """ComfyUI's scaled fp8: each fp8 weight is w / scale_weight, with max |w / scale| = 448, a scalar
    ``scale_weight`` (and ``scale_input``) beside it, and the ``scaled_fp8`` marker.

    The other scaled layouts users meet, from the same values: the scales under other names
    (``scale_suffix=".weight_scale", input_suffix=".input_scale"``, as compressed-tensors and ModelOpt
    write them), one scale per output row (``per_row``), and a file stripped of its scales
    (``scales=False``), with or without the marker."""
    bfl = to_bfl(base_tensors(transformer))
    fp8 = fp8_linear_weights(bfl)
    state = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)} if marker else {}
    for k, v in bfl.items():
        if k in fp8:
            peak = v.abs().amax(dim=1, keepdim=True) if per_row else v.abs().max()
            scale = peak.float().clamp(min=1e-12) / FP8_MAX
            state[f"{prefix}{k}"] = (v.float() / scale).to(torch.float8_e4m3fn).contiguous()
            stem = k[: -len(".weight")]
            if scales:
                state[f"{prefix}{stem}{scale_suffix}"] = scale if per_row else scale.reshape(())
                state[f"{prefix}{stem}{input_suffix}"] = torch.tensor(1.0)
        else:
            state[f"{prefix}{k}"] = v.to(torch.bfloat16).contiguous()
    save_file(state, str(path))
    return path


def truncate(path, keep: float = 0.5):
    """Cut a file to ``keep`` of its size, as a download that stopped part way leaves it."""
    from pathlib import Path

    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def save_gguf(transformer, path, quantised: dict):
    """A GGUF file as city96's FLUX GGUFs are laid out: BFL names, arch "flux", ``quantised`` maps a
    BFL weight name to its GGML type (Q8_0, Q4_0 ...); the other 2-D weights are F16, the rest F32.
    Returns the values the file holds, dequantised as diffusers does, as a BFL state dict."""
    import gguf
    import numpy as np

    bfl = to_bfl(base_tensors(transformer))
    writer = gguf.GGUFWriter(str(path), arch="flux")
    values = {}
    for name, tensor in bfl.items():
        array = tensor.float().numpy()
        qtype = quantised.get(name)
        if qtype is not None:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
            # diffusers dequantises in float16 (scale times quant, one rounding), as llama.cpp does.
            dequantised = gguf.quants.dequantize(data, kind).reshape(array.shape).astype(np.float16)
            values[name] = torch.from_numpy(dequantised.astype(np.float32))
        elif array.ndim == 2:
            half = array.astype(np.float16)
            writer.add_tensor(name, half)
            values[name] = torch.from_numpy(half.astype(np.float32))
        else:
            writer.add_tensor(name, array.astype(np.float32))
            values[name] = torch.from_numpy(array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values
