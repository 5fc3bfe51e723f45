"""What the engine gives back, and when it gives nothing: flagged outputs keep their place, a mask is
resized once, RGBA images keep their colours, a broken checkpoint never returns a black image as a
success, and a prompt of megabytes costs what one of 16 K characters does."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from inference import engine as engine_module
from inference.engine import Engine
from inference.errors import Cancelled, NonFiniteOutput
from inference.inputs import parse_input
from inference.weights import load_model
from tests.helpers import box_mask, fast_input, noise_image


def run(engine, img, mask=None, log=None, **kw):
    return engine.predict(parse_input(fast_input(img, mask, **kw)), log=log)


def test_a_flagged_output_leaves_a_gap_and_the_others_keep_their_seed(tmp_path, tiny_dir):
    from tests.inference.test_safety import add_safety_checker

    folder = tmp_path / "weights"
    shutil.copytree(tiny_dir, folder)
    add_safety_checker(folder, flag_everything=False)
    model = load_model(str(folder), device="cpu")
    checker = model.safety_checker

    def flag_the_first(images, clip_input):  # the real checker's answer, with output 0 flagged
        images, flagged = checker(images=images, clip_input=clip_input)
        return images, [True] + list(flagged[1:])

    model.safety_checker = flag_the_first
    model.safety_checker.dtype = checker.dtype
    img, mask = noise_image(64, 64, seed=2), box_mask(64, 64, (8, 8, 40, 40))
    lines = []
    outputs = run(Engine(model), img, mask, seed=50, num_outputs=3, log=lines.append)
    assert [(o.name, o.seed) for o in outputs] == [("out-1.png", 51), ("out-2.png", 52)]
    unflagged = run(Engine(model), img, mask, seed=50, num_outputs=3, disable_safety_checker=True)
    assert outputs[0].data == unflagged[1].data  # out-1 is seed 51's image, as made in the same batch unchecked
    assert "The safety checker flagged output 0 (seed 50); it is left out of the results" in lines
    assert not any("black image" in line for line in lines)


def test_a_mask_of_another_size_is_resized_once(engine):
    """The hosted model resizes the mask straight to the generated size; resizing it to the image's size
    first, then again, moves its edges."""
    img = noise_image(96, 64, seed=1)
    small_mask = box_mask(48, 32, (5, 5, 30, 25))
    generated = (608, 416)  # 96x64 at megapixels "0.25"
    once = small_mask.resize(generated, Image.Resampling.LANCZOS)
    twice = small_mask.resize((96, 64), Image.Resampling.LANCZOS).resize(generated, Image.Resampling.LANCZOS)
    assert once.tobytes() != twice.tobytes()
    ours = run(engine, img, small_mask, seed=3, megapixels="0.25", num_inference_steps=1)[0]
    expected = run(engine, img, once, seed=3, megapixels="0.25", num_inference_steps=1)[0]
    assert ours.data == expected.data


def test_an_rgba_image_keeps_its_stored_colours(engine):
    """With a mask given, a transparent area outside it is the image's stored RGB, not black."""
    rgb = noise_image(64, 64, seed=5)
    rgba = rgb.convert("RGBA")
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (40, 40, 64, 64))  # transparent, and not repainted
    rgba.putalpha(alpha)
    mask = box_mask(64, 64, (4, 4, 30, 30))
    from_rgba = run(engine, rgba, mask, seed=9)[0]
    assert from_rgba.data == run(engine, rgb, mask, seed=9)[0].data
    flattened = Image.new("RGB", (64, 64))
    flattened.paste(rgb, mask=alpha)
    assert from_rgba.data != run(engine, flattened, mask, seed=9)[0].data


@pytest.mark.parametrize(("tensor", "stage"), [("transformer", "denoising"), ("vae", "decoding the latents")])
def test_a_checkpoint_that_makes_nan_fails_naming_the_stage(tmp_path, tiny_dir, tensor, stage):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    weights = next((folder / tensor).glob("*.safetensors"))
    state = load_file(str(weights))
    key = "proj_out.bias" if tensor == "transformer" else "decoder.conv_out.bias"
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(weights))
    engine = Engine(load_model(str(folder), device="cpu"))
    with pytest.raises(NonFiniteOutput) as err:
        run(engine, noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), seed=1)
    assert f"NaN or infinite values while {stage}" in str(err.value) and "no image was made" in str(err.value)


def test_a_nan_checkpoint_fails_the_prediction_through_the_server(tmp_path, tiny_dir, server_factory):
    import httpx

    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    weights = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(str(weights))
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], float("nan"))
    save_file(state, str(weights))
    server = server_factory("--weights", str(folder))
    body = {"input": fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), seed=1)}
    prediction = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions", json=body,
                            headers={"Prefer": "wait=30"}, timeout=60).json()
    assert prediction["status"] == "failed" and prediction["output"] is None
    assert "NaN or infinite values while denoising" in prediction["error"]


def test_a_huge_prompt_is_read_on_a_bounded_prefix(engine, monkeypatch):
    """Only the first PROMPT_CHARS characters reach the tokenizers, cut at a word boundary, and the
    result is what that prefix gives; the log says the prompt is longer than T5 reads."""
    words = " ".join(f"cat{i % 97}" for i in range(400_000))  # about 2.6 MB
    seen = []
    tokenizer = engine.pipeline.tokenizer_2
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: (
        seen.append(len(text) if isinstance(text, str) else max(map(len, text))), original(self, text, *a, **k))[1])
    lines = []
    img, mask = noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))
    huge = run(engine, img, mask, seed=2, prompt=words, log=lines.append)[0]
    assert seen and max(seen) <= engine_module.PROMPT_CHARS
    prefix, cut = engine_module.bounded_prompt(words)
    assert cut and len(prefix) <= engine_module.PROMPT_CHARS
    assert words.startswith(prefix) and words[len(prefix)] == " "  # no word split
    assert huge.data == run(engine, img, mask, seed=2, prompt=prefix)[0].data
    assert any("T5 tokens long; only the first 512 are used" in line and "more than" in line for line in lines)


def test_cancel_is_honoured_before_the_prompt_and_before_denoising(engine):
    img, mask = noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40))
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) >= 2  # after the inputs are read: before the prompt is encoded

    transformer_calls = []
    handle = engine.pipeline.transformer.register_forward_pre_hook(lambda *_: transformer_calls.append(1))
    try:
        with pytest.raises(Cancelled):
            engine.predict(parse_input(fast_input(img, mask, prompt="never encoded")), cancelled=cancelled)
    finally:
        handle.remove()
    assert transformer_calls == [] and "never encoded" not in engine._prompts

