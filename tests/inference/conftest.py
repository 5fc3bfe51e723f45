"""Fixtures for the engine's tests at FLUX.1's real width, where diffusers' converters need it."""

from __future__ import annotations

import shutil

import pytest

# FLUX.1's real width (24 heads of 128) with one block of each kind, and the tiny model's components
# (VAE latents of 4 channels, text encoders of 32), so a pipeline of it runs on a CPU.
REAL_WIDTH_CONFIG = dict(patch_size=1, in_channels=288, out_channels=16, num_layers=1, num_single_layers=1,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def random_transformer(config: dict, seed: int = 0):
    """A FluxTransformer2DModel with random weights, frozen; made on the meta device and filled in,
    which is several times faster than the default initialisation at this size."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.uniform_(0.5, 1.5, generator=gen)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def real_width_transformer():
    return random_transformer(REAL_WIDTH_CONFIG)


@pytest.fixture(scope="session")
def components(tiny_dir, tmp_path_factory):
    """The tiny model's VAE, text encoders, tokenizers and scheduler, without a transformer (as users
    lay out components beside a single-file checkpoint)."""
    folder = tmp_path_factory.mktemp("components") / "components"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "transformer")
    return folder


def transformer_inputs(config: dict, tokens: int = 16, text: int = 8, seed: int = 1):
    """Fixed inputs for one transformer call."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(tokens, 3, generator=gen),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )


def forward(transformer, inputs):
    import torch

    with torch.inference_mode():
        return transformer(**inputs)[0]
