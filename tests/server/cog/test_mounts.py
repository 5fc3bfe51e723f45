"""Where Cog's API is served (--cog-api: /cog by default, under --prefix too, or off), with tokens,
and its errors in Cog's shape on every route of its mount (401, 404, 409, 413, 503) while the rest
of the server keeps problem+json; the health check of a server whose model failed to load."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server import cog
from server.catalog import cog_schema
from tests.conftest import TOKEN
from tests.helpers import LiveServer, free_port
from tests.server.cog.conftest import quick, slow

OTHER = "other-tenant-token-456"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def mounted(tmp_path_factory, tiny_dir):
    """The default mount, with tokens of two tenants, a /replicate prefix and a small body limit."""
    server = LiveServer(tmp_path_factory.mktemp("cogmount") / "data", args=[
        "--weights", str(tiny_dir), "--api-token", TOKEN, "--api-token", OTHER, "--prefix", "/replicate",
        "--max-body-bytes", "200000"]).start()
    yield server
    server.stop()


def test_default_mount_and_prefix(mounted):
    for base in (f"{mounted.url}/cog", f"{mounted.url}/replicate/cog"):
        r = httpx.post(f"{base}/predictions", json={"input": quick(1)}, headers=BEARER, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
    assert httpx.post(f"{mounted.url}/predictions", json={"input": quick(1)}, headers=BEARER).status_code == 404


def test_discovery_document_and_schema_under_a_path(mounted):
    index = httpx.get(f"{mounted.url}/cog/").json()
    assert index["predictions_url"] == "/cog/predictions"
    assert index["predictions_cancel_url"] == "/cog/predictions/{prediction_id}/cancel"
    assert index["healthcheck_url"] == "/cog/health-check" and index["openapi_url"] == "/cog/openapi.json"
    assert httpx.get(f"{mounted.url}/replicate/cog").json()["predictions_url"] == "/replicate/cog/predictions"
    schema = httpx.get(f"{mounted.url}/cog/openapi.json").json()
    assert schema == cog_schema() and "prompt" in schema["components"]["schemas"]["Input"]["properties"]
    assert httpx.get(f"{mounted.url}/openapi.json").json()["info"]["title"] == "flux-fill-server"


def test_every_route_but_the_public_ones_needs_the_token(mounted):
    operations = [(method, route.path) for route in cog.API.router("/cog").routes for method in route.methods]
    assert len(operations) == 7, operations
    for method, path in operations:
        for base in ("/cog", "/replicate/cog"):
            url = mounted.url + base + path.replace("{prediction_id}", "abc123")
            if path in ("", "/openapi.json", "/health-check"):
                assert httpx.request(method, url).status_code == 200, (method, path)
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = httpx.request(method, url, headers=headers, json={"input": quick(2)} if method != "GET" else None)
                assert r.status_code == 401 and r.headers["content-type"] == "application/json", (method, path)
                assert r.json() == {"detail": "You did not pass a valid authentication token"}
                assert r.headers["www-authenticate"] == "Bearer"


def test_tokens_and_tenants(mounted):
    assert httpx.get(f"{mounted.url}/cog/health-check").json()["status"] in ("READY", "BUSY")  # no token needed
    mine = httpx.put(f"{mounted.url}/cog/predictions/sharedname1", json={"input": quick(2)}, headers=BEARER,
                     timeout=60)
    assert mine.status_code == 200
    theirs = {"Authorization": f"Bearer {OTHER}"}
    taken = httpx.put(f"{mounted.url}/cog/predictions/sharedname1", json={"input": quick(2)}, headers=theirs)
    assert taken.status_code == 409 and "taken" in taken.json()["detail"]
    assert httpx.get(f"{mounted.url}/cog/predictions/sharedname1", headers=theirs).status_code == 404
    assert httpx.post(f"{mounted.url}/cog/predictions/sharedname1/cancel", headers=theirs).status_code == 404


def test_middleware_refusals_in_cogs_shape(mounted):
    big = {"input": quick(3, prompt="x" * 300000)}
    r = httpx.post(f"{mounted.url}/cog/predictions", json=big, headers=BEARER)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith("The request body is larger than")
    # A body without Content-Length, refused as it streams in.
    chunks = iter([b'{"input": {"prompt": "', b"x" * 300000, b'"}}'])
    r = httpx.post(f"{mounted.url}/replicate/cog/predictions", content=chunks, headers=BEARER)
    assert r.status_code == 413 and set(r.json()) == {"detail"}
    replicate = httpx.post(f"{mounted.url}/v1/predictions", json=big, headers=BEARER)
    assert replicate.status_code == 413 and replicate.headers["content-type"] == PROBLEM
    unknown = httpx.get(f"{mounted.url}/cog/nothing/here", headers=BEARER)
    assert unknown.status_code == 404 and set(unknown.json()) == {"detail"}


def test_slow_body_is_408_in_cogs_shape(server_factory):
    server = server_factory("--body-timeout-s", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /cog/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"in")
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and '{"detail":"The request body did not arrive' in answer


def test_off(server_factory):
    server = server_factory("--cog-api", "off")
    r = httpx.post(f"{server.url}/cog/predictions", json={"input": quick(4)})
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert httpx.get(f"{server.url}/cog/health-check").status_code == 404


def test_setup_failed(tmp_path):
    server = LiveServer(tmp_path / "data", args=["--weights", str(tmp_path / "no-such-weights")])
    try:
        with pytest.raises(RuntimeError, match="setup failed"):
            server.start()
        health = httpx.get(f"{server.url}/cog/health-check").json()
        assert health["status"] == "SETUP_FAILED"
        assert health["setup"]["status"] == "failed" and "no-such-weights" in health["setup"]["logs"]
        assert health["setup"]["started_at"] <= health["setup"]["completed_at"]
        r = httpx.post(f"{server.url}/cog/predictions", json={"input": quick(5)})
        assert r.status_code == 503 and r.json()["detail"].startswith("The model failed to load")
    finally:
        server.stop()


def test_a_full_queue_is_429_in_cogs_shape(server_factory):
    server = server_factory("--max-queue", "1")
    url = f"{server.url}/cog/predictions"
    async_ = {"Prefer": "respond-async"}
    ids = [httpx.post(url, json={"input": slow(6 + i)}, headers=async_).json()["id"] for i in range(2)]
    refused = None
    for i in range(3):  # the first may have left the queue for the worker already
        r = httpx.post(url, json={"input": slow(8 + i)}, headers=async_)
        if r.status_code == 429:
            refused = r
            break
        ids.append(r.json()["id"])
    assert refused is not None and set(refused.json()) == {"detail"} and "overloaded" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    for pid in ids:
        httpx.post(f"{url}/{pid}/cancel")


def test_idempotent_put_on_postgresql(server_factory, postgres_url):
    server = server_factory("--database", postgres_url)
    with ThreadPoolExecutor(3) as pool:  # at once
        answers = list(pool.map(lambda _: httpx.put(f"{server.url}/cog/predictions/onpostgres", json={"input": quick(12)}, timeout=60), range(3)))
    assert [a.status_code for a in answers] == [200] * 3 and {a.json()["status"] for a in answers} == {"succeeded"}
    listed = httpx.get(f"{server.url}/v1/predictions").json()["results"]
    assert [p["id"] for p in listed] == ["onpostgres"]


def test_health_check_while_the_model_loads(tmp_path, tiny_dir):
    # Started cold, as a user starts it: a forked server's setup is over before it could be seen.
    server = LiveServer(tmp_path / "data", args=["--weights", str(tiny_dir)], fork=False)
    server.port = free_port()
    seen: list[dict] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(httpx.get(f"{server.url}/cog/health-check", timeout=2).json())
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        server.start()
        time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
        server.stop()
    statuses = [h["status"] for h in seen]
    assert "STARTING" in statuses and statuses[-1] == "READY"
    assert statuses == sorted(statuses, key=lambda s: s != "STARTING")  # STARTING, then READY, never back
    starting = next(h for h in seen if h["status"] == "STARTING")
    assert starting["setup"] == {} or (starting["setup"]["status"] == "starting"
                                       and starting["setup"]["completed_at"] is None)
    assert seen[-1]["setup"]["status"] == "succeeded"
