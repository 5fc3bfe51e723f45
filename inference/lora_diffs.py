"""ComfyUI's ``.diff`` and ``.diff_b`` LoRA tensors: whole differences to add to a weight or a bias.

Some trainers save, beside the low-rank pairs, full differences for the tensors they trained outright
(the norms' scales, the biases, now and then a whole weight): ``<layer>.diff`` for the weight (for a
norm, ``<norm>.scale.diff``), ``<layer>.diff_b`` for the bias. ComfyUI adds them, times the LoRA's
strength; diffusers drops them with an info line. Here they are applied as ComfyUI applies them:
for the prediction that asks for the LoRA, each tensor is its base value plus ``lora_scale`` times
the difference, and the base value is back when the prediction ends (as with the norms some LoRAs
set, :mod:`inference.lora`).

The files name layers as BFL does (``diffusion_model.double_blocks.0.img_attn.qkv.diff``, or
Kohya's ``lora_unet_double_blocks_0_img_attn_qkv.diff``), where some layers are fused: a difference
for ``img_attn.qkv`` is split by rows into diffusers' ``to_q``, ``to_k`` and ``to_v``, and the final
modulation's halves are swapped, exactly as diffusers' checkpoint converter does with weights. A
difference that is all zeros changes nothing and is left out; one for a layer FLUX.1 does not have,
or of another size, is refused in words.
"""

from __future__ import annotations

DIFF_SUFFIXES = (".diff", ".diff_b")
PREFIXES = ("diffusion_model.", "transformer.", "lora_unet_")

# BFL's layers, by their names inside a block or at the top, and the diffusers modules their rows go to.
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),  # BFL's (shift, scale) is diffusers' (scale, shift)
}
SWAPPED = ("final_layer.adaLN_modulation.1",)


def is_diff(key: str) -> bool:
    return key.endswith(DIFF_SUFFIXES)


def bfl_layers(transformer) -> dict:
    """Every BFL layer name of ``transformer`` -> the diffusers modules its rows go to, in order."""
    layers = dict(TOP)
    for i in range(len(transformer.transformer_blocks)):
        layers.update({f"double_blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{m}" for m in v)
                       for k, v in DOUBLE.items()})
    for i in range(len(transformer.single_transformer_blocks)):
        layers.update({f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{m}" for m in v)
                       for k, v in SINGLE.items()})
    return layers


def split(diffs: dict, transformer, tensors: dict, file_name: str, bad) -> dict:
    """``diffs`` (file key -> tensor) as differences to the transformer's own tensors: diffusers'
    parameter name -> difference of that parameter's shape. ``tensors``: the transformer's
    parameters by their base names; ``bad(sentence)`` makes the error to raise."""
    import torch

    layers = bfl_layers(transformer)
    underscored = {name.replace(".", "_"): name for name in layers}
    modules = {name.rsplit(".", 1)[0] for name in tensors}
    out: dict = {}
    for key, diff in diffs.items():
        if not bool(diff.any()):
            continue  # an all-zero difference changes nothing (trainers write them for untrained norms)
        stem, kind = (key[: -len(".diff_b")], "bias") if key.endswith(".diff_b") else (key[: -len(".diff")], "weight")
        for prefix in PREFIXES:
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        if kind == "weight" and stem.endswith(".scale"):  # a BFL norm's parameter is its scale
            stem = stem[: -len(".scale")]
        layer = underscored.get(stem, stem)
        if layer in layers:
            targets = [f"{module}.{kind}" for module in layers[layer]]
        elif stem in modules:  # diffusers' own names
            targets = [f"{stem}.{kind}"]
        else:
            raise bad(f"{file_name} changes {stem}, which is not a layer of FLUX.1 Fill [dev]'s transformer "
                      f"(its key {key})")
        missing = [t for t in targets if t not in tensors]
        if missing:
            raise bad(f"{file_name} changes {missing[0]}, which FLUX.1 Fill [dev]'s transformer does not have (its key "
                      f"{key})")
        rows = [tensors[t].shape[0] for t in targets]
        rest = tuple(tensors[targets[0]].shape[1:])
        if diff.ndim == 0 or diff.shape[0] != sum(rows) or tuple(diff.shape[1:]) != rest:
            raise bad(f"{file_name} was made for a model of another size: its {key} is {tuple(diff.shape)} where this "
                      f"model's {stem} is {(sum(rows), *rest)}")
        if layer in SWAPPED:
            shift, scale = diff.chunk(2, dim=0)
            diff = torch.cat([scale, shift], dim=0)
        for target, part in zip(targets, diff.split(rows, dim=0)):
            out[target] = part.contiguous()
    return out
