"""Nodes tell the truth about the model: an API node (serve --no-workers), which loads none, says in
/health what its workers recorded in the database they share; a worker's log names only what it
serves. Real processes on a real PostgreSQL."""

from __future__ import annotations

import httpx


def test_an_api_node_says_what_its_workers_serve(server_factory, postgres_url, tmp_path):
    pg = ("--database", postgres_url)
    api = server_factory(*pg, "--no-workers", data_dir=tmp_path / "api")
    alone = httpx.get(f"{api.url}/health").json()
    assert (alone["model"], alone["demo"], alone["notice"], alone["workers"]) == (None, False, None, [])

    worker = server_factory(*pg, data_dir=tmp_path / "worker", command="worker")
    health = httpx.get(f"{api.url}/health").json()
    assert health["model"] == "tiny demo model (random weights)" and health["demo"] is True
    assert "paints random colours inside it" in health["notice"]
    assert health["weights"] == str(server_factory.weights)  # the workers', not this node's setting
    assert health["workers"] == [{"name": "tiny demo model (random weights)", "demo": True,
                                  "weights": str(server_factory.weights), "device": "cpu"}]
    # The worker's own log: its model and its health and metrics, no web page (it serves none).
    log = worker.log()
    assert "DEMO MODEL: tiny demo model (random weights)" in log
    assert f"its health at http://127.0.0.1:{worker.port}/health" in log
    assert "web page" not in log
    assert httpx.get(f"{worker.url}/").status_code == 404
    # A node with workers of its own speaks of its own model and lists no others.
    assert "workers" not in httpx.get(f"{worker.url}/health").json() or \
        httpx.get(f"{worker.url}/health").json()["workers"] is None


def test_weights_are_shown_only_with_a_token(server_factory, postgres_url, tmp_path):
    pg = ("--database", postgres_url, "--api-token", "r8_node")
    api = server_factory(*pg, "--no-workers", data_dir=tmp_path / "api")
    server_factory(*pg, data_dir=tmp_path / "worker", command="worker")
    anonymous = httpx.get(f"{api.url}/health").json()
    assert anonymous["demo"] is True and anonymous["workers"][0]["weights"] is None
    shown = httpx.get(f"{api.url}/health", headers={"Authorization": "Bearer r8_node"}).json()
    assert shown["workers"][0]["weights"] == str(server_factory.weights)


def test_a_fleet_selects_by_words_on_its_workers_and_an_api_node_says_where_masks_are_made(
        server_factory, postgres_url, tmp_path):
    from tests.helpers import data_uri, fast_input, noise_image

    pg = ("--database", postgres_url)
    plain = server_factory(*pg, "--no-workers", data_dir=tmp_path / "plain")
    api = server_factory(*pg, "--no-workers", "--segmenter", "tiny", data_dir=tmp_path / "api")
    server_factory(*pg, "--segmenter", "tiny", data_dir=tmp_path / "worker", command="worker")
    model = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
    inp = fast_input(noise_image(64, 64), mask_prompt="the sky")
    # An API node told of no segmenter refuses mask_prompt before anything is queued.
    refused = httpx.post(plain.url + model, json={"input": inp})
    assert refused.status_code == 422 and "--segmenter" in refused.json()["invalid_fields"][0]["description"]
    assert httpx.get(f"{api.url}/health").json()["selects"] == ["text"]
    made = httpx.post(api.url + model, json={"input": inp}, headers={"Prefer": "wait=60"}, timeout=90).json()
    for _ in range(120):
        if made["status"] in ("succeeded", "failed", "canceled"):
            break
        made = httpx.get(f"{api.url}/v1/predictions/{made['id']}", headers={"Prefer": "wait=5"}, timeout=30).json()
    assert made["status"] == "succeeded", made["error"]
    assert "mask_prompt 'the sky':" in made["logs"]
    assert httpx.get(made["urls"]["mask"]).headers["content-type"] == "image/png"  # served by the API node
    # Clicks are answered where the models are: an API node says so.
    clicked = httpx.post(f"{api.url}/v1/masks", json={"image": data_uri(noise_image(32, 32)), "points": [[1, 1, 1]]})
    assert clicked.status_code == 503 and "--no-workers" in clicked.json()["detail"]
