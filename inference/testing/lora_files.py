"""LoRA files for the tiny transformer, in the formats FLUX.1 [dev] LoRAs come in."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from .checkpoint_files import base_tensors, to_bfl


def linears(transformer):
    """(name, linear layer) for every linear layer, seen through peft's wrappers when a LoRA was loaded."""
    for name, module in transformer.named_modules():
        module = getattr(module, "base_layer", module)
        if isinstance(module, torch.nn.Linear) and not name.endswith(".base_layer") and ".lora_" not in name:
            yield name, module


def diffusers_lora(transformer, path, rank: int = 4, seed: int = 0, with_text_encoder: bool = False):
    """diffusers/peft format: transformer.<module>.lora_A/B.weight for every attention projection."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in linears(transformer):
        if name.split(".")[-1] in ("to_q", "to_k", "to_v", "add_q_proj"):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.5
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.5
    if with_text_encoder:
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, 32, generator=gen)
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(32, rank, generator=gen)
    save_file(state, str(path))
    return path


def kohya_lora(transformer, path, rank: int = 4, seed: int = 1):
    """Kohya format: lora_unet_<block>_<module>.lora_down/lora_up/alpha, BFL module names, with a
    text-encoder part that must be ignored. (diffusers' converter fixes the single blocks' split sizes to
    the real model's, so only double blocks are used at this tiny size.)"""
    gen = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state = {}
    for i in range(len(transformer.transformer_blocks)):
        for part in ("img", "txt"):
            key = f"lora_unet_double_blocks_{i}_{part}_attn_qkv"
            state[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=gen) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(3 * dim, rank, generator=gen) * 0.5
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(rank, 32, generator=gen)
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, rank, generator=gen)
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def xlabs_lora(transformer, path, rank: int = 4, seed: int = 2):
    """XLabs format: double_blocks.<i>.processor.{qkv,proj}_lora{1,2}.{down,up}.weight."""
    gen = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state = {}
    for i in range(len(transformer.transformer_blocks)):
        for n in ("1", "2"):
            state[f"double_blocks.{i}.processor.qkv_lora{n}.down.weight"] = torch.randn(rank, dim, generator=gen) * 0.5
            state[f"double_blocks.{i}.processor.qkv_lora{n}.up.weight"] = torch.randn(3 * dim, rank, generator=gen) * 0.5
            state[f"double_blocks.{i}.processor.proj_lora{n}.down.weight"] = torch.randn(rank, dim, generator=gen) * 0.5
            state[f"double_blocks.{i}.processor.proj_lora{n}.up.weight"] = torch.randn(dim, rank, generator=gen) * 0.5
    save_file(state, str(path))
    return path


# -- the formats at FLUX.1's real width, for comparing with diffusers' own loading -------------------

DOUBLE = ("img_attn.qkv", "txt_attn.proj", "img_mlp.0")
SINGLE = ("linear1", "linear2")


def _bfl_pairs(transformer, rank: int, seed: int, double=DOUBLE, single=SINGLE, width: int | None = None):
    """(BFL module name, down [rank, in], up [out, rank]) for some layers of every block, with the
    shapes BFL's fused layers have; ``width`` makes them those of a model of another width."""
    gen = torch.Generator().manual_seed(seed)
    dim = width or transformer.config.num_attention_heads * transformer.config.attention_head_dim
    shapes = {"img_attn.qkv": (dim, 3 * dim), "txt_attn.proj": (dim, dim), "img_mlp.0": (dim, 4 * dim),
              "linear1": (dim, 3 * dim + 4 * dim), "linear2": (dim + 4 * dim, dim)}
    pairs = []
    for i in range(len(transformer.transformer_blocks)):
        for part in double:
            fan_in, fan_out = shapes[part]
            pairs.append((f"double_blocks.{i}.{part}", torch.randn(rank, fan_in, generator=gen) * 0.05,
                          torch.randn(fan_out, rank, generator=gen) * 0.05))
    for i in range(len(transformer.single_transformer_blocks)):
        for part in single:
            fan_in, fan_out = shapes[part]
            pairs.append((f"single_blocks.{i}.{part}", torch.randn(rank, fan_in, generator=gen) * 0.05,
                          torch.randn(fan_out, rank, generator=gen) * 0.05))
    return pairs


def _bfl_layout(transformer, path, key, suffixes, rank, alpha, seed, text_encoder_key=None, width=None):
    """A LoRA over BFL's layers: ``key(name)`` names a layer, ``suffixes`` its down/up weights, an
    ``.alpha`` beside each (unless None) and, with ``text_encoder_key``, a CLIP part Fill ignores."""
    state = {}
    for name, down, up in _bfl_pairs(transformer, rank, seed, width=width):
        state[f"{key(name)}.{suffixes[0]}.weight"] = down
        state[f"{key(name)}.{suffixes[1]}.weight"] = up
        if alpha is not None:
            state[f"{key(name)}.alpha"] = torch.tensor(alpha)
    if text_encoder_key:
        state[f"{text_encoder_key}.lora_down.weight"] = torch.randn(rank, 32)
        state[f"{text_encoder_key}.lora_up.weight"] = torch.randn(32, rank)
        state[f"{text_encoder_key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def comfyui_lora(transformer, path, rank: int = 4, alpha: float = 8.0, seed: int = 3, text_encoder: bool = True):
    """ComfyUI's layout: diffusion_model.<BFL name>.lora_down/lora_up/alpha, with a CLIP part
    (text_encoders.clip_l.transformer...) that Fill ignores."""
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj" if text_encoder else None
    return _bfl_layout(transformer, path, lambda name: f"diffusion_model.{name}", ("lora_down", "lora_up"), rank,
                       alpha, seed, te)


def bfl_a_b_lora(transformer, path, prefix: str = "diffusion_model.", rank: int = 4, alpha: float | None = 8.0,
                 seed: int = 3):
    """BFL module names with peft's lora_A/lora_B suffixes (bare, or under diffusion_model.)."""
    return _bfl_layout(transformer, path, lambda name: f"{prefix}{name}", ("lora_A", "lora_B"), rank, alpha, seed)


def kohya_full_lora(transformer, path, rank: int = 4, alpha: float = 2.0, seed: int = 5, text_encoder: bool = True,
                    width: int | None = None):
    """Kohya's sd-scripts layout over double and single blocks (lora_unet_single_blocks_0_linear1 ...),
    with a CLIP part to be ignored; ``width``: made for a model of that width (2048 for a "lite" one)."""
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" if text_encoder else None
    return _bfl_layout(transformer, path, lambda name: "lora_unet_" + name.replace(".", "_"),
                       ("lora_down", "lora_up"), rank, alpha, seed, te, width)


def comfyui_diff_lora(transformer, path, deltas: dict, rank: int = 4, alpha: float = 4.0, seed: int = 9,
                      pairs: bool = True, prefix: str = "diffusion_model."):
    """A ComfyUI LoRA with whole differences: ``deltas`` (diffusers' parameter name -> a difference of
    its shape) written in BFL's names, as ``<layer>.diff`` (weights), ``<layer>.diff_b`` (biases) and
    ``<norm>.scale.diff`` (norms), fused layers fused, by the inverse of diffusers' converter; an
    all-zero difference for a norm nobody trained beside them, and with ``pairs`` lora_down/lora_up
    pairs over the double blocks (diffusers converts ComfyUI's single blocks at FLUX.1's width only)."""
    base = base_tensors(transformer)
    whole = to_bfl({k: deltas[k] if k in deltas else torch.zeros_like(v) for k, v in base.items()})
    state = {}
    for key, value in whole.items():
        if not bool(value.any()):
            continue
        if key.endswith(".scale"):
            state[f"{prefix}{key}.diff"] = value.contiguous()
        elif key.endswith(".bias"):
            state[f"{prefix}{key[: -len('.bias')]}.diff_b"] = value.contiguous()
        else:
            state[f"{prefix}{key[: -len('.weight')]}.diff"] = value.contiguous()
    state[f"{prefix}double_blocks.0.txt_attn.norm.key_norm.scale.diff"] = \
        torch.zeros_like(base["transformer_blocks.0.attn.norm_added_k.weight"])
    if pairs:
        for name, down, up in _bfl_pairs(transformer, rank, seed, single=()):
            state[f"{prefix}{name}.lora_down.weight"] = down
            state[f"{prefix}{name}.lora_up.weight"] = up
            state[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def peft_state(transformer, rank: int = 4, seed: int = 7, modules=("to_q", "to_k", "to_v", "add_q_proj", "proj_mlp"),
               fan_in: int | None = None):
    """diffusers' names: <module>.lora_A/lora_B.weight (no prefix), ``fan_in`` overriding the input width."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in linears(transformer):
        if name.split(".")[-1] in modules:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in or module.in_features, generator=gen) * 0.05
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.05
    return state


def peft_lora(transformer, path, rank: int = 4, alpha: float | None = None, seed: int = 7, norms: bool = False,
              fan_in: int | None = None, modules=("to_q", "to_k", "to_v", "add_q_proj", "proj_mlp")):
    """What diffusers' training scripts write: transformer.<module>.lora_A/B.weight, the alpha in the
    file's lora_adapter_metadata (when given), and, with ``norms``, the norm_q/norm_k weights
    diffusers makes of BFL's Canny and Depth LoRAs."""
    from diffusers import FluxPipeline

    state = peft_state(transformer, rank, seed, modules, fan_in)
    if norms:
        gen = torch.Generator().manual_seed(seed + 100)
        for name, value in transformer.state_dict().items():
            if name.endswith(("attn.norm_q.weight", "attn.norm_k.weight")):
                state[name] = 1.0 + torch.rand(value.shape, generator=gen)
    metadata = None
    if alpha is not None:
        targets = sorted({k.split(".lora_")[0] for k in state if ".lora_" in k})
        metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0,
                    "init_lora_weights": "gaussian"}
    folder = path.parent / f"{path.stem}.saved"
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=path.name,
                                   transformer_lora_adapter_metadata=metadata)
    (folder / path.name).replace(path)
    folder.rmdir()
    return path
