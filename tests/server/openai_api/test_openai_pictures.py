"""The OpenAI adapter's pure parts, as tables: its options (sizes, qualities, defaults, errors) and
its pictures (checked from their headers; OpenAI's mask turned into ours, canvases, outputs scaled
to the exact size, on the worker) and its usage."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.engine import Output
from inference.images import encode_image
from server.adapters import fit_outputs
from server.openai_api.pictures import canvas, check_edit, edit_pictures
from server.openai_api.protocol import ImageOptions, OpenAIError, from_validation
from server.openai_api.worker_side import image_tokens, usage_of
from server.protocol import Status
from server.records import PredictionRecord
from tests.helpers import noise_image, png_bytes
from bench.large_pngs import flat_png

MAX_PIXELS = 10_000_000


def options(**fields) -> ImageOptions:
    return ImageOptions.model_validate({"prompt": "x", **fields})


@pytest.mark.parametrize("size, dimensions", [("auto", None), ("1024x768", (1024, 768)), ("16x4096", (16, 4096))])
def test_sizes(size, dimensions):
    assert options(size=size).dimensions == dimensions


@pytest.mark.parametrize("size", ["15x64", "64x4097", "1024", "1024x", "x768", "1024*768", " 64x64", "-64x64"])
def test_sizes_refused(size):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        options(size=size)
    error = from_validation(err.value)
    assert error.status == 400 and error.body.error.param == "size" and "WIDTHxHEIGHT" in error.body.error.message


@pytest.mark.parametrize("quality, steps", [("low", 12), ("medium", 20), ("high", 28), ("auto", 28), ("standard", 28),
                                            ("hd", 28), ("xhigh", 36), ("max", 50)])
def test_quality_is_steps(quality, steps):
    assert options(quality=quality).steps == steps


def test_form_strings_and_nulls_read_as_the_clients_mean_them():
    read = ImageOptions.model_validate({"prompt": "x", "n": "3", "stream": "true", "partial_images": "2",
                                        "output_compression": "55", "size": None, "model": None, "quality": None,
                                        "moderation": "low", "style": "vivid"})
    assert (read.n, read.stream, read.partial_images, read.output_compression) == (3, True, 2, 55)
    assert (read.size, read.model, read.quality, read.response_format, read.output_format) == \
        ("auto", None, "auto", "b64_json", "png")


@pytest.mark.parametrize("model, sent, answered", [
    (None, None, "b64_json"), ("gpt-image-1", None, "b64_json"), ("flux-fill-dev", "", "b64_json"),
    ("dall-e-2", None, "url"), ("dall-e-3", "", "url"), ("dall-e-2", "b64_json", "b64_json"),
    ("gpt-image-1", "url", "url"),
])
def test_the_response_format_defaults_as_openais_does_for_each_model(model, sent, answered):
    """OpenAI answers the DALL·E models with URLs unless asked otherwise, the others in base64."""
    assert ImageOptions.model_validate({"prompt": "x", "model": model, "response_format": sent}).response_format \
        == answered


@pytest.mark.parametrize("fields, param, code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, "n", "invalid_value"),
    ({"prompt": "x", "partial_images": 4}, "partial_images", "invalid_value"),
    ({"prompt": "x", "background": "clear"}, "background", "invalid_value"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "invalid_value"),
])
def test_errors_name_their_parameter(fields, param, code):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        ImageOptions.model_validate(fields)
    error = from_validation(err.value).body.error
    assert (error.param, error.code, error.type) == (param, code, "invalid_request_error")


def test_the_mask_is_opposite_and_kept_soft():
    mask = Image.new("RGBA", (8, 4), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))  # transparent: edited
    mask.putpixel((1, 0), (255, 255, 255, 128))  # half
    image, ours = edit_pictures(png_bytes(noise_image(8, 4)), png_bytes(mask), (8, 4), MAX_PIXELS)
    ours = np.asarray(ours)
    assert ours[0, 0] == 255 and ours[0, 1] == 127 and ours[3, 7] == 0
    assert image.mode == "RGB" and image.size == (8, 4)


def test_without_a_mask_the_alpha_or_else_everything():
    image = np.asarray(noise_image(8, 4, mode="RGBA")).copy()
    image[:, :4, 3] = 0
    _, ours = edit_pictures(png_bytes(Image.fromarray(image, "RGBA")), None, (8, 4), MAX_PIXELS)
    ours = np.asarray(ours)
    assert (ours[:, :4] == 255).all() and (ours[:, 4:] == 0).all()
    for opaque in (noise_image(8, 4), noise_image(8, 4, mode="RGBA")):
        assert (np.asarray(edit_pictures(png_bytes(opaque), None, (8, 4), MAX_PIXELS)[1]) == 255).all()


def test_a_size_scales_image_and_mask():
    image, ours = edit_pictures(png_bytes(noise_image(64, 64)), None, (100, 30), MAX_PIXELS)
    assert image.size == ours.size == (100, 30)


@pytest.mark.parametrize("mask, words, param", [
    (Image.new("RGBA", (9, 4)), "must match", "mask"),
    (noise_image(8, 4), "alpha channel", "mask"),
    (None, "not an image", "image"),
])
def test_bad_masks_and_images_are_told_from_their_headers(mask, words, param):
    image = b"no picture" if mask is None else png_bytes(noise_image(8, 4))
    with pytest.raises(OpenAIError) as err:
        check_edit(image, png_bytes(mask) if mask is not None else None, MAX_PIXELS)
    assert err.value.status == 400 and words in err.value.body.error.message and err.value.body.error.param == param


def test_a_picture_over_the_pixel_limit_is_refused_from_its_header():
    """A 10000 x 10000 PNG of a few hundred KB: its header says 100 MP, and nothing is decoded."""
    big = flat_png(10000, 10000)
    assert len(big) < 1_000_000
    assert check_edit(big, None, 100_000_000)[0].size == (10000, 10000)
    with pytest.raises(OpenAIError) as err:
        check_edit(big, None, 50_000_000)
    assert err.value.body.error.param == "image" and "10000x10000, more than the 50 megapixel limit" in \
        err.value.body.error.message


def test_a_generation_is_a_canvas_masked_whole():
    image, mask = canvas((48, 32))
    assert image.size == (48, 32) and (np.asarray(mask) == 255).all()


@pytest.mark.parametrize("engine_format, pil", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_outputs_are_fitted_to_the_exact_size_in_their_format(engine_format, pil):
    data = encode_image(noise_image(64, 32), engine_format, 90)
    out = Output(name=f"out-0.{engine_format}", data=data, content_type="image/x", seed=1, width=64, height=32)
    [fitted] = fit_outputs([out], (100, 50), engine_format, 80)
    img = Image.open(io.BytesIO(fitted.data))
    assert img.size == (100, 50) and img.format == pil and (fitted.width, fitted.height, fitted.name) == (100, 50, out.name)
    assert fit_outputs([out], (64, 32), engine_format, 80)[0] is out  # already the size: untouched


@pytest.mark.parametrize("width, height, tokens", [(1024, 1024, 4096), (64, 64, 16), (96, 64, 24), (1440, 800, 4500)])
def test_an_image_is_a_token_per_16_by_16_pixels(width, height, tokens):
    assert image_tokens(width, height) == tokens


def test_usage_counts_the_input_once_and_every_image_made():
    def record(usage: dict) -> PredictionRecord:
        return PredictionRecord(id="p", status=Status.SUCCEEDED, version="hidden", input={}, created_at=0.0,
                                output_token="t", api="openai", api_data={"usage": usage})

    first = {"text_tokens": 7, "image_tokens": 16, "tokens_per_output": 16, "output_tokens": 64}
    second = {"text_tokens": 7, "image_tokens": 16, "tokens_per_output": 16, "output_tokens": 32}
    usage = usage_of([record(first), record(second)])
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (23, 96, 119)
    assert usage.input_tokens_details.text_tokens == 7 and usage.input_tokens_details.image_tokens == 16
    assert usage.output_tokens_details.image_tokens == 96
    assert usage_of([record({})]).total_tokens == 0  # a prediction that never ran counts nothing


def openai_record(endpoint: str, size: tuple[int, int]) -> PredictionRecord:
    return PredictionRecord(id="p", status=Status.PROCESSING, version="hidden", input={}, created_at=0.0,
                            output_token="t", api="openai",
                            api_data={"endpoint": endpoint, "size": list(size), "model": "gpt-image-2"})


def test_the_worker_makes_the_engines_image_and_mask_from_the_pictures_as_sent():
    """On the worker: OpenAI's mask (transparent is edited) becomes ours (white), both scaled to the
    request's size, and handed to the engine as files; the outputs are fitted to that size."""
    from server.openai_api.worker_side import PREPARED_IMAGE, PREPARED_MASK, OpenAIWorkerSide

    sent_image, sent_mask = png_bytes(noise_image(64, 32)), png_bytes(Image.new("RGBA", (64, 32), (0, 0, 0, 255)))
    mask = Image.open(io.BytesIO(sent_mask))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 32))  # the left half is edited
    sent_mask = png_bytes(mask)
    sent = {"prompt": "x", "image": "data:image/png;base64,IMG", "openai_mask": "data:image/png;base64,MASK",
            "num_outputs": 2, "output_format": "jpg", "output_quality": 70}
    files = {"data:image/png;base64,IMG": sent_image, "data:image/png;base64,MASK": sent_mask}
    said: list[str] = []
    job = OpenAIWorkerSide(MAX_PIXELS).prepare(openai_record("edits", (128, 64)), sent,
                                               lambda value, field: files[value], said.append)
    assert job.input["image"] == PREPARED_IMAGE and job.input["mask"] == PREPARED_MASK
    assert "openai_mask" not in job.input and job.input["num_outputs"] == 2
    ours = np.asarray(Image.open(io.BytesIO(job.files[PREPARED_MASK])))
    assert ours.shape == (64, 128) and (ours[:, :60] == 255).all() and (ours[:, 68:] == 0).all()
    assert Image.open(io.BytesIO(job.files[PREPARED_IMAGE])).size == (128, 64)
    assert "model 'gpt-image-2', run by FLUX.1 Fill [dev]" in said[0]
    made = Output(name="out-0.jpg", data=encode_image(noise_image(128, 64), "jpg", 90), content_type="image/jpeg",
                  seed=1, width=128, height=64, prompt_tokens=5)
    assert job.facts_of([made]) == {"usage": {"text_tokens": 5, "image_tokens": 32, "tokens_per_output": 32,
                                              "output_tokens": 64}}
    assert job.finished([made])[0] is made  # already the size


def test_the_worker_makes_a_generations_canvas():
    from server.openai_api.worker_side import PREPARED_MASK, OpenAIWorkerSide

    job = OpenAIWorkerSide(MAX_PIXELS).prepare(openai_record("generations", (48, 40)), {"prompt": "x"},
                                               lambda value, field: pytest.fail("nothing to read"), lambda _: None)
    assert (np.asarray(Image.open(io.BytesIO(job.files[PREPARED_MASK]))) == 255).all()
    made = Output(name="out-0.png", data=encode_image(noise_image(32, 32), "png", 100), content_type="image/png",
                  seed=1, width=32, height=32, prompt_tokens=3)
    assert job.facts_of([made])["usage"]["image_tokens"] == 0  # a generation has no input image
    assert Image.open(io.BytesIO(job.finished([made])[0].data)).size == (48, 40)


def test_a_phones_mpo_is_kept_as_the_jpeg_it_is():
    """The JPEG reader opens a phone's MPO (several JPEGs in one file): its header says MPO, its
    data: URI says image/jpeg."""
    buf = io.BytesIO()
    noise_image(16, 8).save(buf, "MPO", save_all=True, append_images=[noise_image(16, 8, seed=1)])
    image, _ = check_edit(buf.getvalue(), None, MAX_PIXELS)
    assert (image.format, image.content_type, image.size) == ("MPO", "image/jpeg", (16, 8))
