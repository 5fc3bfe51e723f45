"""The contract, driven by the official JavaScript client (npm `replicate` 1.4.0) against live servers.

Each test runs one scenario of tests/js/contract.mjs with Node and checks the JSON it prints. The
module is installed from the npm registry into tests/js/node_modules (`npm ci` in tests/js, as
.ci/run does). Without `node` or the module the tests are skipped, unless FLUX_FILL_REQUIRE_JS is
set (CI), where they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import httpx
import pytest

from tests.conftest import TOKEN
from tests.helpers import JS_DIR, NODE, box_mask, fast_input, js_client_mark, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"
pytestmark = js_client_mark("replicate")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("js-pictures")
    (folder / "image.png").write_bytes(png_bytes(noise_image(64, 64, seed=11)))
    (folder / "mask.png").write_bytes(png_bytes(box_mask(64, 64, (8, 8, 40, 40))))
    return folder


def scenario(name: str, base_url: str, pictures, token: str = TOKEN, timeout: float = 240) -> dict:
    """Run one scenario of contract.mjs; its last line of output is its JSON result."""
    env = {**os.environ, "FLUX_BASE_URL": base_url, "FLUX_TOKEN": token,
           "FLUX_IMAGE": str(pictures / "image.png"), "FLUX_MASK": str(pictures / "mask.png")}
    done = subprocess.run([NODE, "contract.mjs", name], cwd=JS_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output from {name}:\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert done.returncode == 0 and "error" not in result, f"{name}: {result}\n{done.stderr[-3000:]}"
    return result


def test_run_uploads_a_buffer_a_blob_and_a_file(auth_server, pictures):
    """The client uploads each Buffer, Blob and File input to /v1/files (sending `metadata` as a
    second file part) and passes the file URL; run() returns FileOutputs read from data: URIs."""
    result = scenario("run", f"{auth_server.url}/replicate/v1", pictures)
    for kind in ("buffer", "blob", "file", "pinned"):
        assert result[kind]["count"] == 1 and result[kind]["png"] and result[kind]["size"] > 100, (kind, result)
    assert result["buffer"]["url"] == "data:image/png;base64,"
    assert result["buffer"]["sha"] == result["blob"]["sha"] == result["file"]["sha"]  # same seed, same pixels


def test_files_create_get_list_delete(auth_server, pictures):
    result = scenario("files", f"{auth_server.url}/replicate/v1", pictures)
    buffer, blob, file = result["created"]
    assert [f["metadata"] for f in result["created"]] == [{"kind": "buffer"}, {"kind": "blob"}, {"kind": "file"}]
    assert buffer["name"].startswith("buffer_") and blob["name"].startswith("blob_") and file["name"] == "photo.png"
    image = (pictures / "image.png").read_bytes()
    assert buffer["size"] == len(image) and buffer["md5"] == buffer["etag"] == hashlib.md5(image).hexdigest()
    assert file["url"] == f"{auth_server.url}/replicate/v1/files/{file['id']}"
    assert result["got"] == {"id": file["id"], "name": "photo.png"}
    assert {f["id"] for f in result["created"]} <= set(result["listed"])
    assert result["deleted"] is True and result["gone"] == 404


def test_create_get_cancel_list_and_paginate(server_factory, pictures):
    server = server_factory()
    body = {"input": fast_input(noise_image(8, 8), box_mask(8, 8, (1, 1, 7, 7)), num_inference_steps=1)}
    earlier = [httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"] for _ in range(100)]
    result = scenario("lifecycle", f"{server.url}/v1", pictures)
    version = httpx.get(f"{server.url}/v1/models/{MODEL}").json()["latest_version"]["id"]
    assert result["byModel"]["status"] == "starting" and result["byModel"]["version"] == "hidden"
    assert not {"started_at", "completed_at", "metrics"} & set(result["byModel"]["keys"])
    assert result["byVersion"]["version"] == version
    assert {"id", "status", "input", "output", "urls", "logs"} <= set(result["canceled"]["keys"])
    finished = result["finished"]
    assert finished["status"] == "succeeded" and finished["output"] == ["data:image/png;base64,"]
    assert finished["input"]["num_inference_steps"] == 2 and "guidance" not in finished["input"]  # as sent
    assert finished["metrics"]["predict_time"] > 0
    assert result["stopped"]["status"] == "canceled"
    assert result["firstPage"]["count"] == 100 and result["firstPage"]["next"].startswith(f"{server.url}/v1/predictions?cursor=")
    assert len(result["seen"]) == len(set(result["seen"])) == 103 and set(earlier) <= set(result["seen"])


def test_models_versions_and_deployments(auth_server, pictures):
    result = scenario("models", f"{auth_server.url}/replicate/v1", pictures)
    model = result["model"]
    assert (model["owner"], model["name"], model["visibility"]) == ("black-forest-labs", "flux-fill-dev", "public")
    assert len(model["version"]) == 64 and {"prompt", "image", "mask", "num_outputs"} <= set(model["inputs"])
    assert result["listed"] == [MODEL] and result["versions"] == [model["version"]]
    assert result["version"]["id"] == model["version"]
    assert result["deployment"] == {"owner": "acme", "name": "image-filler", "model": MODEL, "version": model["version"]}
    assert result["viaDeployment"]["status"] == "succeeded"


def test_stream_events(auth_server, pictures):
    events = scenario("stream", f"{auth_server.url}/replicate/v1", pictures)["events"]
    names = [e["event"] for e in events]
    assert names[-1] == "done" and "logs" in names and names.count("output") == 1
    assert all(e["id"] for e in events)
    assert next(e for e in events if e["event"] == "output")["data"].startswith("data:image/png;base64,")


def test_webhooks_verify_with_validate_webhook(server_factory, pictures):
    server = server_factory("--api-token", TOKEN)
    result = scenario("webhooks", f"{server.url}/v1", pictures)
    assert [c["status"] for c in result["checks"]] == ["processing", "succeeded"]
    assert all(c["valid"] for c in result["checks"]) and not any(c["tampered"] for c in result["checks"])
    assert result["refused"] == "Invalid webhook URL"  # the client's own check, before any request


def test_errors_reach_the_caller(auth_server, pictures):
    seen = scenario("errors", f"{auth_server.url}/replicate/v1", pictures)
    assert seen["type"]["status"] == 422 and "Invalid type. Expected: integer, given: string" in seen["type"]["message"]
    assert seen["version"]["status"] == 422 and "Invalid version or not permitted" in seen["version"]["message"]
    assert seen["model"]["status"] == 404
    assert seen["token"]["status"] == 401
    assert seen["failed"]["status"] is None and "Prediction failed" in seen["failed"]["message"]
