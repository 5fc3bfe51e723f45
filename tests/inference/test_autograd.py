"""No autograd anywhere: every loading path leaves the models frozen, every stage runs under
``torch.inference_mode()``, and the server's memory stays flat over many distinct prompts.

With FLUX.1 Fill [dev]'s real T5-XXL, one cached embedding holding its graph keeps the activations of
24 layers alive: gigabytes a prompt. The tiny model's T5 is small, so the tests look at the tensors
themselves, and at the whole server's memory over many prompts."""

from __future__ import annotations

import httpx
import pytest
import torch

from inference.engine import Engine
from inference.inputs import parse_input
from inference.weights import load_model
from tests.helpers import box_mask, fast_input, noise_image

PROMPTS = 24


def trainable(pipe) -> list[str]:
    return [f"{component}.{name}" for component, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for name, p in module.named_parameters() if p.requires_grad]


def test_cached_prompt_embeddings_hold_no_graph(tiny_model):
    engine = Engine(tiny_model)
    img, mask = noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))
    for prompt in ("a red door", "a blue door"):
        engine.predict(parse_input(fast_input(img, mask, prompt=prompt, num_inference_steps=1)))
    assert len(engine._prompts) == 2
    for embeds, pooled in engine._prompts.values():
        for tensor in (embeds, pooled):
            assert tensor.grad_fn is None and not tensor.requires_grad
            assert torch.is_inference(tensor)  # made under inference_mode: no version counter, no graph


def test_a_diffusers_folder_loads_frozen(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu")
    assert trainable(model.pipeline) == []
    assert not any(m.training for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module))


def test_the_fp8_memory_mode_leaves_nothing_trainable(tiny_dir):
    from inference import accel

    model = load_model(str(tiny_dir), device="cpu")
    accel.apply(model, accel.AccelOptions(memory_mode="fp8", compile=False))
    assert trainable(model.pipeline) == []


def test_random_real_is_built_frozen():
    from inference.random_real import build_random_real_pipeline

    pipe = build_random_real_pipeline(device="meta")
    assert trainable(pipe) == []


def test_every_model_stage_runs_under_inference_mode(tiny_model, monkeypatch):
    """The text encoders, the transformer, the VAE: each forward call is made in inference mode."""
    engine = Engine(tiny_model)
    seen = {}
    pipe = engine.pipeline
    handles = [module.register_forward_pre_hook(lambda m, _a, name=name: seen.setdefault(name, set()).add(
        torch.is_inference_mode_enabled())) for name, module in
        (("clip", pipe.text_encoder), ("t5", pipe.text_encoder_2), ("transformer", pipe.transformer),
         ("vae_encoder", pipe.vae.encoder), ("vae_decoder", pipe.vae.decoder))]
    try:
        engine.predict(parse_input(fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)),
                                              prompt="a never seen prompt", num_inference_steps=1)))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {name: {True} for name in ("clip", "t5", "transformer", "vae_encoder", "vae_decoder")}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_the_servers_memory_stays_flat_over_many_distinct_prompts(server_factory):
    """After a warm-up, 24 predictions with 24 new prompts (each a long one, cached and then evicted
    from the 16-entry prompt cache) grow the server's resident memory by less than 40 MB."""
    server = server_factory()
    img, mask = noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))

    def predict(prompt: str):
        response = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions",
                              json={"input": fast_input(img, mask, prompt=prompt, num_inference_steps=1)},
                              headers={"Prefer": "wait=60"}, timeout=90)
        assert response.status_code == 201 and response.json()["status"] == "succeeded", response.text

    for i in range(6):
        predict(f"warm up {i} " + "a red cat on a sofa " * 40)
    before = rss_bytes(server.process.pid)
    for i in range(PROMPTS):
        predict(f"prompt number {i}: " + " ".join(["a blue dog in a green house"] * 30) + f" {i}")
    grown = rss_bytes(server.process.pid) - before
    assert grown < 40 * 1024**2, f"the server grew by {grown / 1024**2:.1f} MB over {PROMPTS} prompts"
