"""The server on a real PostgreSQL database (--database postgresql://…): the official client's calls,
files, a kill -9 with a queue in flight and the restart that finishes it, and one server per
database."""

from __future__ import annotations

import io
import time

import httpx
import pytest
import replicate

from tests.helpers import box_mask, fast_input, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"


def wait_all(url: str, ids: list[str], timeout: float = 240) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = {pid: httpx.get(f"{url}/v1/predictions/{pid}").json() for pid in ids}
        if all(p["status"] in ("succeeded", "failed", "canceled") for p in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


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


def test_a_killed_server_on_postgresql_loses_nothing_and_a_second_server_is_refused(server_factory, postgres_url,
                                                                                    tmp_path):
    data = tmp_path / "pg-data"
    server = server_factory("--database", postgres_url, data_dir=data)
    img, mask = noise_image(64, 64, seed=1), box_mask(64, 64, (8, 8, 40, 40))
    ids = []
    for i in range(4):
        steps = 50 if i == 0 else 3  # the first one is still running when the server dies
        body = {"input": fast_input(img, mask, seed=i, num_inference_steps=steps, megapixels="1")}
        ids.append(httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"])
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v1/predictions/{ids[0]}").json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    with pytest.raises(RuntimeError, match="one server per database"):  # another data folder, the same database
        server_factory("--database", postgres_url, timeout=60)

    server.kill()
    again = server_factory("--database", postgres_url, data_dir=data)
    found = wait_all(again.url, ids)
    assert all(p["status"] == "succeeded" for p in found.values()), {k: v["status"] for k, v in found.items()}
    assert "Server restarted while this prediction was running" in found[ids[0]]["logs"]
    assert sorted(p["id"] for p in httpx.get(f"{again.url}/v1/predictions").json()["results"]) == sorted(ids)
