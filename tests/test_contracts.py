"""Each contract is written once; what is derived from it agrees with it.

The choices and limits below are each defined in one module and imported by the others; these tests
pin the places that read them, so a change in the source reaches the API schema, the server's
options, the engine and the webhooks alike.
"""

from __future__ import annotations

import asyncio
import io
import socket

import pytest
from PIL import Image

from inference import accel, images, sizing
from inference.engine import EngineSettings
from inference.errors import FetchError
from inference.factory import EngineOptions
from inference.inputs import MAX_OUTPUTS, PredictionInput
from server.protocol import WEBHOOK_EVENTS, PredictionRequest
from server.settings import Settings


def _enum(model, name: str) -> list:
    prop = model.model_json_schema()["properties"][name]
    if "items" in prop:
        prop = prop["items"]
    branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)
    if "items" in branch:
        branch = branch["items"]
    return branch["enum"]


def test_megapixels_choices_are_the_sizing_rules():
    assert _enum(PredictionInput, "megapixels") == list(sizing.MEGAPIXELS)
    for choice in sizing.MEGAPIXELS:  # every choice the API accepts has a size rule
        assert sizing.output_size(1000, 600, choice)
    description = PredictionInput.model_fields["megapixels"].description
    assert f"{sizing.MATCH_INPUT_MAX_SIDE} px" in description and f"multiple of {sizing.MULTIPLE}" in description


def test_output_formats_each_encode_with_their_content_type():
    assert _enum(PredictionInput, "output_format") == list(images.OUTPUT_FORMATS)
    assert set(images.OUTPUT_CONTENT_TYPES) == set(images.OUTPUT_FORMATS)
    picture = Image.new("RGB", (16, 16), (200, 30, 30))
    for fmt in images.OUTPUT_FORMATS:
        data = images.encode_image(picture, fmt, 80)
        assert Image.MIME[Image.open(io.BytesIO(data)).format] == images.OUTPUT_CONTENT_TYPES[fmt]


def test_accepted_types_are_pillows_own():
    from server.stored_inputs import IMAGE_TYPES

    Image.init()
    assert {fmt: Image.MIME[fmt] for fmt in images.ACCEPTED_FORMATS} == images.ACCEPTED_TYPES
    assert IMAGE_TYPES == set(images.ACCEPTED_TYPES.values())


def test_memory_modes_are_the_servers_choices():
    assert _enum(Settings, "memory_mode") == list(accel.MEMORY_MODES)
    assert set(accel.FP8_MEMORY_MODES) | set(accel.OFFLOAD_MODES) | {"default"} == set(accel.MEMORY_MODES)


def test_webhook_events_are_the_filters_choices():
    from server.webhooks import EVENTS

    assert _enum(PredictionRequest, "webhook_events_filter") == list(WEBHOOK_EVENTS)
    assert EVENTS == WEBHOOK_EVENTS


def test_the_servers_defaults_are_the_engines():
    settings = Settings()
    assert settings.max_batch == MAX_OUTPUTS == EngineSettings().max_batch == EngineOptions().max_batch
    assert Settings.model_fields["max_batch"].metadata[-1].le == MAX_OUTPUTS
    assert PredictionInput.model_json_schema()["properties"]["num_outputs"]["maximum"] == MAX_OUTPUTS
    assert settings.max_image_pixels == images.DEFAULT_MAX_PIXELS == EngineSettings().max_pixels
    policy = images.FetchPolicy()
    assert (settings.fetch_timeout_s, settings.fetch_max_redirects) == (policy.timeout_s, policy.max_redirects)


ADDRESSES = {  # address: public
    "8.8.8.8": True, "2001:4860:4860::8888": True,
    "127.0.0.1": False, "10.1.2.3": False, "169.254.169.254": False, "100.64.0.1": False, "::1": False,
    "::ffff:10.0.0.1": False, "64:ff9b::a00:1": False, "fe80::1%eth0": False, "fec0::1": False, "224.0.0.1": False,
}


@pytest.mark.parametrize("address,public", ADDRESSES.items())
def test_input_urls_and_webhooks_refuse_the_same_addresses(address, public, monkeypatch):
    """One private-address rule (inference.images.non_public_address) for image fetches and webhook POSTs."""
    from server.webhooks import WebhookSender, _Refused

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    answer = [(family, socket.SOCK_STREAM, 6, "", (address, 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answer)
    try:
        images.check_host_allowed("http://example.test/x.png", "image", images.FetchPolicy(allow_private=False))
        fetch_allowed = True
    except FetchError:
        fetch_allowed = False

    async def webhook_allowed() -> bool:
        loop = asyncio.get_running_loop()

        async def getaddrinfo(*_a, **_k):
            return answer

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        try:
            await WebhookSender("whsec_x", allow_private=False)._check_destination("http://example.test/hook")
            return True
        except _Refused:
            return False

    assert fetch_allowed == asyncio.run(webhook_allowed()) == public
