"""A worker stopped (SIGSTOP) past its lease while it saves its outputs, and resumed (SIGCONT) after
another worker finished the same prediction: the late run's files never change what any node
serves under the prediction's URLs, bytes and ETag alike; its outcome is refused and its files go.

The stop is placed exactly: the test holds a lock on the files' table until the first worker's
write of its outputs waits on it (PostgreSQL says so), stops it there, and lets go."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psycopg
import pytest

from tests.helpers import box_mask, fast_input, noise_image, wait_for

MODEL = "black-forest-labs/flux-fill-dev"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def served(api, prediction: dict) -> list[tuple]:
    """Every output as this API node serves it: its bytes, ETag and Last-Modified."""
    listed = httpx.get(f"{api.url}/v1/predictions", timeout=30).json()["results"]
    urls = next(p for p in listed if p["id"] == prediction["id"])["output"]
    answers = [httpx.get(url, timeout=30) for url in urls]
    assert all(a.status_code == 200 for a in answers)
    return [(a.content, a.headers["etag"], a.headers["last-modified"]) for a in answers]


def test_a_run_stopped_past_its_lease_never_replaces_the_outputs_of_the_run_that_won(server_factory, postgres_url):
    shared = ("--database", postgres_url, "--lease-s", "1")
    apis = [server_factory(*shared, "--no-workers") for _ in range(2)]
    first = server_factory(*shared, command="worker", timeout=180)
    img, mask = noise_image(96, 96, seed=4), box_mask(96, 96, (8, 8, 80, 80))
    created = httpx.post(f"{apis[0].url}/v1/models/{MODEL}/predictions", timeout=30,
                         json={"input": fast_input(img, mask, num_inference_steps=40, num_outputs=2)}).json()
    pid = created["id"]
    wait_for(lambda: httpx.get(f"{apis[0].url}/v1/predictions/{pid}", timeout=30).json()["status"] == "processing",
             timeout=120)
    with psycopg.connect(postgres_url) as holder:
        holder.execute("LOCK TABLE blobs IN EXCLUSIVE MODE")  # every write of a file waits from now on

        def waiting_to_save() -> bool:
            with psycopg.connect(postgres_url, autocommit=True) as db:
                return db.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE 'DELETE FROM blobs%%'").fetchone() is not None

        wait_for(waiting_to_save, timeout=120)  # the first worker made its outputs and waits to write them
        os.killpg(first.process.pid, signal.SIGSTOP)
        holder.rollback()  # the lock goes; the stopped worker's write waits on the worker itself
    try:
        second = server_factory(*shared, command="worker", timeout=180)  # takes it over once its lease runs out
        def ended():
            found = httpx.get(f"{apis[0].url}/v1/predictions/{pid}", timeout=30).json()
            return found if found["status"] in ("succeeded", "failed", "canceled") else None

        done = wait_for(ended, timeout=180, every=0.2)
        assert done["status"] == "succeeded", done
        assert "its lease ran out" in done["logs"]
        before = [served(api, done) for api in apis]
        assert before[0] == before[1]  # the same bytes, ETag and time on both nodes
    finally:
        os.killpg(first.process.pid, signal.SIGCONT)
    # The first worker goes on from where it stopped: it writes its outputs, and its outcome is refused.
    wait_for(lambda: "records nothing" in first.log() or "no longer holds it" in first.log(), timeout=120, every=0.2)
    time.sleep(1.0)
    after = [served(api, done) for api in apis]
    assert after == before
    again = httpx.get(f"{apis[1].url}/v1/predictions/{pid}", timeout=30).json()
    assert (again["status"], again["output"]) == (done["status"], done["output"])
    with psycopg.connect(postgres_url) as db:
        kept = {r[0] for r in db.execute("SELECT key FROM blobs WHERE key LIKE %s AND part = 0", (f"outputs/{pid}/%",))}
        run = db.execute("SELECT output_run FROM predictions WHERE id = %s", (pid,)).fetchone()[0]
    assert kept == {f"outputs/{pid}/{run}/out-0.png", f"outputs/{pid}/{run}/out-1.png"}  # the late run's files went
    assert second.process.poll() is None and first.process.poll() is None
