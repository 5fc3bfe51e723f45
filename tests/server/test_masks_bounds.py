"""POST /v1/masks is bounded: at most MAX_WAITING requests wait for a node's segmenter (429 past
them) and none waits longer than WAIT_S (503). The route itself, run on a segmenter that takes its
time, many requests at once."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from inference.segment import Selection
from server.protocol import ApiError
from server.routes import masks
from tests.helpers import data_uri, noise_image


class SlowSegmenter:
    """Selects nothing, slowly; counts how many select at once."""

    demo = False
    reads_text = True

    def __init__(self, seconds: float):
        self.seconds, self.running, self.most = seconds, 0, 0
        self.lock = threading.Lock()

    def select(self, image, points, boxes):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return Selection(mask=Image.new("L", image.size, 0))


def node(segmenter) -> SimpleNamespace:
    settings = SimpleNamespace(workers=True, segmenter="tiny", max_image_pixels=10**6, fetch_timeout_s=5,
                               fetch_max_redirects=2, block_private_urls=False)
    service = SimpleNamespace(resolver_of=lambda owner: (lambda value: None))
    return SimpleNamespace(segmenter=segmenter, settings=settings, service=service, mask_gate=None, phase="READY")


async def ask(state, body) -> int:
    request = SimpleNamespace(headers={})
    try:
        answer = await masks.make_mask(body, request, SimpleNamespace(sees_everything=True, tenant=None), state)
        return answer.status_code
    except ApiError as exc:
        return exc.problem.status


def test_past_max_waiting_a_mask_request_is_refused_with_429_and_the_segmenter_runs_one_at_a_time():
    segmenter = SlowSegmenter(0.4)
    state = node(segmenter)
    body = masks.MaskRequest(image=data_uri(noise_image(16, 16)), points=[[1, 1, 1]])

    async def burst():
        return await asyncio.gather(*(ask(state, body) for _ in range(masks.MAX_WAITING + 4)))

    codes = asyncio.run(burst())
    assert codes.count(429) >= 3, codes  # one runs, MAX_WAITING wait, the rest are refused at once
    assert codes.count(200) == len(codes) - codes.count(429)
    assert segmenter.most == 1


def test_a_request_that_waits_past_wait_s_is_answered_503(monkeypatch):
    monkeypatch.setattr(masks, "WAIT_S", 0.3)
    state = node(SlowSegmenter(1.0))
    body = masks.MaskRequest(image=data_uri(noise_image(16, 16)), points=[[1, 1, 1]])

    async def two():
        return await asyncio.gather(ask(state, body), ask(state, body))

    assert sorted(asyncio.run(two())) == [200, 503]
    assert state.mask_gate.waiting == 0  # nothing is left counted as waiting


@pytest.mark.parametrize("workers, segmenter, words", [(False, "tiny", "--no-workers"), (True, None, "--segmenter")])
def test_a_node_without_the_models_says_where_masks_are_made(workers, segmenter, words):
    state = node(None)
    state.settings.workers, state.settings.segmenter = workers, segmenter
    body = masks.MaskRequest(image=data_uri(noise_image(16, 16)), points=[[1, 1, 1]])
    with pytest.raises(ApiError) as err:
        asyncio.run(masks.make_mask(body, SimpleNamespace(headers={}), SimpleNamespace(sees_everything=True), state))
    assert err.value.problem.status == 503 and words in err.value.problem.detail


def test_text_to_a_segmenter_without_the_detector_names_the_text_field():
    from inference.errors import InvalidInput

    class SamOnly(SlowSegmenter):
        reads_text = False

        def find(self, image, text, threshold):
            raise InvalidInput.one("mask_prompt", "unavailable", "this server's segmenter has SAM only")

    body = masks.MaskRequest(image=data_uri(noise_image(16, 16)), text="sky")
    with pytest.raises(ApiError) as err:
        asyncio.run(masks.make_mask(body, SimpleNamespace(headers={}), SimpleNamespace(sees_everything=True),
                                    node(SamOnly(0))))
    assert err.value.problem.status == 422 and err.value.problem.invalid_fields[0].field == "text"
