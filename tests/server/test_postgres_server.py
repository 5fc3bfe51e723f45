"""The server on a real PostgreSQL database (--database postgresql://…): the official client's calls
on one node; an API node and a worker node in separate processes (runs, waits, streams, cancels and
files across them); a kill -9 whose running prediction another node takes over once its lease runs out,
or the same node at once when it restarts; a deadline's words and a requeue cross from node to node."""

from __future__ import annotations

import io
import threading
import time

import httpx
import replicate

from tests.helpers import box_mask, fast_input, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"
TERMINAL = ("succeeded", "failed", "canceled")


def wait_all(url: str, ids: list[str], timeout: float = 240) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = {pid: httpx.get(f"{url}/v1/predictions/{pid}").json() for pid in ids}
        if all(p["status"] in TERMINAL for p in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def wait_status(url: str, pid: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (p := httpx.get(f"{url}/v1/predictions/{pid}").json())["status"] != status:
        assert time.monotonic() < deadline, p["status"]
        time.sleep(0.05)
    return p


def test_the_official_client_runs_predictions_on_a_postgresql_store(server_factory, postgres_url):
    server = server_factory("--database", postgres_url)
    client = replicate.Client(base_url=server.url, api_token="unused")
    img, mask = noise_image(64, 64, seed=3), box_mask(64, 64, (8, 8, 40, 40))
    upload = client.files.create(io.BytesIO(png_bytes(img)), filename="image.png")
    assert client.files.get(upload.id).checksums["sha256"]
    inp = fast_input(img, mask, num_outputs=2)
    inp["image"] = upload.urls["get"]
    output = client.run(MODEL, input=inp)
    assert len(output) == 2 and output[0].read().startswith(b"\x89PNG")
    queued = client.predictions.create(model=MODEL, input=fast_input(img, mask, num_inference_steps=40))
    canceled = client.predictions.cancel(queued.id)
    assert canceled.status in ("canceled", "processing")
    listed = client.predictions.list()
    assert [p.id for p in listed.results][:1] == [queued.id] and len(listed.results) == 2
    assert wait_all(server.url, [queued.id])[queued.id]["status"] == "canceled"
    assert not (server.data_dir / "flux-fill.sqlite3").exists()  # the records are in PostgreSQL alone


def test_an_api_node_and_a_worker_node_share_one_queue(server_factory, postgres_url, tmp_path):
    """Two processes: `serve --no-workers` answers the API, `flux-fill worker` runs the predictions. The
    client sees one server: waits, streams, outputs and cancels cross from one node to the other."""
    blobs = str(tmp_path / "blobs")
    api = server_factory("--database", postgres_url, "--blob-dir", blobs, "--no-workers")
    assert httpx.get(f"{api.url}/health").json()["devices"] == []
    worker = server_factory("--database", postgres_url, "--blob-dir", blobs, command="worker")
    assert httpx.get(f"{worker.url}/v1/predictions").status_code == 404  # a worker node serves no API
    assert "flux_fill_queue_depth" in httpx.get(f"{worker.url}/metrics").text
    client = replicate.Client(base_url=api.url, api_token="unused")
    img, mask = noise_image(64, 64, seed=5), box_mask(64, 64, (8, 8, 40, 40))
    upload = client.files.create(io.BytesIO(png_bytes(img)), filename="image.png")  # on the API node
    inp = fast_input(img, mask)
    inp["image"] = upload.urls["get"]
    started = time.monotonic()
    waited = httpx.post(f"{api.url}/v1/models/{MODEL}/predictions", json={"input": inp}, headers={"Prefer": "wait=50"},
                        timeout=60).json()
    assert waited["status"] == "succeeded" and waited["output"][0].startswith("data:image/png")
    assert time.monotonic() - started < 45  # the worker's "completed" woke the waiting request at once
    streamed = client.predictions.create(model=MODEL, input=fast_input(img, mask, num_inference_steps=3))
    events = [(getattr(e.event, "value", e.event), e.data) for e in streamed.stream()]
    assert events[-1][0] == "done" and any(name == "output" for name, _ in events)
    assert any(name == "logs" and "Using seed" in data for name, data in events)
    running = client.predictions.create(model=MODEL, input=fast_input(img, mask, num_inference_steps=50,
                                                                      megapixels="1"))
    wait_status(api.url, running.id, "processing")
    asked = time.monotonic()
    client.predictions.cancel(running.id)
    ended = wait_status(api.url, running.id, "canceled")
    assert time.monotonic() - asked < 20 and ended["logs"].rstrip().endswith("Prediction canceled.")


def test_a_killed_node_s_running_prediction_runs_again_once_its_lease_runs_out(server_factory, postgres_url,
                                                                              tmp_path):
    data = tmp_path / "pg-data"
    server = server_factory("--database", postgres_url, "--lease-s", "3", data_dir=data)
    img, mask = noise_image(64, 64, seed=1), box_mask(64, 64, (8, 8, 40, 40))
    ids = []
    for i in range(4):
        steps = 50 if i == 0 else 3  # the first one is still running when the server dies
        body = {"input": fast_input(img, mask, seed=i, num_inference_steps=steps, megapixels="1")}
        ids.append(httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"])
    wait_status(server.url, ids[0], "processing", timeout=30)
    server.kill()
    again = server_factory("--database", postgres_url, "--lease-s", "3", data_dir=tmp_path / "another-node")
    found = wait_all(again.url, ids)
    assert all(p["status"] == "succeeded" for p in found.values()), {k: v["status"] for k, v in found.items()}
    assert "stopped answering (its lease ran out); it runs again" in found[ids[0]]["logs"]
    assert sorted(p["id"] for p in httpx.get(f"{again.url}/v1/predictions").json()["results"]) == sorted(ids)


def slow_input(seed: int = 0) -> dict:
    """About a minute of work on the tiny model on a CPU: four regions of a mask, each generated
    alone at one megapixel, four outputs, 50 steps."""
    img = noise_image(256, 256, seed=seed)
    mask = box_mask(256, 256, (10, 10, 30, 30))
    for box in ((200, 10, 220, 30), (10, 200, 30, 220), (200, 200, 220, 220)):
        mask.paste(255, box)
    return fast_input(img, mask, seed=seed, num_inference_steps=50, megapixels="1", num_outputs=4,
                      crop_to_mask=True, crop_margin=0)


def test_a_deadline_s_words_reach_the_worker_on_another_node(server_factory, postgres_url, tmp_path):
    """The API node sees the Cancel-After deadline pass; the worker node, which runs the prediction,
    ends it with the same words in its logs, not a bare "Prediction canceled."."""
    pg = ("--database", postgres_url)
    api = server_factory(*pg, "--no-workers", data_dir=tmp_path / "api")
    server_factory(*pg, data_dir=tmp_path / "worker", command="worker")
    created = httpx.post(f"{api.url}/v1/models/{MODEL}/predictions", json={"input": slow_input()},
                         headers={"Cancel-After": "6s"}).json()
    wait_status(api.url, created["id"], "processing", timeout=30)
    ended = wait_status(api.url, created["id"], "canceled", timeout=60)
    words = "Canceled: the Cancel-After deadline (6 s after creation) passed while the prediction was running."
    assert ended["logs"].rstrip().endswith(words), ended["logs"][-300:]
    assert "Prediction canceled." not in ended["logs"]


def test_a_stopping_node_s_requeue_wakes_an_idle_worker_elsewhere_at_once(server_factory, postgres_url, tmp_path,
                                                                          capsys):
    """A node stopped (SIGTERM) in the middle of a long prediction puts it back in the queue after
    its grace time, and tells the others: an idle worker on another node takes it at once, not at
    its next look at the queue (every 5 s)."""
    pg = ("--database", postgres_url)
    first = server_factory(*pg, data_dir=tmp_path / "first")
    pid = httpx.post(f"{first.url}/v1/models/{MODEL}/predictions", json={"input": slow_input(1)}).json()["id"]
    wait_status(first.url, pid, "processing", timeout=30)
    store = first.store()
    try:
        held = store.get_prediction(pid).lease
        server_factory(*pg, data_dir=tmp_path / "second", command="worker")  # idle: the queue is empty
        stopping = threading.Thread(target=first.stop, kwargs={"timeout": 90})
        stopping.start()
        last_held = time.time()
        deadline = time.monotonic() + 90
        while (record := store.get_prediction(pid)).lease in (held, None) or record.started_at is None:
            if record.lease == held:
                last_held = time.time()
            assert time.monotonic() < deadline, record.status
            time.sleep(0.02)
        stopping.join()
        assert "goes back to the queue" in record.logs and record.attempts == 2
        # Between the last look that saw the first node's claim and the second node's claim: far
        # less than the 5 s an idle worker sleeps between looks.
        assert record.started_at - last_held < 1.5, record.started_at - last_held
        with capsys.disabled():
            print(f"\nrequeued on one node, claimed on another within {record.started_at - last_held:.2f} s")
    finally:
        store.close()


def test_a_node_restarted_after_kill_9_runs_its_prediction_again_at_once(server_factory, postgres_url, tmp_path):
    """Its lease (60 s) has not run out, but the node restarted on the same data folder knows the run
    was its own (its holder id is kept there) and settles it at start."""
    data = tmp_path / "node"
    args = ("--database", postgres_url, "--lease-s", "60")
    server = server_factory(*args, data_dir=data)
    img, mask = noise_image(64, 64, seed=2), box_mask(64, 64, (8, 8, 40, 40))
    body = {"input": fast_input(img, mask, num_inference_steps=50, megapixels="0.25")}
    pid = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"]
    wait_status(server.url, pid, "processing", timeout=30)
    store = server.store()
    try:
        held = store.get_prediction(pid)
        server.kill()
        assert store.get_prediction(pid).status.value == "processing"  # killed in the middle of it
        again = server_factory(*args, data_dir=data)
        ended = wait_all(again.url, [pid], timeout=240)[pid]
        assert ended["status"] == "succeeded", ended["status"]
        assert "The node running this prediction restarted; it runs again." in ended["logs"]
        rerun = store.get_prediction(pid)
        assert rerun.attempts == 2 and rerun.lease != held.lease
        assert rerun.lease.split("/")[0] == held.lease.split("/")[0]  # the same node, by its holder id
        assert rerun.started_at < held.lease_expires_at  # taken again before the old lease would run out
    finally:
        store.close()
    assert (data / "node-id").is_file()
