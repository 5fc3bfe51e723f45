"""The built-in demo model: a tiny FLUX.1 Fill with random weights, built in code.

It has the real architecture (a FluxTransformer2DModel with fill inputs, a Flux-style VAE with an 8x
scale factor, CLIP and T5 text encoders) at a size that runs a 64x64 prediction on a CPU in a
fraction of a second. It is saved with ``save_pretrained`` in the diffusers layout and loaded through
the same code path as real weights, so it exercises everything but the picture quality.

Its outputs look like FLUX.1 Fill's in one way that matters to a person trying the product: the
picture outside the mask is kept (as the trained model keeps it) and the masked area is repainted,
here with random colours, never an image of the prompt. Two parts are built for that, not drawn at
random (see :func:`keep_the_picture`):

- the VAE round-trips pixels: its encoder takes the mean colour of each 8x8 patch into the first
  three latent channels and its decoder paints each latent back as its colour, so decode(encode(x))
  is x at an eighth of the resolution (a mosaic of 8 px tiles);
- the transformer's input and output layers make its velocity pull the latents towards the known
  (masked-image) latents where the mask is clear, and barely move them where it is painted, so the
  masked area keeps the seed's starting noise. Its blocks keep their random weights and add their
  (small) part everywhere, so LoRAs, prompts and guidance still change the outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_SEED = 0
# What the demo model does, in the words /health, the web page, the logs and the CLI use.
DEMO_NOTICE = ("The tiny built-in model with random weights: it keeps the picture outside the mask and paints "
               "random colours inside it, whatever the prompt. Start the server with --weights to serve "
               "FLUX.1 Fill [dev].")
TINY_LAYOUT_VERSION = "2"
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
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  latent_channels=_C, norm_num_groups=1, sample_size=64, use_quant_conv=False,
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
    """Build the tiny FluxFillPipeline in memory: deterministic random weights, and the layers of
    :func:`keep_the_picture` set."""
    pipe = build_fill_pipeline(TRANSFORMER_CONFIG, VAE_CONFIG, CLIP_CONFIG, T5_CONFIG, SCHEDULER_CONFIG,
                               seed=TINY_SEED)
    keep_the_picture(pipe)
    return pipe


# The VAE carries each colour c as the channels (c, -c) beside a constant pair (+B, -B): the mean of
# every GroupNorm (one group) is then exactly 0 and its deviation B/2 to within 1e-4 whatever the
# picture, so the norm is a fixed scale; SILU_OFFSET puts the SiLU after it where SiLU(y) = y to
# within 2e-4, and the next layer takes the offset off again.
VAE_CARRIER = 100.0
SILU_OFFSET = 12.0
# The transformer: d = latents - known latents, carried as KEEP_SIGNAL * d in 16 of its 32 channels,
# beside a gate pair +-(GATE_CLEAR + GATE_MASKED * mask). The final LayerNorm divides by the gate, so
# the velocity is about PULL_CLEAR * d where the mask is clear and PULL_CLEAR * GATE_CLEAR /
# (GATE_CLEAR + GATE_MASKED) * d where it is painted. Far from the known latents (the first steps of
# a short run) d itself outweighs the clear gate and the pull levels off, so 2 steps do not overshoot.
KEEP_SIGNAL, GATE_CLEAR, GATE_MASKED, PULL_CLEAR = 3.0, 6.0, 720.0, 6.0


def keep_the_picture(pipe) -> None:
    """Set the demo model's VAE to round-trip pixels and its transformer's outer layers to keep the
    known latents (the module's docstring says what each does)."""
    import torch

    with torch.no_grad():
        _round_trip_vae(pipe.vae)
        _keep_known_latents(pipe.transformer)


def _center_tap(conv, pairs: dict[int, tuple[int, float]], bias: dict[int, float] | None = None) -> None:
    """A 3x3 (or 1x1) conv that maps input channel i to output channel o times w, nothing else."""
    conv.weight.zero_()
    conv.bias.zero_()
    k = conv.weight.shape[-1] // 2
    for out, (inp, w) in pairs.items():
        conv.weight[out, inp, k, k] = w
    for out, b in (bias or {}).items():
        conv.bias[out] = b


def _identity_blocks(module) -> None:
    """Every resnet and attention inside ``module`` adds nothing to its residual."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, ResnetBlock2D):
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
            if block.conv_shortcut is not None:
                _center_tap(block.conv_shortcut, {c: (c, 1.0) for c in range(block.conv_shortcut.weight.shape[0])})
        elif isinstance(block, Attention):
            block.to_out[0].weight.zero_()
            block.to_out[0].bias.zero_()


def _carried(norm, act_offset: float) -> None:
    """GroupNorm whose output on the carried channels is the value itself plus ``act_offset``."""
    norm.weight.fill_(VAE_CARRIER / 2)
    norm.bias.fill_(act_offset)


def _round_trip_vae(vae) -> None:
    channels = 6  # r, g, b, -r, -g, -b; then +B, -B
    carried = {c: (c % 3, 1.0 if c < 3 else -1.0) for c in range(channels)}
    enc, dec = vae.encoder, vae.decoder
    _center_tap(enc.conv_in, carried, {6: VAE_CARRIER, 7: -VAE_CARRIER})
    _identity_blocks(enc)
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            # padding (0, 1, 0, 1), stride 2: the taps (0..1, 0..1) are the 2x2 patch: its mean.
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for c in range(8):
                down.conv.weight[c, c, :2, :2] = 0.25
    _carried(enc.conv_norm_out, SILU_OFFSET)
    latent = vae.config.latent_channels
    _center_tap(enc.conv_out, {c: (c, 1.0) for c in range(3)}, {c: -SILU_OFFSET for c in range(3)})
    enc.conv_out.bias[latent:] = -30.0  # the log-variance: a sample is the mean
    _center_tap(dec.conv_in, carried, {6: VAE_CARRIER, 7: -VAE_CARRIER})
    _identity_blocks(dec)
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            _center_tap(up.conv, {c: (c, 1.0) for c in range(8)})  # after a nearest 2x: tiles
    _carried(dec.conv_norm_out, SILU_OFFSET)
    _center_tap(dec.conv_out, {c: (c, 1.0) for c in range(3)}, {c: -SILU_OFFSET for c in range(3)})


def _keep_known_latents(transformer) -> None:
    packed = transformer.config.out_channels  # packed latent channels, 4 * LATENT_CHANNELS
    mask_channels = transformer.config.in_channels - 2 * packed
    x_in, proj, norm_out = transformer.x_embedder, transformer.proj_out, transformer.norm_out
    x_in.weight.zero_()
    x_in.bias.zero_()
    for j in range(packed):
        x_in.weight[j, j] = KEEP_SIGNAL  # the latents being denoised
        x_in.weight[j, packed + j] = -KEEP_SIGNAL  # minus the known latents
    gate = packed
    x_in.bias[gate], x_in.bias[gate + 1] = GATE_CLEAR, -GATE_CLEAR
    x_in.weight[gate, 2 * packed:] = GATE_MASKED / mask_channels
    x_in.weight[gate + 1, 2 * packed:] = -GATE_MASKED / mask_channels
    norm_out.linear.weight.zero_()
    norm_out.linear.bias.zero_()
    # LayerNorm's deviation over the 32 channels is about GATE_CLEAR / 4 where the mask is clear.
    width = x_in.weight.shape[0]
    gain = PULL_CLEAR * GATE_CLEAR * (width / 2) ** -0.5 / KEEP_SIGNAL
    proj.weight.zero_()
    proj.bias.zero_()
    for j in range(packed):
        proj.weight[j, j] = gain


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
