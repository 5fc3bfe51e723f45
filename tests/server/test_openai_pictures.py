"""The OpenAI adapter's pure parts, as tables: its options (sizes, qualities, defaults, errors) and
its pictures (OpenAI's mask turned into ours, canvases, outputs scaled to the exact size)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from inference.engine import Output
from inference.images import encode_image
from server.openai_api.pictures import edit_pictures, fit_outputs, generation_pictures
from server.openai_api.protocol import ImageOptions, OpenAIError, from_validation
from tests.helpers import noise_image, png_bytes

MAX_PIXELS = 10_000_000


def decoded(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


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
    ({"prompt": "x", "background": "transparent"}, "background", "invalid_value"),
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
    made = edit_pictures(png_bytes(noise_image(8, 4)), png_bytes(mask), None, MAX_PIXELS)
    ours = decoded(made.mask)
    assert ours[0, 0] == 255 and ours[0, 1] == 127 and ours[3, 7] == 0 and made.size == (8, 4)
    assert decoded(made.image).shape == (4, 8, 3)


def test_without_a_mask_the_alpha_or_else_everything():
    image = np.asarray(noise_image(8, 4, mode="RGBA")).copy()
    image[:, :4, 3] = 0
    ours = decoded(edit_pictures(png_bytes(Image.fromarray(image, "RGBA")), None, None, MAX_PIXELS).mask)
    assert (ours[:, :4] == 255).all() and (ours[:, 4:] == 0).all()
    for opaque in (noise_image(8, 4), noise_image(8, 4, mode="RGBA")):
        assert (decoded(edit_pictures(png_bytes(opaque), None, None, MAX_PIXELS).mask) == 255).all()


def test_a_size_scales_image_and_mask():
    made = edit_pictures(png_bytes(noise_image(64, 64)), None, (100, 30), MAX_PIXELS)
    assert made.size == (100, 30) and decoded(made.image).shape == (30, 100, 3) and decoded(made.mask).shape == (30, 100)


@pytest.mark.parametrize("mask, words", [(Image.new("RGBA", (9, 4)), "must match"), (noise_image(8, 4), "alpha channel"),
                                          (None, "not an image")])
def test_bad_masks_and_images(mask, words):
    image = b"no picture" if mask is None else png_bytes(noise_image(8, 4))
    with pytest.raises(OpenAIError) as err:
        edit_pictures(image, png_bytes(mask) if mask is not None else None, None, MAX_PIXELS)
    assert err.value.status == 400 and words in err.value.body.error.message


def test_a_generation_is_a_canvas_masked_whole():
    made = generation_pictures((48, 32))
    assert decoded(made.image).shape == (32, 48, 3) and (decoded(made.mask) == 255).all()


@pytest.mark.parametrize("fmt, engine_format, pil", [("png", "png", "PNG"), ("jpeg", "jpg", "JPEG"), ("webp", "webp", "WEBP")])
def test_outputs_are_fitted_to_the_exact_size_in_their_format(fmt, engine_format, pil):
    data = encode_image(noise_image(64, 32), engine_format, 90)
    out = Output(name=f"out-0.{engine_format}", data=data, content_type="image/x", seed=1, width=64, height=32)
    [fitted] = fit_outputs([out], {"size": [100, 50], "output_format": fmt, "output_compression": 80})
    img = Image.open(io.BytesIO(fitted.data))
    assert img.size == (100, 50) and img.format == pil and (fitted.width, fitted.height, fitted.name) == (100, 50, out.name)
    assert fit_outputs([out], {"size": [64, 32], "output_format": fmt})[0] is out  # already the size: untouched
    assert fit_outputs([out], None)[0] is out  # not an OpenAI prediction
