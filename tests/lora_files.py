"""LoRA files for the tiny transformer, in the formats FLUX.1 [dev] LoRAs come in."""

from __future__ import annotations

import torch
from safetensors.torch import save_file


def diffusers_lora(transformer, path, rank: int = 4, seed: int = 0, with_text_encoder: bool = False):
    """diffusers/peft format: transformer.<module>.lora_A/B.weight for every attention projection."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "add_q_proj"):
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
