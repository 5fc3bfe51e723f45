"""A bounded load on the live server: every prediction is accepted or refused (429 with a
Retry-After), and none is lost."""

from __future__ import annotations

import asyncio
import httpx

from tests.helpers import box_mask, fast_input, noise_image, wait_for

MODEL = "black-forest-labs/flux-fill-dev"


def test_load_every_prediction_is_accepted_or_refused_and_none_lost(server_factory):
    from bench.load import run_load

    server = server_factory("--max-queue", "100", "--log-level", "warning")
    # The worker is busy (some 14 s on a CPU) while the load comes: the queue really fills, however
    # fast the machine runs the load's own one-step predictions.
    busy = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", timeout=30, json={"input": fast_input(
        noise_image(64, 64), box_mask(64, 64, (8, 8, 56, 56)), num_inference_steps=50, megapixels="1", num_outputs=4)})
    assert busy.status_code == 201, busy.text
    wait_for(lambda: httpx.get(f"{server.url}/v1/predictions/{busy.json()['id']}").json()["status"] != "starting")
    report = asyncio.run(run_load(server.url, total=300, concurrency=50, polls=2, drain_timeout_s=110))
    print("\nload: 300 creates, 50 at once, --max-queue 100\n" + "\n".join(report.lines()))
    assert report.server_errors == 0 and report.transport_errors == []
    assert set(report.create_statuses) <= {201, 429}, report.create_statuses
    assert report.created + report.refused == 300
    assert report.refused > 0 and report.refused_without_retry_after == 0  # the queue really filled up
    assert report.created >= 100
    assert report.stuck == [] and report.final_statuses == {"succeeded": report.created}
    assert report.missing_from_list == []
