"""Final webhooks to receivers that misbehave, on a fleet sharing one PostgreSQL database: a slow
receiver (9 s an answer) gets each of 60 final webhooks exactly once, though they wait far longer
than a node holds one without renewing it; a receiver down for minutes, while the node that owes
its webhooks is killed and restarted, gets every one once it is back."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import psycopg
import pytest

from tests.helpers import Receiver, box_mask, fast_input, free_port, noise_image

MODEL = "black-forest-labs/flux-fill-dev"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# How long the receiver is down (FLUX_FILL_WEBHOOK_OUTAGE_S=600 runs the ten-minute outage).
OUTAGE_S = float(os.environ.get("FLUX_FILL_WEBHOOK_OUTAGE_S", "90"))


def create_all(api, count: int, hook: str) -> list[str]:
    img, mask = noise_image(32, 32, seed=2), box_mask(32, 32, (4, 4, 28, 28))
    ids = []
    for n in range(count):
        body = {"input": fast_input(img, mask, seed=n, num_inference_steps=1), "webhook": hook,
                "webhook_events_filter": ["completed"]}
        r = httpx.post(f"{api.url}/v1/models/{MODEL}/predictions", json=body, timeout=30)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def settled(database: str) -> tuple[int, int]:
    """(predictions not yet ended, final webhooks still owed)."""
    with psycopg.connect(database) as db:
        row = db.execute("SELECT COUNT(*) FILTER (WHERE status IN ('starting', 'processing')), "
                         "COUNT(*) FILTER (WHERE webhook_due IS NOT NULL) FROM predictions").fetchone()
    return row[0], row[1]


def test_sixty_final_webhooks_to_a_nine_second_receiver_each_arrive_once(server_factory, postgres_url):
    receiver = Receiver(delay_s=9.0)
    try:
        worker = server_factory("--database", postgres_url, command="worker", timeout=180)
        api = server_factory("--database", postgres_url, "--no-workers")
        started = time.monotonic()
        ids = create_all(api, 60, receiver.url)
        deadline = time.monotonic() + 400
        while (len(receiver.posts) < 60 or settled(postgres_url) != (0, 0)) and time.monotonic() < deadline:
            time.sleep(1)
        took = time.monotonic() - started
        time.sleep(3)  # a late duplicate would arrive now
        counts = Counter(json.loads(body)["id"] for _, body in receiver.posts)
        print(f"\n60 final webhooks to a 9 s receiver delivered in {took:.0f} s")
        assert set(counts) == set(ids) and set(counts.values()) == {1}, {p: n for p, n in counts.items() if n != 1}
        assert len({headers["webhook-id"] for headers, _ in receiver.posts}) == 60
        assert worker.process.poll() is None
    finally:
        receiver.close()


def test_a_receiver_down_for_minutes_gets_every_final_webhook_once_it_is_back(server_factory, postgres_url, tmp_path):
    port = free_port()
    hook = f"http://127.0.0.1:{port}/hook"
    shared = ("--database", postgres_url, "--webhook-retry-max-interval-s", "10")
    worker = server_factory(*shared, command="worker", timeout=180)
    api = server_factory(*shared, "--no-workers")
    ids = create_all(api, 5, hook)
    down_since = time.monotonic()
    while settled(postgres_url)[0] and time.monotonic() - down_since < 120:  # all ended, their webhooks failing
        time.sleep(0.5)
    with psycopg.connect(postgres_url) as db:
        failing = db.execute("SELECT COUNT(*) FROM predictions WHERE webhook_due IS NOT NULL").fetchone()[0]
    assert failing == 5
    time.sleep(OUTAGE_S / 3)
    worker.kill()  # the node that owes them dies, and comes back on its folder
    worker.start(timeout=180)
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
    with psycopg.connect(postgres_url) as db:
        attempts, error = db.execute("SELECT MIN(webhook_attempts), MAX(webhook_error) FROM predictions").fetchone()
    assert attempts >= 3 and "ConnectError" in error  # tried all along, and failed: the receiver is down
    receiver = Receiver(port=port)
    try:
        back = time.monotonic()
        deadline = back + 60
        while (len(receiver.posts) < 5 or settled(postgres_url) != (0, 0)) and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"\nreceiver down {back - down_since:.0f} s; its 5 final webhooks arrived "
              f"{time.monotonic() - back:.1f} s after it came back")
        time.sleep(2)
        counts = Counter(json.loads(body)["id"] for _, body in receiver.posts)
        assert set(counts) == set(ids) and set(counts.values()) == {1}
        assert httpx.get(f"{api.url}/health", timeout=10).json()["status"] == "READY"
    finally:
        receiver.close()
