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
