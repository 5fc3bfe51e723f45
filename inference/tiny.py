"""The built-in demo model: a tiny FLUX.1 Fill with random weights, built in code.

It has the real architecture (a FluxTransformer2DModel with fill inputs, a Flux-style 16x... VAE with
an 8x scale factor, CLIP and T5 text encoders) at a size that runs a 64x64 prediction on a CPU in a
fraction of a second. It is saved with ``save_pretrained`` in the diffusers layout and loaded through
the same code path as real weights, so it exercises everything but the picture quality: its outputs
are coloured noise shaped by the mask, not images of the prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_SEED = 0
TINY_LAYOUT_VERSION = "1"
LATENT_CHANNELS = 4


def _vocabulary() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = [
        "a", "an", "the", "cat", "dog", "red", "blue", "green", "sky", "tree", "house", "sofa",
        "photo", "of", "on", "in", "with", "and", "white", "black", "hat", "wall", "flower",
    ]
    return list(letters) + words


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    pieces = ["!", '"', "#", "<|startoftext|>", "<|endoftext|>"]
    for token in _vocabulary():
        pieces.append(token + "</w>")
        pieces.append(token)
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -float(i + 1)) for i, word in enumerate(_vocabulary())]
    pieces += [(word, -100.0 - i) for i, word in enumerate(_vocabulary())]
    pieces.append(("\u2581", -1000.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0)


_C = LATENT_CHANNELS
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4 * _C + 4 * _C + 4 * 64, out_channels=4 * _C, num_layers=1,
                          num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                          pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 8, 8, 8), layers_per_block=1,
                  latent_channels=_C, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
CLIP_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=77, projection_dim=32)
T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True)


def build_fill_pipeline(transformer_config: dict, vae_config: dict, clip_config: dict, t5_config: dict,
                        scheduler_config: dict, *, seed: int, device: str = "cpu", dtype=None):
    """A FluxFillPipeline of the given sizes with deterministic random weights, each model made in
    ``dtype`` (the default dtype is set for the construction) directly on ``device``. The tokenizers
    are the small in-code ones; a text encoder's vocabulary is theirs unless its config names one."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    special = dict(bos_token_id=clip_tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                   eos_token_id=clip_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   pad_token_id=clip_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**transformer_config)
            vae = AutoencoderKL(**vae_config)
            clip = CLIPTextConfig(**{"vocab_size": len(clip_tokenizer), **clip_config, **special})
            text_encoder = CLIPTextModel(clip)
            text_encoder_2 = T5EncoderModel(T5Config(**{"vocab_size": len(t5_tokenizer), **t5_config}))
    finally:
        torch.set_default_dtype(previous)
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_tiny_pipeline():
    """Build the tiny FluxFillPipeline in memory, with deterministic random weights."""
    return build_fill_pipeline(TRANSFORMER_CONFIG, VAE_CONFIG, CLIP_CONFIG, T5_CONFIG, SCHEDULER_CONFIG,
                               seed=TINY_SEED)


def default_tiny_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "flux-fill-server" / f"tiny-v{TINY_LAYOUT_VERSION}"


def ensure_tiny_weights(folder: Path | None = None) -> Path:
    """Save the tiny model in the diffusers layout once, and return its folder."""
    folder = Path(folder) if folder is not None else default_tiny_dir()
    marker = folder / "flux_fill_tiny.json"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    build_tiny_pipeline().save_pretrained(tmp)
    (tmp / "flux_fill_tiny.json").write_text(json.dumps({"demo": True, "layout": TINY_LAYOUT_VERSION}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
