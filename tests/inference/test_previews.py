"""Previews of the picture being denoised: the projection, the cadence, no host syncs, cancels."""

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import Engine
from inference.errors import Cancelled
from inference.inputs import parse_input
from inference.previews import (FLUX_LATENT_RGB_BIAS, FLUX_LATENT_RGB_FACTORS, MAX_PREVIEWS, Known, Preview,
                                Previews, project)
from tests.helpers import box_mask, fast_input, noise_image


@pytest.fixture(scope="module")
def picture():
    return noise_image(64, 64, seed=3), box_mask(64, 64, (16, 16, 48, 48))


def pack(latents):
    """diffusers' FluxPipeline._pack_latents: each 2x2 patch of every channel in one token."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def test_flux_projection_is_the_linear_map_of_the_x0_estimate_at_each_latent_pixel():
    gen = torch.Generator().manual_seed(0)
    unpacked = torch.randn(2, 16, 6, 8, generator=gen)
    velocity = torch.randn(2, 16, 6, 8, generator=gen)
    sigma = 0.4
    rgb = project(pack(unpacked), pack(velocity), torch.tensor(sigma), 6, 8)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == torch.uint8
    x0 = unpacked[0] - sigma * velocity[0]  # the first picture of the batch
    factors, bias = torch.tensor(FLUX_LATENT_RGB_FACTORS), torch.tensor(FLUX_LATENT_RGB_BIAS)
    for y, x in ((0, 0), (1, 0), (0, 1), (5, 7), (3, 4)):
        expected = ((x0[:, y, x] @ factors + bias + 1) / 2).clamp(0, 1) * 255
        assert torch.allclose(rgb[y, x].float(), expected.round(), atol=1), (y, x)


def test_flux_projection_of_a_zero_latent_is_the_bias_colour():
    zeros = torch.zeros(1, 4, 64)
    rgb = project(zeros, zeros, 1.0, 4, 4)
    expected = [round((b + 1) / 2 * 255) for b in FLUX_LATENT_RGB_BIAS]
    assert rgb.reshape(-1, 3).tolist() == [expected] * 16


def test_other_latent_spaces_show_their_first_three_channels_stretched():
    unpacked = torch.zeros(1, 4, 4, 4)
    unpacked[0, 0] = torch.arange(16.0).view(4, 4)  # red ramps along the rows
    unpacked[0, 1, 2:, :] = 5.0  # green in the lower half
    unpacked[0, 3] = 100.0  # a fourth channel is not shown
    rgb = project(pack(unpacked), torch.zeros(1, 4, 16), 0.0, 4, 4)
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[3, 3].tolist() == [255, 255, 0]
    assert rgb[1, 2, 0].item() == round(6 / 15 * 255)


def test_a_preview_is_scaled_up_to_the_picture_and_keeps_the_known_pixels():
    rgb = torch.full((4, 4, 3), 200, dtype=torch.uint8)
    known = Image.new("RGB", (32, 32), (10, 20, 30))
    mask = box_mask(32, 32, (0, 0, 16, 32))  # the left half is repainted
    image = Preview(rgb, None, 3, 10, (32, 32), Known(known, mask)).image()
    assert image.size == (32, 32)
    assert image.getpixel((4, 10)) == (200, 200, 200)
    assert image.getpixel((28, 10)) == (10, 20, 30)


def test_cadence_spreads_at_most_eight_and_never_at_the_last_step():
    asked = []
    previews = Previews(lambda p: None, lambda: asked.append(1) or True, total=50)
    due = [done for done in range(1, 51) if previews.due(done) and not setattr(previews, "sent", previews.sent + 1)]
    assert len(due) == MAX_PREVIEWS and 50 not in due
    assert due == sorted(due) and due[-1] - due[0] >= 30  # spread over the run, not bunched at its start
    assert len(asked) == MAX_PREVIEWS  # the consumer is asked at candidate steps only
    few = Previews(lambda p: None, None, total=4)
    assert [d for d in range(1, 5) if few.due(d)] == [1, 2, 3]
    never = Previews(lambda p: None, lambda: False, total=20)
    assert not any(never.due(d) for d in range(1, 21))


def test_the_engine_hands_previews_of_the_forming_picture(engine, picture):
    img, mask = picture
    got = []
    outputs = engine.predict(parse_input(fast_input(img, mask, seed=5, num_inference_steps=12)),
                             on_preview=got.append, preview_wanted=lambda: True)
    assert 1 <= len(got) <= MAX_PREVIEWS
    assert [p.step for p in got] == sorted(p.step for p in got) and all(p.total == 12 for p in got)
    assert max(p.step for p in got) < 12
    first = got[0].image()
    assert first.size == (64, 64) and first.mode == "RGB"
    # Outside the (box) mask the preview is the input itself.
    assert np.array_equal(np.asarray(first)[:8, :8], np.asarray(img.convert("RGB"))[:8, :8])
    inside = np.asarray(first)[20:44, 20:44].astype(int)
    assert inside.std() > 0  # the forming picture, not a flat fill
    # Previews change nothing in the outputs.
    again = engine.predict(parse_input(fast_input(img, mask, seed=5, num_inference_steps=12)))
    assert [o.data for o in outputs] == [o.data for o in again]


def test_no_previews_unless_wanted(engine, picture):
    img, mask = picture
    got = []
    engine.predict(parse_input(fast_input(img, mask, seed=5, num_inference_steps=6)),
                   on_preview=got.append, preview_wanted=lambda: False)
    assert got == []


def test_crop_to_mask_previews_are_counted_over_the_whole_prediction(engine):
    img = noise_image(128, 64, seed=2)
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (4, 4, 20, 20))
    mask.paste(255, (100, 40, 120, 60))
    got = []
    engine.predict(parse_input(fast_input(img, mask, seed=1, num_inference_steps=8, crop_to_mask=True,
                                          num_outputs=2)),
                   on_preview=got.append, preview_wanted=lambda: True)
    assert 1 <= len(got) <= MAX_PREVIEWS
    assert {p.total for p in got} == {got[0].total} and got[0].total % 8 == 0  # 8 steps per region
    assert all(p.image() for p in got)


def _count_syncs(engine, **predict_kwargs):
    from torch.overrides import TorchFunctionMode

    syncing = {"item", "tolist", "nonzero", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    class Spy(TorchFunctionMode):
        active = False
        calls: collections.Counter = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if self.active and getattr(func, "__name__", "") in syncing:
                self.calls[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    spy = Spy()
    handle = engine.pipeline.transformer.register_forward_pre_hook(lambda *_: setattr(spy, "active", True))
    loop = engine.denoising_loop

    def watched(*args, **kwargs):
        with spy:
            latents = loop(*args, **kwargs)
        spy.active = False
        return latents

    engine.denoising_loop = watched
    try:
        engine.predict(**predict_kwargs)
    finally:
        handle.remove()
        del engine.denoising_loop
    return spy.calls


@pytest.mark.parametrize("previews", [False, True])
def test_the_loop_asks_the_device_for_nothing_with_previews_on_or_off(tiny_model, picture, previews):
    """Previews off: the loop is as without them. On: the projection is queued and its copy is
    asynchronous; the picture is made by whoever calls Preview.image(), outside the loop."""
    img, mask = picture
    got = []
    kwargs = dict(on_preview=got.append, preview_wanted=lambda: True) if previews else {}
    calls = _count_syncs(Engine(tiny_model), inp=parse_input(fast_input(img, mask, seed=1, num_inference_steps=6)),
                         **kwargs)
    assert calls == collections.Counter(), calls
    assert bool(got) == previews
    assert all(p.image().size == (64, 64) for p in got)


def test_a_cancel_still_stops_a_prediction_that_sends_previews(engine, picture):
    img, mask = picture
    got, steps = [], []

    def cancelled():
        return len(steps) >= 3

    with pytest.raises(Cancelled):
        engine.predict(parse_input(fast_input(img, mask, seed=1, num_inference_steps=20)),
                       on_step=lambda done, total: steps.append(done), cancelled=cancelled,
                       on_preview=got.append, preview_wanted=lambda: True)
    assert len(steps) == 3
    assert all(p.step <= 3 for p in got)
