"""The engine on the tiny model: hosted semantics, determinism, seeds, masks, LoRA, cancel."""

import io

import numpy as np
import pytest
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.errors import Cancelled, InvalidInput
from inference.inputs import parse_input
from inference.lora import LoraSettings
from tests.helpers import box_mask, fast_input, noise_image
from inference.testing.lora_files import diffusers_lora, kohya_lora, xlabs_lora


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.data)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def picture():
    return noise_image(64, 64, seed=3), box_mask(64, 64, (16, 16, 48, 48))


def run(engine, img, mask=None, **kw):
    return engine.predict(parse_input(fast_input(img, mask, **kw)))


def test_output_names_sizes_and_formats(engine, picture):
    img, mask = picture
    for fmt, magic in (("png", b"\x89PNG"), ("jpg", b"\xff\xd8"), ("webp", b"RIFF")):
        outs = run(engine, img, mask, seed=1, num_outputs=2, output_format=fmt)
        assert [o.name for o in outs] == [f"out-0.{fmt}", f"out-1.{fmt}"]
        assert all(o.data.startswith(magic) and (o.width, o.height) == (64, 64) for o in outs)


def test_megapixels_sets_the_generated_size(engine):
    img = noise_image(96, 64)
    mask = box_mask(96, 64, (10, 10, 40, 40))
    out = run(engine, img, mask, seed=1, megapixels="0.25")[0]
    assert (out.width, out.height) == (608, 416)  # sqrt(262144 / 6144) scaling, floored to 32


def test_same_seed_same_output_and_logged(engine, picture):
    img, mask = picture
    lines = []
    a = engine.predict(parse_input(fast_input(img, mask, seed=42)), log=lines.append)[0]
    b = run(engine, img, mask, seed=42)[0]
    c = run(engine, img, mask, seed=43)[0]
    assert a.data == b.data
    assert a.data != c.data
    assert "Using seed: 42" in lines


def test_random_seed_is_logged_and_remakes_the_output(engine, picture):
    img, mask = picture
    lines = []
    first = engine.predict(parse_input(fast_input(img, mask)), log=lines.append)[0]
    seed = int(next(line for line in lines if line.startswith("Using seed: ")).split(": ")[1])
    assert run(engine, img, mask, seed=seed)[0].data == first.data


def test_output_i_is_seed_plus_i(tiny_model, picture):
    """Unbatched, a single run with seed + i re-makes output i bit for bit."""
    img, mask = picture
    engine = Engine(tiny_model, EngineSettings(max_batch=1))
    outputs = run(engine, img, mask, seed=100, num_outputs=4)
    for i, out in enumerate(outputs):
        assert run(engine, img, mask, seed=100 + i)[0].data == out.data, f"output {i} is not seed {100 + i}"
    assert len({o.data for o in outputs}) == 4


def test_batched_outputs_match_single_runs_to_rounding(engine, picture):
    """Batched, the same noise and conditioning give the same picture; only float rounding of the
    batched matrix products differs (at most one 8-bit level on a few pixels)."""
    img, mask = picture
    batch = run(engine, img, mask, seed=100, num_outputs=4)
    for i, out in enumerate(batch):
        diff = np.abs(pixels(run(engine, img, mask, seed=100 + i)[0]) - pixels(out))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    assert len({o.data for o in batch}) == 4


def test_alpha_channel_is_the_mask_when_none_is_given(engine):
    rgb = noise_image(64, 64, seed=5)
    rgba = rgb.convert("RGBA")
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (16, 16, 48, 48))  # transparent = repaint
    rgba.putalpha(alpha)
    from_alpha = engine.predict(parse_input({**fast_input(rgba, seed=9)}))[0]
    # The same picture with the transparent area flattened to black and an explicit mask.
    flat = Image.new("RGB", (64, 64))
    flat.paste(rgb, mask=alpha)
    explicit = run(engine, flat, box_mask(64, 64, (16, 16, 48, 48)), seed=9)[0]
    assert from_alpha.data == explicit.data


def test_no_mask_and_no_alpha_is_a_clear_error(engine):
    with pytest.raises(InvalidInput) as err:
        run(engine, noise_image(64, 64), None, seed=1)
    assert err.value.errors[0].field == "mask"


def test_mask_is_kept_soft(engine, picture):
    img, _ = picture
    half = box_mask(64, 64, (16, 16, 48, 48), value=128)
    full = box_mask(64, 64, (16, 16, 48, 48), value=255)
    # diffusers would binarise 128 to 1 and make these equal; the hosted model keeps it soft.
    assert run(engine, img, half, seed=2)[0].data != run(engine, img, full, seed=2)[0].data


def test_mask_of_another_size_is_resized(engine, picture):
    img, _ = picture
    out = run(engine, img, box_mask(32, 32, (8, 8, 24, 24)), seed=2)[0]
    assert (out.width, out.height) == (64, 64)


def test_progress_and_cancel_between_steps(engine, picture):
    img, mask = picture
    steps = []
    run_inp = parse_input(fast_input(img, mask, seed=1, num_inference_steps=5, num_outputs=2))
    engine.predict(run_inp, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(i, 5) for i in range(1, 6)]
    seen = []
    with pytest.raises(Cancelled):
        engine.predict(run_inp, on_step=lambda d, t: seen.append(d), cancelled=lambda: len(seen) >= 2)
    assert seen == [1, 2]


@pytest.mark.parametrize("make", [diffusers_lora, kohya_lora, xlabs_lora])
def test_lora_scale_zero_is_the_base_and_scale_changes_the_output(tiny_model, tmp_path, picture, make):
    img, mask = picture
    engine = Engine(tiny_model, EngineSettings(lora=LoraSettings(folder=tmp_path)))
    make(tiny_model.pipeline.transformer, tmp_path / "style.safetensors")
    try:
        base = run(engine, img, mask, seed=4)[0]
        zero = run(engine, img, mask, seed=4, lora_weights="style", lora_scale=0.0)[0]
        one = run(engine, img, mask, seed=4, lora_weights="style", lora_scale=1.0)[0]
        two = run(engine, img, mask, seed=4, lora_weights="style", lora_scale=2.0)[0]
        after = run(engine, img, mask, seed=4)[0]
        assert zero.data == base.data
        assert one.data != base.data and two.data != one.data
        assert after.data == base.data, "a prediction without LoRA must equal one made before any LoRA"
    finally:
        tiny_model.pipeline.unload_lora_weights()


def test_go_fast_multiplies_lora_scale():
    inp = parse_input({"prompt": "p", "image": "data:,", "lora_scale": 0.8, "go_fast": True})
    assert inp.effective_lora_scale() == pytest.approx(1.2)


def test_unknown_lora_is_a_clear_error(tiny_model, tmp_path, picture):
    img, mask = picture
    engine = Engine(tiny_model, EngineSettings(lora=LoraSettings(folder=tmp_path)))
    with pytest.raises(InvalidInput) as err:
        run(engine, img, mask, seed=1, lora_weights="nope")
    assert err.value.errors[0].field == "lora_weights"
    with pytest.raises(InvalidInput, match="https"):
        run(engine, img, mask, seed=1, lora_weights="http://example.com/x.safetensors")


def test_input_rules_name_the_field():
    with pytest.raises(InvalidInput) as err:
        parse_input({"image": "x", "num_outputs": 5, "guidance": -1, "output_format": "gif", "junk": 1})
    found = {(e.field, e.type) for e in err.value.errors}
    assert found == {("prompt", "required"), ("num_outputs", "maximum"), ("guidance", "minimum"),
                     ("output_format", "enum")}


def test_defaults_are_the_hosted_ones():
    inp = parse_input({"prompt": "p", "image": "data:,"})
    assert (inp.num_outputs, inp.num_inference_steps, inp.guidance, inp.megapixels, inp.output_format,
            inp.output_quality, inp.lora_scale, inp.disable_safety_checker, inp.go_fast) == (
        1, 28, 30, "1", "webp", 80, 1, False, False)
    assert not inp.preserve_unmasked and not inp.crop_to_mask and inp.outpaint == "None"


def test_long_prompt_is_truncated_and_said_in_the_logs(engine, picture):
    img, mask = picture
    lines = []
    outs = engine.predict(parse_input(fast_input(img, mask, seed=1, prompt="a red cat " * 400)), log=lines.append)
    assert len(outs) == 1
    assert any("only the first 512 are used" in line for line in lines)


@pytest.mark.parametrize("outputs", [1, 2])
def test_the_denoising_loop_is_diffusers_own(tiny_model, picture, outputs, monkeypatch):
    """Given the same conditioning, noise and prompt embeddings, our loop and FluxFillPipeline.__call__
    give the same latents, bit for bit (timesteps, shift, guidance and Euler steps are diffusers').
    (__call__ preprocesses ``image`` even when given ready-made ``masked_image_latents``, while its
    input check refuses the two together: the check is set aside here.)"""
    import torch

    from inference.engine import _Progress

    engine = Engine(tiny_model)
    img, mask = picture
    inp = parse_input(fast_input(img, mask, num_inference_steps=5, guidance=12.5))
    prompt_embeds, pooled = engine.encode_prompt(inp.prompt)
    condition = engine.masked_image_latents(img, mask, prompt_embeds.dtype)
    noise = engine.initial_noise(list(range(7, 7 + outputs)), 64, 64, prompt_embeds.dtype)
    ours = engine.denoising_loop(noise.clone(), condition, prompt_embeds, pooled, 64, 64, inp,
                                 _Progress(5, None, None))
    monkeypatch.setattr(engine.pipeline, "check_inputs", lambda *a, **k: None)
    theirs = engine.pipeline(
        image=img, prompt_embeds=prompt_embeds.expand(outputs, -1, -1), pooled_prompt_embeds=pooled.expand(outputs, -1),
        masked_image_latents=condition.expand(outputs, -1, -1), latents=noise.clone(), height=64, width=64,
        num_inference_steps=5, guidance_scale=12.5, output_type="latent",
    ).images
    assert torch.equal(ours, theirs)


def test_the_denoising_loop_asks_the_device_for_nothing(tiny_model, picture):
    """No host-device sync between the first step and the last (item(), nonzero(), bool() of a tensor
    and the like would each stall a GPU's queue); on the CPU the calls themselves are counted."""
    import collections

    from torch.overrides import TorchFunctionMode

    syncing = {"item", "tolist", "nonzero", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    class Spy(TorchFunctionMode):
        active = False
        calls: collections.Counter = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if self.active and getattr(func, "__name__", "") in syncing:
                self.calls[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    engine = Engine(tiny_model)
    spy = Spy()
    transformer = engine.pipeline.transformer
    handle = transformer.register_forward_pre_hook(lambda *_: setattr(spy, "active", True))
    loop = engine.denoising_loop

    def watched(*args, **kwargs):
        with spy:
            latents = loop(*args, **kwargs)
        spy.active = False
        return latents

    engine.denoising_loop = watched
    try:
        run(engine, *picture, num_inference_steps=4, seed=1)
    finally:
        handle.remove()
    assert spy.calls == collections.Counter(), spy.calls


def test_a_repeated_prompt_is_not_encoded_again(tiny_model, picture, monkeypatch):
    from inference import engine as engine_module

    engine = Engine(tiny_model)
    runs = {"t5": 0}
    handle = engine.pipeline.text_encoder_2.register_forward_pre_hook(lambda *_: runs.__setitem__("t5", runs["t5"] + 1))
    try:
        first = run(engine, *picture, seed=4, prompt="a blue door")
        assert runs["t5"] == 1
        again = run(engine, *picture, seed=4, prompt="a blue door")
        assert runs["t5"] == 1  # from the cache
        assert [o.data for o in again] == [o.data for o in first]
        run(engine, *picture, seed=4, prompt="a green door")
        assert runs["t5"] == 2
        monkeypatch.setattr(engine_module, "PROMPT_CACHE_SIZE", 2)
        for prompt in ("one", "two", "three"):
            run(engine, *picture, seed=4, prompt=prompt)
        assert list(engine._prompts) == ["two", "three"]  # the oldest went first
    finally:
        handle.remove()
    fresh = run(Engine(tiny_model), *picture, seed=4, prompt="a blue door")
    assert [o.data for o in fresh] == [o.data for o in first]
