"""The null engine (--weights null) and simulated GPUs (--simulated-gpus): what bench/fleet.py
measures the control plane with. A prediction runs end to end with its progress, previews and a
cancel, as on a model; a worker with N simulated GPUs holds N runs at once, each under its own lease."""

from __future__ import annotations

import time

import httpx
import pytest

from inference.inputs import parse_input
from inference.null import NAME, NullEngine
from tests.helpers import LiveServer, wait_for

MODEL = "black-forest-labs/flux-fill-dev"
INPUT = {"prompt": "a red door", "image": "https://example.com/house.png", "output_format": "png"}


def test_the_null_engine_steps_previews_and_stops_as_a_model_does():
    engine = NullEngine(delay_s=0.2)
    steps, previews = [], []
    outputs = engine.predict(parse_input(dict(INPUT, num_inference_steps=10, num_outputs=2)),
                             on_step=lambda done, total: steps.append((done, total)),
                             on_preview=previews.append, preview_wanted=lambda: True)
    assert steps == [(i, 10) for i in range(1, 11)]
    assert previews and all(p.step < 10 and p.image().size == (64, 64) for p in previews)
    assert [o.name for o in outputs] == ["out-0.png", "out-1.png"] and outputs[0].data.startswith(b"\x89PNG")
    asked = []
    with pytest.raises(Exception) as stopped:
        engine.predict(parse_input(dict(INPUT, num_inference_steps=10)), cancelled=lambda: asked.append(1) or len(asked) > 3)
    assert type(stopped.value).__name__ == "Cancelled" and len(asked) == 4  # stopped at the step it was asked


def test_a_null_engine_server_runs_a_prediction_end_to_end_and_honours_a_cancel(tmp_path):
    server = LiveServer(tmp_path / "data", args=["--weights", "null", "--null-delay-s", "0.5"]).start()
    try:
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["model"] == NAME and health["weights"] == "null" and "no model" in health["notice"]
        done = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json={"input": dict(INPUT, num_inference_steps=5)},
                          headers={"Prefer": "wait=30"}, timeout=40).json()
        assert done["status"] == "succeeded" and len(done["output"]) == 1
        assert "5/5" in done["logs"] and done["metrics"]["predict_time"] >= 0.5
        slow = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", timeout=10,
                          json={"input": dict(INPUT, num_inference_steps=50)}).json()
        wait_for(lambda: httpx.get(f"{server.url}/v1/predictions/{slow['id']}", timeout=10).json()["status"] == "processing")
        httpx.post(f"{server.url}/v1/predictions/{slow['id']}/cancel", timeout=10)
        ended = wait_for(lambda: (p := httpx.get(f"{server.url}/v1/predictions/{slow['id']}", timeout=10).json())
                         ["status"] in ("succeeded", "failed", "canceled") and p)
        assert ended["status"] == "canceled" and ended["output"] is None
    finally:
        server.stop()


def test_a_worker_with_n_simulated_gpus_claims_n_at_once(tmp_path, postgres_url):
    shared = ["--database", postgres_url, "--weights", "null"]
    api = LiveServer(tmp_path / "api", args=[*shared, "--no-workers"]).start()
    worker = LiveServer(tmp_path / "worker", args=[*shared, "--null-delay-s", "30", "--simulated-gpus", "4"],
                        command="worker").start()
    try:
        ids = [httpx.post(f"{api.url}/v1/models/{MODEL}/predictions", json={"input": INPUT}, timeout=10).json()["id"]
               for _ in range(6)]
        store = api.store()
        try:
            running = wait_for(lambda: (rows := [store.get_prediction(pid) for pid in ids])
                               and sum(r.status == "processing" for r in rows) == 4 and rows)
            assert len({r.lease for r in running if r.status == "processing"}) == 4  # a lease each
            # Their logs and progress are written together, in one statement per batch.
            progressed = wait_for(lambda: [r for pid in ids if (r := store.get_prediction(pid)).step])
            assert all(r.steps == 28 and "Null engine" in r.logs for r in progressed)
            time.sleep(0.5)
            assert sum(store.get_prediction(pid).status == "starting" for pid in ids) == 2  # four GPUs, no more
        finally:
            store.close()
        for pid in ids:
            httpx.post(f"{api.url}/v1/predictions/{pid}/cancel", timeout=10)
        wait_for(lambda: all(httpx.get(f"{api.url}/v1/predictions/{pid}", timeout=10).json()["status"] == "canceled"
                             for pid in ids))
    finally:
        worker.stop()
        api.stop()
