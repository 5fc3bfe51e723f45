"""``--weights random-real``: FLUX.1 Fill [dev]'s real architecture with random weights, built in memory.

For measuring speed and memory without the 34 GB download: a step costs the same whatever the
weights' values. Nothing is saved (saving ~34 GB in bf16 takes minutes of disk time); the pipeline is
built straight on the device, each model made in bf16 directly (no float32 copy). The outputs are noise.

Sizes are the real model's: the transformer (19 double + 38 single blocks, 24 heads x 128, 384
input and 64 output channels, guidance embedding, RoPE axes 16/56/56: 11.9 B parameters, 23.8 GB in
bf16), the 16-channel Flux VAE, CLIP-L, and a T5 encoder of T5-XXL's size (4.7 B parameters,
9.5 GB) so that peak-memory figures match the real model's. The tokenizers are the demo model's
small ones: their ids are valid for the big vocabularies, and the prompt is padded to 512 tokens
either way.
"""

from __future__ import annotations

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_gated_act=True,
                     dense_act_fn="gelu_new", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)


def build_random_real_pipeline(device: str = "cuda", dtype=None, seed: int = 0):
    """The FluxFillPipeline at full size, random weights, built directly on ``device`` in ``dtype``
    (bf16 by default), so the peak is the models themselves: about 34 GB, never a float32 copy."""
    import torch

    from .tiny import build_fill_pipeline

    pipe = build_fill_pipeline(TRANSFORMER_CONFIG, VAE_CONFIG, CLIP_CONFIG, T5_XXL_CONFIG, SCHEDULER_CONFIG,
                               seed=seed, device=device, dtype=dtype or torch.bfloat16)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return pipe


def transformer_parameter_count() -> int:
    """The transformer's size, counted on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    return sum(p.numel() for p in model.parameters())
