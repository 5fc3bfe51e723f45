"""OpenAI's image API, driven by the official `openai` Python client against a live server: edits
(with a mask, with the image's own alpha, with several images), n over four, exact sizes, URLs and
base64, errors in OpenAI's shape, model names, streaming, and the predictions it makes (listed,
cancelled when the client goes away)."""

from __future__ import annotations

import base64
import io
import socket
import time
import typing

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageModel
from PIL import Image

from tests.conftest import TOKEN
from tests.helpers import noise_image, png_bytes


def rgba_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """OpenAI's mask: opaque everywhere but the box, which is transparent (edited)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    from tests.helpers import LiveServer

    live = LiveServer(tmp_path_factory.mktemp("openai") / "data",
                      args=["--weights", str(tiny_dir), "--api-token", TOKEN,
                                "--preview-interval-s", "0.02"]).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def input_bytes(value: str) -> bytes:
    """A prediction's picture input as listed: a data: URI, or the URL of a long one."""
    return base64.b64decode(value.split(",", 1)[1]) if value.startswith("data:") else httpx.get(value).content


def openai_predictions(server) -> list:
    response = httpx.get(f"{server.url}/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"})
    return response.json()["results"]


def newest_once_canceled(server, timeout: float = 30) -> dict:
    """The newest prediction, once it is canceled (or as it is when the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        made = openai_predictions(server)[0]
        if made["status"] == "canceled" or time.monotonic() > deadline:
            return made
        time.sleep(0.2)


def test_edit_with_a_mask_changes_only_what_it_marks_transparent(client, server):
    image = noise_image(64, 64, seed=3)
    mask = png_bytes(rgba_mask(64, 64, (16, 16, 48, 48)))
    result = client.images.edit(model="gpt-image-2", image=("photo.png", png_bytes(image), "image/png"),
                                mask=("mask.png", mask, "image/png"), prompt="a red door", quality="low",
                                size="64x64")
    assert result.created > 0 and len(result.data) == 1 and result.data[0].url is None
    out = picture(result.data[0].b64_json)
    assert out.format == "PNG" and out.size == (64, 64)
    assert result.size == "64x64" and result.output_format == "png" and result.quality == "low"
    # The prediction behind it keeps the pictures as sent (the worker made our mask of OpenAI's);
    # quality low is 12 steps; its logs and the server's say what ran.
    made = openai_predictions(server)[0]
    assert made["status"] == "succeeded" and made["input"]["num_inference_steps"] == 12
    assert input_bytes(made["input"]["image"]) == png_bytes(image)
    assert input_bytes(made["input"]["openai_mask"]) == mask and "mask" not in made["input"]
    assert "model 'gpt-image-2', run by FLUX.1 Fill [dev]" in made["logs"]
    assert f"model 'gpt-image-2', 1 image(s) at 64x64: run by FLUX.1 Fill [dev] as prediction(s) {made['id']}" \
        in server.log()
    # Usage as OpenAI counts it for image models: the prompt's tokens and the image's in, one image out.
    assert result.usage.input_tokens_details.image_tokens == 16 and result.usage.output_tokens == 16
    assert result.usage.input_tokens_details.text_tokens > 0
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens > 32
    assert result._request_id == made["id"]


def test_without_a_mask_the_images_transparent_pixels_are_edited(client, server):
    image = noise_image(64, 64, seed=4, mode="RGBA")
    arr = np.asarray(image).copy()
    arr[:32, :, 3] = 0  # the top half is transparent
    sent = png_bytes(Image.fromarray(arr, "RGBA"))
    result = client.images.edit(image=("photo.png", sent, "image/png"), prompt="sky")
    out = picture(result.data[0].b64_json)
    assert out.size == (64, 64)  # size auto: the input's size
    made = openai_predictions(server)[0]
    assert input_bytes(made["input"]["image"]) == sent and "openai_mask" not in made["input"]
    assert made["input"]["num_inference_steps"] == 28  # quality auto


def test_of_several_images_the_first_is_edited(client, server):
    first, second = noise_image(64, 48, seed=5), noise_image(32, 32, seed=6)
    result = client.images.edit(image=[("a.png", png_bytes(first), "image/png"), ("b.png", png_bytes(second), "image/png")],
                                prompt="x", quality="low")
    assert picture(result.data[0].b64_json).size == (64, 48)


def test_more_than_four_images_run_as_several_predictions_of_consecutive_seeds(client, server):
    before = {p["id"] for p in openai_predictions(server)}
    result = client.images.generate(model="dall-e-2", prompt="a lighthouse", n=6, size="64x64", quality="low",
                                    response_format="b64_json",  # DALL·E's default is url
                                    output_format="webp")
    assert len(result.data) == 6
    assert all(picture(d.b64_json).format == "WEBP" for d in result.data)
    made = sorted((p for p in openai_predictions(server) if p["id"] not in before), key=lambda p: p["input"]["seed"])
    assert [p["input"]["num_outputs"] for p in made] == [4, 2]
    assert made[1]["input"]["seed"] == made[0]["input"]["seed"] + 4
    # The sixth image is the second prediction's second: made from seed + 5, as one run re-makes it.
    assert len({d.b64_json for d in result.data}) == 6


@pytest.mark.parametrize("size", ["100x60", "48x96"])
def test_a_size_is_the_outputs_exact_size(client, size):
    result = client.images.edit(image=("p.png", png_bytes(noise_image(64, 64, seed=7)), "image/png"), prompt="x",
                                size=size, quality="low", output_format="jpeg", output_compression=70)
    out = picture(result.data[0].b64_json)
    assert out.format == "JPEG" and "x".join(map(str, out.size)) == size and result.size == size


def test_url_results_are_served_by_this_server(client, server):
    result = client.images.generate(prompt="x", size="64x64", quality="low", response_format="url", n=2)
    assert [d.b64_json for d in result.data] == [None, None]
    for item in result.data:
        assert item.url.startswith(f"{server.url}/outputs/")
        got = httpx.get(item.url)  # no token: an unguessable URL
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)


def test_a_generation_sends_no_picture(client, server):
    """The canvas is made by the worker: the prediction's input has the prompt and no image."""
    result = client.images.generate(model="chatgpt-image-latest", prompt="a cat", size="96x64", quality="low")
    assert picture(result.data[0].b64_json).size == (96, 64)
    made = openai_predictions(server)[0]
    assert made["status"] == "succeeded" and "image" not in made["input"] and made["input"]["prompt"] == "a cat"
    assert "OpenAI image generation for model 'chatgpt-image-latest'" in made["logs"]
    assert result.usage.input_tokens_details.image_tokens == 0 and result.usage.output_tokens == 24
    assert result.usage.input_tokens == result.usage.input_tokens_details.text_tokens > 0


def test_errors_have_openais_shape_and_status(client, server):
    image = ("p.png", png_bytes(noise_image(64, 64, seed=8)), "image/png")
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=image, prompt="x", n=11)
    assert err.value.param == "n" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=image, prompt="x", size="12x5000")
    assert err.value.param == "size" and "WIDTHxHEIGHT" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("p.png", b"not a picture", "image/png"), prompt="x")
    assert err.value.param == "image"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=image, mask=("m.png", png_bytes(rgba_mask(32, 32, (0, 0, 8, 8))), "image/png"),
                           prompt="x")
    assert err.value.param == "mask" and "must match" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=image, mask=("m.png", png_bytes(noise_image(64, 64)), "image/png"), prompt="x")
    assert err.value.param == "mask" and "alpha" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", response_format="gif")
    assert err.value.param == "response_format"
    raw = httpx.post(f"{server.url}/v1/images/generations", headers={"Authorization": f"Bearer {TOKEN}"},
                     json={"size": "64x64"})
    assert raw.status_code == 400
    assert raw.json() == {"error": {"message": "Missing required parameter: 'prompt'.", "type": "invalid_request_error",
                                    "param": "prompt", "code": "missing_required_parameter"}}


def test_every_image_model_name_of_the_sdk_is_accepted_by_default(client, server):
    """The names of the installed SDK's ImageModel (today's and the retired ones), and ours."""
    names = typing.get_args(ImageModel)
    assert {"gpt-image-2", "chatgpt-image-latest", "gpt-image-2.5-flare", "dall-e-3"} <= set(names)
    listed = [m.id for m in client.models.list()]
    assert set(names) | {"flux-fill-dev"} == set(listed)
    # (gpt-image-2 and chatgpt-image-latest run in the tests above.)
    for name in ("gpt-image-2.5-sunburst", "dall-e-2", "gpt-image-9-later"):  # and a later name of the family
        assert client.images.generate(model=name, prompt="x", size="32x32", quality="low",
                                      response_format="b64_json").usage.total_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="stable-diffusion", prompt="x", size="32x32", quality="low")
    assert err.value.param == "model" and err.value.code == "invalid_value" and "'gpt-image-*'" in err.value.message


def test_the_operator_can_restrict_the_names(server_factory):
    mine = server_factory("--openai-models", "my-flux,gpt-image-2")
    own = openai.OpenAI(base_url=f"{mine.url}/v1", api_key="unused", max_retries=0)
    assert own.images.generate(model="my-flux", prompt="x", size="32x32", quality="low").data
    with pytest.raises(openai.BadRequestError):
        own.images.generate(model="gpt-image-1", prompt="x", size="32x32", quality="low")
    assert [m.id for m in own.models.list()] == ["my-flux", "gpt-image-2"]
    with pytest.raises(openai.NotFoundError):
        own.models.retrieve("gpt-image-1")


def test_models_list_and_retrieve_answer_openais_objects(client, server):
    model = client.models.retrieve("gpt-image-2")
    assert (model.id, model.object, model.owned_by) == ("gpt-image-2", "model", "black-forest-labs")
    assert model.created == 1732147200 and model._request_id.startswith("req_")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found" and err.value.type == "invalid_request_error"
    assert err.value.request_id.startswith("req_")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.retrieve("gpt-image-2")
    # The same list is Replicate's page of the one model served.
    import replicate

    page = replicate.Client(api_token=TOKEN, base_url=server.url).models.list()
    assert [f"{m.owner}/{m.name}" for m in page.results] == ["black-forest-labs/flux-fill-dev"] and page.next is None


def test_every_answer_has_a_request_id(server):
    """x-request-id: the prediction's id on Replicate's create, get and cancel; a fresh req_ id on
    anything else, errors and the middleware's own refusals included."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"input": {"prompt": "x", "image": "data:image/png;base64," + base64.b64encode(png_bytes(
        noise_image(32, 32))).decode(), "num_inference_steps": 1, "megapixels": "match_input"}}
    created = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions", json=body,
                         headers=auth)
    pid = created.json()["id"]
    assert created.headers["x-request-id"] == pid
    assert httpx.get(f"{server.url}/v1/predictions/{pid}", headers=auth).headers["x-request-id"] == pid
    assert httpx.post(f"{server.url}/v1/predictions/{pid}/cancel", headers=auth).headers["x-request-id"] == pid
    others = [httpx.get(f"{server.url}/v1/predictions/nope", headers=auth),
              httpx.get(f"{server.url}/v1/models", headers=auth),
              httpx.get(f"{server.url}/v1/predictions")]  # 401
    assert [r.status_code for r in others] == [404, 200, 401]
    ids = [r.headers["x-request-id"] for r in others]
    # A body declared over --max-body-bytes: refused by the middleware before it is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
        head = raw.recv(65536).decode("latin-1").lower()
    assert head.startswith("http/1.1 413") and "x-request-id: req_" in head
    ids.append(head.split("x-request-id: ", 1)[1].split("\r\n", 1)[0])
    assert all(i.startswith("req_") and len(i) == 36 for i in ids) and len(set(ids)) == 4


def test_the_predictions_are_the_servers_own(client, server):
    """Listed with Replicate's predictions, recorded as made by OpenAI's API, and read by the web page's list."""
    client.images.generate(prompt="listed", size="32x32", quality="low", user="someone")
    made = openai_predictions(server)[0]
    assert made["input"]["prompt"] == "listed" and made["status"] == "succeeded"
    store = server.store()
    try:
        record = store.get_prediction(made["id"])
    finally:
        store.close()
    assert record.api == "openai"
    assert record.api_data["endpoint"] == "generations" and record.api_data["user"] == "someone"


def test_a_client_that_goes_away_cancels_its_predictions(server):
    """The request is closed while its prediction runs (50 steps of a large image): it is canceled."""
    body = {"prompt": "slow", "size": "1024x1024", "quality": "max", "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=httpx.Timeout(5, read=1.5),
                   headers={"Authorization": f"Bearer {TOKEN}"})
    made = newest_once_canceled(server)
    assert made["input"]["prompt"] == "slow" and made["status"] == "canceled"


def test_streaming_sends_openais_events(client):
    stream = client.images.edit(image=("p.png", png_bytes(noise_image(64, 64, seed=9)), "image/png"), prompt="x",
                                quality="low", stream=True, n=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.completed", "image_edit.completed"]
    assert picture(events[0].b64_json).size == (64, 64) and events[0].size == "64x64"
    # Each completed event's usage: the input once (in the first), each image's own tokens; they add up.
    first, second = (e.usage for e in events)
    assert first.input_tokens_details.image_tokens == 16 and first.input_tokens_details.text_tokens > 0
    assert first.output_tokens == second.output_tokens == 16 and second.input_tokens == 0
    assert first.total_tokens == first.input_tokens + 16 and second.total_tokens == 16
    stream = client.images.generate(prompt="x", size="32x32", quality="low", stream=True)
    assert [e.type for e in stream] == ["image_generation.completed"]


def test_streaming_sends_the_live_previews_as_partial_images(client):
    """50 steps: the previews taken while it denoises come first, in the asked format and size."""
    stream = client.images.generate(prompt="x", size="160x96", quality="max", stream=True, partial_images=2,
                                    output_format="jpeg")
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed" and 1 <= len(kinds) - 1 <= 2, kinds
    partials = events[:-1]
    assert {e.type for e in partials} == {"image_generation.partial_image"}
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    for event in partials + [events[-1]]:
        shown = picture(event.b64_json)
        assert shown.format == "JPEG" and shown.size == (160, 96) and event.size == "160x96"


def test_without_partial_images_no_preview_is_streamed(client):
    stream = client.images.generate(prompt="x", size="64x64", quality="max", stream=True)
    assert [e.type for e in stream] == ["image_generation.completed"]


def test_limits_are_answered_as_openai_answers_them(server_factory):
    """A rate limit is 429 rate_limit_exceeded with Retry-After (the client's RateLimitError); a full
    disk is a 5xx server_error; neither leaves a prediction behind."""
    limited = server_factory("--rate-limit-per-minute", "1", "--api-token", TOKEN)
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=TOKEN, max_retries=0)
    # Invalid requests cost no token of the rate limit: OpenAI's and BFL's are refused first.
    with pytest.raises(openai.BadRequestError):
        client.images.edit(image=("p.png", b"not a picture", "image/png"), prompt="x")
    opaque = base64.b64encode(png_bytes(noise_image(32, 32))).decode()  # no mask, no alpha: 422
    assert httpx.post(f"{limited.url}/v1/flux-pro-1.0-fill", headers={"x-key": TOKEN},
                      json={"image": opaque}).status_code == 422
    assert client.images.generate(prompt="x", size="32x32", quality="low").data
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(prompt="x", size="32x32", quality="low")
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1
    listed = httpx.get(f"{limited.url}/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert len(listed.json()["results"]) == 1

    full = server_factory("--min-free-disk-mb", str(1 << 40), "--max-body-bytes", "100000")
    client = openai.OpenAI(base_url=f"{full.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(prompt="x", size="32x32", quality="low")
    assert err.value.status_code == 507 and err.value.type == "server_error" and "disk" in err.value.message
    # A body over --max-body-bytes is refused before it is read, in OpenAI's shape too.
    with pytest.raises(openai.APIStatusError) as err:
        client.images.edit(image=("big.png", png_bytes(noise_image(256, 256)), "image/png"), prompt="x")
    assert err.value.status_code == 413 and err.value.type == "invalid_request_error"
    assert "larger than" in err.value.message
    assert httpx.get(f"{full.url}/v1/predictions").json()["results"] == []


def test_a_stream_closed_early_cancels_its_predictions(client, server):
    stream = client.images.generate(prompt="closed stream", size="1024x1024", quality="max", n=4, stream=True)
    time.sleep(1.0)
    stream.close()
    made = newest_once_canceled(server)
    assert made["input"]["prompt"] == "closed stream" and made["status"] == "canceled"


def test_each_token_sees_only_its_own(server_factory):
    """The tokens are tenants here too: another tenant's OpenAI predictions are not listed to it."""
    shared = server_factory("--api-token", "alice:tok-a", "--api-token", "bob:tok-b")
    alice = openai.OpenAI(base_url=f"{shared.url}/v1", api_key="tok-a", max_retries=0)
    alice.images.generate(prompt="alice's", size="32x32", quality="low")
    listed = lambda token: httpx.get(f"{shared.url}/v1/predictions",  # noqa: E731
                                     headers={"Authorization": f"Bearer {token}"}).json()["results"]
    assert [p["input"]["prompt"] for p in listed("tok-a")] == ["alice's"]
    assert listed("tok-b") == []


def test_on_postgresql_too(server_factory, postgres_url):
    """On a PostgreSQL database: the request's predictions, their api_data and their outputs."""
    server = server_factory("--database", postgres_url)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="on postgres", n=5, size="40x24", quality="low", response_format="url")
    assert len(result.data) == 5
    assert all(Image.open(io.BytesIO(httpx.get(d.url).content)).size == (40, 24) for d in result.data)
    store = server.store()
    try:
        made = [store.get_prediction(p["id"]) for p in httpx.get(f"{server.url}/v1/predictions").json()["results"]]
    finally:
        store.close()
    assert sorted(r.api_data["first"] for r in made) == [0, 4] and {r.api for r in made} == {"openai"}
    assert all(r.api_data["size"] == [40, 24] and r.api_data["n"] == 5 for r in made)


def test_a_request_waiting_at_shutdown_is_answered_and_its_predictions_survive(server_factory):
    """SIGTERM while a request waits behind a long prediction: it is answered 503 at once, its
    prediction stays queued, and after a restart it runs and is read back at the asked size."""
    import threading

    server = server_factory()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answers: dict = {}

    def ask(name: str, **kw) -> None:
        try:
            answers[name] = client.images.generate(prompt=name, **kw)
        except openai.APIStatusError as exc:
            answers[name] = exc

    long = threading.Thread(target=ask, args=("long",), kwargs={"size": "1024x1024", "quality": "max", "n": 4})
    long.start()
    deadline = time.monotonic() + 30
    while not httpx.get(f"{server.url}/v1/predictions").json()["results"] and time.monotonic() < deadline:
        time.sleep(0.05)
    short = threading.Thread(target=ask, args=("short",), kwargs={"size": "40x24", "quality": "low"})
    short.start()
    while len(httpx.get(f"{server.url}/v1/predictions").json()["results"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    short.join(30)
    long.join(30)
    refused = answers["short"]
    assert isinstance(refused, openai.InternalServerError) and refused.status_code == 503, refused
    assert "shutting down" in refused.message and refused.type == "server_error"

    again = server_factory(data_dir=server.data_dir)
    listed = {p["input"]["prompt"]: p for p in httpx.get(f"{again.url}/v1/predictions").json()["results"]}
    if listed["long"]["status"] not in ("succeeded", "canceled"):
        httpx.post(f"{again.url}/v1/predictions/{listed['long']['id']}/cancel")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        made = httpx.get(f"{again.url}/v1/predictions/{listed['short']['id']}").json()
        if made["status"] == "succeeded":
            break
        time.sleep(0.2)
    assert made["status"] == "succeeded"
    output = base64.b64decode(made["output"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(output)).size == (40, 24)
