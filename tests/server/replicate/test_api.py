"""The contract, driven by the official replicate client against a live server on loopback."""

from __future__ import annotations

import io
import json
import re
import time
from datetime import datetime

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError

from tests.conftest import TOKEN
from tests.helpers import box_mask, fast_input, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"


@pytest.fixture(scope="module")
def client(auth_server):
    return replicate.Client(base_url=f"{auth_server.url}/replicate", api_token=TOKEN)


@pytest.fixture(scope="module")
def picture():
    return noise_image(64, 64, seed=11), box_mask(64, 64, (8, 8, 40, 40))


def test_run_returns_file_objects_with_the_image_bytes(client, picture):
    img, mask = picture
    out = client.run(MODEL, input=fast_input(img, mask, num_outputs=2, seed=5))
    assert len(out) == 2
    for item in out:
        data = item.read()
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert out[0].read() != out[1].read()


def test_run_with_file_handles_uploads_through_files_api(client, picture, auth_server):
    img, mask = picture
    inp = fast_input(img, seed=5)
    inp["image"] = io.BytesIO(png_bytes(img))
    inp["mask"] = io.BytesIO(png_bytes(mask))
    out = client.run(MODEL, input=inp)
    same = client.run(MODEL, input=fast_input(img, mask, seed=5))
    assert out[0].read() == same[0].read()
    files = httpx.get(f"{auth_server.url}/v1/files", headers={"Authorization": f"Bearer {TOKEN}"}).json()["results"]
    assert len(files) >= 2 and files[0]["urls"]["get"].startswith(auth_server.url)


def test_create_wait_and_prediction_shape(client, picture):
    img, mask = picture
    sent = fast_input(img, mask, seed=1)
    p = client.predictions.create(model=MODEL, input=sent)
    assert p.status == "starting" and p.version == "hidden" and len(p.id) == 26
    p.wait()
    assert p.status == "succeeded"
    assert "Using seed: 1" in p.logs and "2/2" in p.logs
    assert p.progress is not None and (p.progress.current, p.progress.total) == (2, 2)  # the client parses tqdm lines
    assert p.output[0].startswith("data:image/png;base64,")
    assert p.metrics["predict_time"] > 0 and p.metrics["total_time"] >= p.metrics["predict_time"]
    assert p.input == sent  # exactly as sent: no defaults added
    assert set(p.urls) == {"get", "cancel", "web", "stream"}
    assert p.urls["get"].endswith(f"/replicate/v1/predictions/{p.id}")
    assert p.completed_at.endswith("Z") and p.created_at <= p.started_at <= p.completed_at


def test_version_refs_work(client, picture, auth_server):
    """The one version id (the model's latest_version.id) is accepted in every form Replicate
    documents for `version` ("{owner}/{model}:{id}", "{id}", "{owner}/{model}"); any other id is
    422 "Invalid version or not permitted", as Replicate answers it."""
    img, mask = picture
    version = client.models.get(MODEL).latest_version.id
    assert len(version) == 64 and int(version, 16) >= 0
    out = client.run(f"{MODEL}:{version}", input=fast_input(img, mask, seed=2))  # also GETs the version
    assert len(out) == 1
    p = client.predictions.create(version=version, input=fast_input(img, mask, seed=2))
    assert p.version == version
    p = client.deployments.predictions.create("acme/fill", input=fast_input(img, mask, seed=2))
    p.wait()
    assert p.status == "succeeded"
    for wrong in ("0" * 64, f"{MODEL}:deadbeef", "deadbeef", "acme/other", f"acme/other:{version}"):
        with pytest.raises(ReplicateError) as err:
            client.predictions.create(version=wrong, input=fast_input(img, mask))
        assert err.value.status == 422 and err.value.title == "Invalid version or not permitted", wrong
    for accepted, echoed in ((MODEL, "hidden"), (f"{MODEL}:{version}", version), ("hidden", "hidden")):
        r = httpx.post(f"{auth_server.url}/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"version": accepted, "input": fast_input(img, mask)})
        assert r.status_code == 201 and r.json()["version"] == echoed, (accepted, r.text)


def test_cancel_a_running_prediction(client, picture):
    img, mask = picture
    p = client.predictions.create(model=MODEL, input=fast_input(img, mask, num_inference_steps=50, megapixels="1",
                                                                num_outputs=4))
    deadline = time.monotonic() + 30
    while p.status == "starting" and time.monotonic() < deadline:
        time.sleep(0.05)
        p.reload()
    p.cancel()
    p.wait()
    assert p.status == "canceled"
    assert p.output is None and p.completed_at


def test_cancel_a_queued_prediction_answers_the_full_prediction(auth_server, picture):
    img, mask = picture
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"input": fast_input(img, mask, num_inference_steps=50, megapixels="1", num_outputs=4)}
    first = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", json=body, headers=headers).json()
    second = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", json=body, headers=headers).json()
    answer = httpx.post(second["urls"]["cancel"].replace("/replicate", ""), headers=headers)
    assert answer.status_code == 200
    assert answer.json()["status"] == "canceled" and answer.json()["id"] == second["id"]
    httpx.post(f"{auth_server.url}/v1/predictions/{first['id']}/cancel", headers=headers)


def test_list_is_paged_newest_first_with_absolute_urls(client, auth_server, picture):
    img, mask = picture
    ids = [client.predictions.create(model=MODEL, input=fast_input(img, mask, seed=i)).id for i in range(3)]
    page = client.predictions.list()
    listed = [p.id for p in page.results]
    assert listed[:3] == ids[::-1]
    raw = httpx.get(f"{auth_server.url}/replicate/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert set(raw) == {"next", "previous", "results"}
    assert raw["next"] is None or raw["next"].startswith(f"{auth_server.url}/replicate/v1/predictions?cursor=")


def test_list_pages_follow_cursors(server_factory, picture):
    server = server_factory("--max-queue", "500", "--no-workers")  # the predictions wait: listing is the test
    img, mask = picture
    body = {"input": fast_input(img, mask, num_inference_steps=1)}
    made = [httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body).json()["id"] for _ in range(105)]
    c = replicate.Client(base_url=server.url, api_token="unused")
    first = c.predictions.list()
    assert len(first.results) == 100 and first.next
    second = c.predictions.list(first.next)
    assert [p.id for p in first.results + second.results] == made[::-1]
    assert second.next is None and second.previous
    back = c.predictions.list(second.previous)
    assert [p.id for p in back.results] == [p.id for p in first.results]
    after = httpx.get(f"{server.url}/v1/predictions", params={"created_after": "2999-01-01T00:00:00Z"}).json()
    assert after["results"] == []


def test_wrong_token_is_401_problem(auth_server):
    bad = replicate.Client(base_url=f"{auth_server.url}/replicate", api_token="wrong")
    with pytest.raises(ReplicateError) as err:
        bad.predictions.list()
    assert err.value.status == 401
    r = httpx.get(f"{auth_server.url}/v1/predictions", headers={"Authorization": "Token wrong"})
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json() == {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token",
                        "status": 401}
    assert httpx.get(f"{auth_server.url}/v1/predictions", headers={"Authorization": f"Token {TOKEN}"}).status_code == 200
    assert httpx.get(f"{auth_server.url}/health").status_code == 200


def test_missing_prompt_is_422_with_invalid_fields(client, auth_server, picture):
    img, mask = picture
    inp = fast_input(img, mask)
    del inp["prompt"]
    with pytest.raises(ReplicateError) as err:
        client.run(MODEL, input=inp)
    assert err.value.status == 422 and "input.prompt: prompt is required" in err.value.detail
    r = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"input": {**inp, "num_outputs": 9, "unknown_key": 1}, "extra": True})
    body = r.json()
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert body["title"] == "Input validation failed"
    fields = {(f["field"], f["type"]) for f in body["invalid_fields"]}
    assert fields == {("input.prompt", "required"), ("input.num_outputs", "maximum"),
                      ("extra", "additional_property_not_allowed")}
    assert body["detail"].count("\n") == 2 and body["detail"].startswith("- ")


def test_unknown_model_and_prediction_are_404(auth_server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{auth_server.url}/v1/models/acme/other/predictions", json={"input": {}}, headers=headers)
    assert r.status_code == 404 and r.json() == {"detail": "The requested resource could not be found.", "status": 404}
    assert httpx.get(f"{auth_server.url}/v1/predictions/nope", headers=headers).status_code == 404


def test_prefer_wait_semantics(auth_server, picture):
    img, mask = picture
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{auth_server.url}/v1/models/{MODEL}/predictions"
    done = httpx.post(url, json={"input": fast_input(img, mask)}, headers={**headers, "Prefer": "wait=30"}, timeout=40)
    assert done.status_code == 201 and done.json()["status"] == "succeeded"
    assert done.headers["Preference-Applied"] == "wait=30"
    slow_input = fast_input(img, mask, num_inference_steps=50, megapixels="1", num_outputs=4)
    started = time.monotonic()
    pending = httpx.post(url, json={"input": slow_input}, headers={**headers, "Prefer": "wait=2"}, timeout=10)
    assert time.monotonic() - started < 2.5
    assert pending.json()["status"] == "starting" and pending.json()["output"] is None
    plain = httpx.post(url, json={"input": fast_input(img, mask)}, headers=headers)
    assert plain.json()["status"] == "starting" and "Preference-Applied" not in plain.headers
    httpx.post(f"{auth_server.url}/v1/predictions/{pending.json()['id']}/cancel", headers=headers)


def test_stream_events(client, picture):
    img, mask = picture
    events = list(client.stream(MODEL, input=fast_input(img, mask, seed=3)))
    kinds = [e.event.value for e in events]
    outputs = [e.data for e in events if e.event.value == "output"]
    assert len(outputs) == 1  # the client turns the data: URI into a file object
    assert Image.open(io.BytesIO(outputs[0].read())).size == (64, 64)
    assert kinds[-1] == "done" and "logs" in kinds
    assert any(e.event.value == "logs" and "Using seed: 3" in e.data for e in events)


def test_stream_of_a_failed_prediction_has_error_then_done(auth_server, picture):
    img, _ = picture
    headers = {"Authorization": f"Bearer {TOKEN}"}
    p = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", headers={**headers, "Prefer": "wait=20"},
                   json={"input": fast_input(img, None)}, timeout=30).json()
    assert p["status"] == "failed" and "mask is required" in p["error"]
    text = httpx.get(p["urls"]["stream"], timeout=10).text  # no auth, as the JS client fetches it
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[-2:] == ["error", "done"]
    assert text.count("\nid: ") + text.startswith("id: ") >= len(names)


def test_failed_prediction_raises_model_error(client, picture):
    img, _ = picture
    with pytest.raises(ModelError, match="mask is required"):
        client.run(MODEL, input=fast_input(img, None))


def test_webhooks_are_signed_and_verify_with_the_client(server_factory, picture):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    server = server_factory()
    c = replicate.Client(base_url=server.url, api_token="x")
    img, mask = picture
    p = c.predictions.create(model=MODEL, input=fast_input(img, mask, seed=8),
                             webhook=f"http://127.0.0.1:{hook.server_address[1]}/hook",
                             webhook_events_filter=["start", "completed"])
    p.wait()
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    hook.shutdown()
    secret = c.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    statuses = []
    for headers, body in received:
        lowered = {k.lower(): v for k, v in headers.items()}
        replicate.webhook.Webhooks.validate(headers=lowered, body=body.decode(), secret=secret)  # raises if invalid
        statuses.append(json.loads(body)["status"])
    assert statuses[0] == "processing" and statuses[-1] == "succeeded" and len(statuses) == 2


def test_https_public_url_makes_output_urls(server_factory, picture):
    server = server_factory("--public-url", "https://fill.example.test")
    img, mask = picture
    p = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", headers={"Prefer": "wait=20"},
                   json={"input": fast_input(img, mask)}, timeout=30).json()
    url = p["output"][0]
    assert url.startswith("https://fill.example.test/outputs/") and url.endswith("/out-0.png")
    local = url.replace("https://fill.example.test", server.url)
    got = httpx.get(local)  # no auth, no redirect
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    assert httpx.get(local.replace("/out-0.png", "/out-1.png")).status_code == 404
    assert httpx.get(local.split("/outputs/")[0] + "/outputs/" + p["id"] + "/wrongtoken/out-0.png").status_code == 404
    assert p["urls"]["get"] == f"https://fill.example.test/v1/predictions/{p['id']}"
    # Behind a proxy every link a client follows is the public one: file URLs and the model's too.
    upload = httpx.post(f"{server.url}/v1/files", files={"content": ("a.png", b"\x89PNG....", "image/png")}, timeout=30)
    assert upload.json()["urls"]["get"].startswith("https://fill.example.test/v1/files/")
    assert httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=30).json()["url"].startswith("https://fill.example.test")


def test_version_lookup_schema_and_health(auth_server, live_server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    version = httpx.get(f"{auth_server.url}/v1/models/{MODEL}", headers=headers).json()["latest_version"]["id"]
    assert httpx.get(f"{auth_server.url}/v1/models/{MODEL}/versions/abc", headers=headers).status_code == 404
    v = httpx.get(f"{auth_server.url}/v1/models/{MODEL}/versions/{version}", headers=headers).json()
    schema = v["openapi_schema"]["components"]["schemas"]["Input"]
    assert schema["properties"]["num_outputs"]["maximum"] == 4 and "prompt" in schema["required"]
    api = httpx.get(f"{live_server.url}/openapi.json").json()
    assert "PredictionInput" in json.dumps(api) and "outpaint" in json.dumps(api)
    health = httpx.get(f"{live_server.url}/health").json()
    assert health["status"] in ("READY", "BUSY") and health["demo"] is True and "demo" in health["model"]
    metrics = httpx.get(f"{live_server.url}/metrics").text
    assert "flux_fill_queue_depth" in metrics and 'flux_fill_predictions{status="succeeded"}' in metrics


def test_queue_full_is_429_with_retry_after(server_factory, picture):
    server = server_factory("--max-queue", "2", "--no-workers")  # none of them leaves the queue
    img, mask = picture
    body = {"input": fast_input(img, mask, num_inference_steps=50, megapixels="1", num_outputs=4)}
    codes = [httpx.post(f"{server.url}/v1/models/{MODEL}/predictions", json=body) for _ in range(5)]
    assert [r.status_code for r in codes].count(429) >= 2
    refused = next(r for r in codes if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["content-type"].startswith("application/problem+json")


def test_non_loopback_without_token_is_refused(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--data-dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "without an API token" in r.stderr


def test_uploads_take_metadata_as_a_file_part_and_the_etag_is_the_md5(auth_server):
    """The JavaScript client (replicate 1.4.0, lib/files.js: createFile) appends `metadata` to the
    form as a JSON Blob, i.e. a second *file* part beside `content`. The etag of a file is its MD5,
    as Replicate answers (replicate/replicate-python tests/test_file.py and
    tests/cassettes/file-operations.yaml: "etag" equals "checksums.md5")."""
    import hashlib

    headers = {"Authorization": f"Bearer {TOKEN}"}
    data = png_bytes(noise_image(8, 8))
    r = httpx.post(f"{auth_server.url}/replicate/v1/files", headers=headers, files=[
        ("content", ("buffer_1700000000000", data, "application/octet-stream")),
        ("metadata", ("blob", json.dumps({"purpose": "mask"}).encode(), "application/json")),
    ])
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["metadata"] == {"purpose": "mask"} and f["name"] == "buffer_1700000000000"
    assert f["etag"] == f["checksums"]["md5"] == hashlib.md5(data).hexdigest()
    assert f["checksums"]["sha256"] == hashlib.sha256(data).hexdigest() and f["size"] == len(data)
    bad = httpx.post(f"{auth_server.url}/v1/files", headers=headers, files=[
        ("content", ("a.png", data, "image/png")), ("metadata", ("blob", b"[1, 2]", "application/json"))])
    assert bad.status_code == 422 and "metadata" in bad.json()["detail"]


def test_files_list_is_paged_with_cursors(server_factory):
    server = server_factory()
    ids = [httpx.post(f"{server.url}/v1/files", files={"content": (f"f{i}.bin", b"x" * i)}).json()["id"]
           for i in range(103)]
    first = httpx.get(f"{server.url}/v1/files").json()
    assert [f["id"] for f in first["results"]] == ids[::-1][:100] and first["previous"] is None
    assert first["next"].startswith(f"{server.url}/v1/files?cursor=")
    second = httpx.get(first["next"]).json()
    assert [f["id"] for f in second["results"]] == ids[::-1][100:] and second["next"] is None
    back = httpx.get(second["previous"]).json()
    assert [f["id"] for f in back["results"]] == [f["id"] for f in first["results"]]
    client = replicate.Client(base_url=server.url, api_token="unused")
    assert [f.id for f in client.files.list()] == ids[::-1][:100]


def count_rows(server) -> int:
    """Predictions recorded in the server's database, read directly (a failed create adds none)."""
    store = server.store()
    try:
        return store.count_predictions()
    finally:
        store.close()


def test_models_versions_and_deployments_through_the_client(client, auth_server):
    """models.get, models.list, versions.list/get and deployments.get parse with the Python client
    (replicate 1.0.7: replicate/model.py Model, version.py Version, deployment.py Deployment), in the
    shapes of Replicate's HTTP API reference (models.get, models.versions.list, deployments.get)."""
    model = client.models.get(MODEL)
    assert (model.owner, model.name, model.visibility) == ("black-forest-labs", "flux-fill-dev", "public")
    assert model.url.startswith(auth_server.url) and model.run_count >= 0 and model.description
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert schema["Input"]["properties"]["num_outputs"]["maximum"] == 4 and "prompt" in schema["Input"]["required"]
    versions = model.versions.list()
    assert [v.id for v in versions.results] == [model.latest_version.id] and versions.next is None
    assert model.versions.get(model.latest_version.id).cog_version == model.latest_version.cog_version
    assert [m.id for m in client.models.list().results] == [MODEL]
    deployment = client.deployments.get("acme/image-filler")
    assert (deployment.owner, deployment.name) == ("acme", "image-filler")
    release = deployment.current_release
    assert release.model == MODEL and release.version == model.latest_version.id and release.number == 1
    assert release.configuration.max_instances >= 1 and release.created_by.username == "acme"
    with pytest.raises(ReplicateError) as err:
        client.models.get("acme/other")
    assert err.value.status == 404
    raw = httpx.get(f"{auth_server.url}/replicate/v1/models/{MODEL}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert set(raw.json()) == {"url", "owner", "name", "description", "visibility", "github_url", "paper_url",
                               "license_url", "run_count", "cover_image_url", "default_example", "latest_version"}


def test_input_is_echoed_exactly_as_sent(auth_server, picture):
    """The prediction's input is the client's (no defaults added, 30 stays 30, unknown keys kept);
    the engine works on a validated copy."""
    img, mask = picture
    sent = {**fast_input(img, mask, seed=4), "guidance": 30, "lora_scale": 1.0, "num_outputs": 1, "my_tag": {"a": [1]}}
    r = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", json={"input": sent},
                   headers={"Authorization": f"Bearer {TOKEN}", "Prefer": "wait=30"}, timeout=40)
    p = r.json()
    assert p["status"] == "succeeded" and p["input"] == sent
    text = r.text
    assert '"guidance":30,' in text and '"lora_scale":1.0,' in text  # 30 stays an integer, 1.0 a number
    again = httpx.get(p["urls"]["get"], headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert again["input"] == sent


@pytest.mark.parametrize("field, value, expected, given", [
    ("num_outputs", "2", "integer", "string"),
    ("guidance", "30", "number", "string"),
    ("seed", True, "integer", "boolean"),
    ("guidance", False, "number", "boolean"),
    ("num_inference_steps", 2.5, "integer", "number"),
    ("megapixels", 1, "string", "integer"),
    ("go_fast", "true", "boolean", "string"),
    ("prompt", ["a"], "string", "array"),
])
def test_types_are_checked_as_json_schema_checks_them(auth_server, picture, field, value, expected, given):
    """Replicate answers a wrongly typed input with 422 "Invalid type. Expected: integer, given:
    string" (its JSON-schema validation); nothing is coerced."""
    img, mask = picture
    r = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"input": {**fast_input(img, mask), field: value}})
    assert r.status_code == 422, r.text
    assert r.json()["invalid_fields"] == [{"type": "invalid_type", "field": f"input.{field}",
                                           "description": f"Invalid type. Expected: {expected}, given: {given}"}]
    assert r.json()["detail"] == f"- input.{field}: Invalid type. Expected: {expected}, given: {given}"


def test_whole_numbers_and_integers_pass_where_json_schema_passes_them(auth_server, picture):
    img, mask = picture
    sent = {**fast_input(img, mask), "num_outputs": 1.0, "guidance": 7, "lora_scale": 1}
    r = httpx.post(f"{auth_server.url}/v1/models/{MODEL}/predictions", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"input": sent})
    assert r.status_code == 201 and r.json()["input"] == sent


def test_bad_file_and_webhook_strings_are_422_at_create_and_create_nothing(server_factory, picture):
    server = server_factory()
    img, mask = picture
    before = count_rows(server)
    cases = [
        ({"image": "not a url"}, {}, "input.image"),
        ({"image": "file:///etc/passwd"}, {}, "input.image"),
        ({"mask": "gopher://127.0.0.1:70/1"}, {}, "input.mask"),
        ({"mask": "http://[::1:1/x.png"}, {}, "input.mask"),
        ({"image": "http://127.0.0.1:99999/x.png"}, {}, "input.image"),
        ({"image": "https:///no-host.png"}, {}, "input.image"),
        ({"image": "data:image/png;base64"}, {}, "input.image"),
        ({}, {"webhook": "notaurl"}, "webhook"),
        ({}, {"webhook": "ftp://example.com/hook"}, "webhook"),
        ({}, {"webhook_completed": "javascript:alert(1)"}, "webhook_completed"),
    ]
    for change, extra, field in cases:
        r = httpx.post(f"{server.url}/v1/models/{MODEL}/predictions",
                       json={"input": {**fast_input(img, mask), **change}, **extra})
        assert r.status_code == 422, (change, extra, r.text)
        assert [f["field"] for f in r.json()["invalid_fields"]] == [field], r.text
    assert count_rows(server) == before


def test_a_failed_create_writes_nothing(server_factory, picture):
    """Every check (headers, version, body, input, files, webhooks) runs before the row is written."""
    server = server_factory()
    img, mask = picture
    valid = {"input": fast_input(img, mask)}
    url = f"{server.url}/v1/models/{MODEL}/predictions"
    failures = [
        httpx.post(url, json=valid, headers={"Cancel-After": "soon"}),
        httpx.post(url, json=valid, headers={"Cancel-After": "4s"}),
        httpx.post(url, json=valid, headers={"Cancel-After": "9" * 5000}),
        httpx.post(url, json={"input": {**valid["input"], "num_outputs": "2"}}),
        httpx.post(url, content=json.dumps({"input": {**valid["input"], "prompt": "\ud800"}}),
                   headers={"content-type": "application/json"}),
        httpx.post(url, json={**valid, "webhook": "nope"}),
        httpx.post(url, json={**valid, "unknown": 1}),
        httpx.post(f"{server.url}/v1/predictions", json={**valid, "version": "0" * 64}),
        httpx.post(f"{server.url}/v1/predictions", json=valid),
        httpx.post(f"{server.url}/v1/models/acme/other/predictions", json=valid),
    ]
    assert all(400 <= r.status_code < 500 for r in failures), [(r.status_code, r.text[:100]) for r in failures]
    assert count_rows(server) == 0
    ok = httpx.post(url, json=valid, headers={"Prefer": "wait=" + "9" * 5000}, timeout=70)
    assert ok.status_code == 201 and ok.headers["Preference-Applied"] == "wait=60"
    assert ok.json()["status"] == "succeeded" and count_rows(server) == 1


def test_cancel_after_cancels_queued_and_running_predictions(server_factory, picture):
    """`Cancel-After: <duration>` (Replicate's HTTP API reference, predictions.create headers: `s`,
    `m`, `h` suffixes, combinable, bare numbers are seconds, at least 5 s) cancels the prediction when
    that much time has passed since it was created. Replicate calls a deadline passed before the
    start `aborted`, which the official clients cannot parse; here it is `canceled` with the reason
    in its logs."""
    server = server_factory()
    img, mask = picture
    slow = {"input": fast_input(img, mask, num_inference_steps=50, megapixels="1", num_outputs=4)}
    url = f"{server.url}/v1/models/{MODEL}/predictions"
    running = httpx.post(url, json=slow, headers={"Cancel-After": "8s"}).json()  # ~14 s of work on the CPU
    queued = httpx.post(url, json=slow, headers={"Cancel-After": "0h0m5s"}).json()  # waits behind it
    later = httpx.post(url, json={"input": fast_input(img, mask)}, headers={"Cancel-After": "1h30m45s"}).json()
    c = replicate.Client(base_url=server.url, api_token="unused")
    p_running, p_queued = c.predictions.get(running["id"]), c.predictions.get(queued["id"])
    p_running.wait()
    p_queued.wait()
    assert p_running.status == "canceled" and p_queued.status == "canceled"
    # Each ended at its deadline by the server's clock, not before it; the running one mid-run, with
    # steps left (a deadline that waited for the run to end would show its last step done).
    lived = {p.id: (datetime.fromisoformat(p.completed_at) - datetime.fromisoformat(p.created_at)).total_seconds()
             for p in (p_running, p_queued)}
    assert lived[p_running.id] >= 8 and lived[p_queued.id] >= 5, lived
    steps = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) \[", p_running.logs)]
    assert not steps or steps[-1][0] < steps[-1][1], p_running.logs[-500:]
    assert "Cancel-After deadline (8 s after creation) passed while the prediction was running" in p_running.logs
    assert "Cancel-After deadline (5 s after creation) passed before the prediction started" in p_queued.logs
    assert p_queued.started_at is None and p_queued.completed_at
    p_later = c.predictions.get(later["id"])
    p_later.wait()
    assert p_later.status == "succeeded"  # its deadline is far away
    for bad in ("", "soon", "5 m", "-5s", "4", "4.9s", "1d", "1e3"):
        r = httpx.post(url, json={"input": fast_input(img, mask)}, headers={"Cancel-After": bad})
        assert r.status_code == 400 and "Cancel-After" in r.json()["detail"], (bad, r.text)
    for good in ("5", "30s", "90s", "5m", "2h30m", "1.5h"):
        r = httpx.post(url, json={"input": fast_input(img, mask)}, headers={"Cancel-After": good})
        assert r.status_code == 201, (good, r.text)


def test_the_queue_accepts_thousands_and_only_an_overload_is_429(server_factory, picture):
    """The Python client never retries a POST (replicate 1.0.7, client.py: RetryTransport's
    RETRYABLE_METHODS has no POST), so a 429 ends a user's batch script: the durable queue takes
    them, and 429 is kept for a real overload (--max-queue, 5000 by default)."""
    from server.settings import Settings

    assert Settings().max_queue >= 1000
    server = server_factory("--no-workers")  # they stay queued: taking them is the test
    img, mask = picture
    body = {"input": fast_input(img, mask, num_inference_steps=1)}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        codes = [http.post(f"/v1/models/{MODEL}/predictions", json=body).status_code for _ in range(150)]
    assert codes == [201] * 150


def test_outputs_are_data_uris_in_a_prediction_and_file_urls_in_list_pages(auth_server, client, picture):
    """The clients make a file object only from https: and data: strings (replicate 1.0.7
    helpers.py transform_output; replicate 1.4.0 index.js run), so on plain http a prediction
    carries data: URIs and `run()[0].read()` works; list pages carry this server's unguessable
    output URLs, readable without auth, with HEAD, Range, an ETag and the file's name."""
    img, mask = picture
    headers = {"Authorization": f"Bearer {TOKEN}"}
    done = client.run(MODEL, input=fast_input(img, mask, seed=21, num_outputs=2))
    data = done[0].read()
    page = httpx.get(f"{auth_server.url}/replicate/v1/predictions", headers=headers).json()
    listed = next(p for p in page["results"] if p["status"] == "succeeded" and p["input"].get("seed") == 21)
    url = listed["output"][0]
    assert url.startswith(f"{auth_server.url}/replicate/outputs/{listed['id']}/") and url.endswith("/out-0.png")
    single = httpx.get(listed["urls"]["get"], headers=headers).json()
    assert single["output"][0].startswith("data:image/png;base64,")
    got = httpx.get(url)  # no auth, no redirect
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "image/png"
    assert 'filename="out-0.png"' in got.headers["content-disposition"] and got.headers["etag"]
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == got.headers["etag"]
    part = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == data[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(data)}"
    assert httpx.get(url.replace("/out-0.png", "/out-3.png")).status_code == 404


def test_output_urls_url_and_data_modes(server_factory, picture):
    img, mask = picture
    body = {"input": fast_input(img, mask)}
    urls = server_factory("--output-urls", "url")
    p = httpx.post(f"{urls.url}/v1/models/{MODEL}/predictions", json=body, headers={"Prefer": "wait=20"}, timeout=30).json()
    assert p["output"][0].startswith(f"{urls.url}/outputs/{p['id']}/") and p["output"][0].endswith("/out-0.png")
    assert httpx.get(p["output"][0]).status_code == 200  # requests.get(output[0]) works
    c = replicate.Client(base_url=urls.url, api_token="unused")
    assert c.run(MODEL, input=body["input"])[0].startswith("http://")  # plain http: a string, as Replicate's clients do
    data = server_factory("--output-urls", "data")
    httpx.post(f"{data.url}/v1/models/{MODEL}/predictions", json=body, headers={"Prefer": "wait=20"}, timeout=30)
    listed = httpx.get(f"{data.url}/v1/predictions").json()["results"]
    assert listed[0]["output"][0].startswith("data:image/png;base64,")


def test_a_list_page_of_100_predictions_with_four_1_mp_outputs_is_under_1_mb(server_factory, tmp_path):
    """What a list page weighs on the wire when every prediction has four 1 MP WebP outputs: rows
    and files are written as the worker writes them, then the page is fetched as the clients fetch
    it (they accept gzip)."""
    import os
    import secrets

    import numpy as np

    from server.files import new_id

    server = server_factory()
    store = server.store()
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(4):  # a photo-like 1 MP picture: smooth shapes and some grain
        y, x = np.mgrid[0:1024, 0:1024] / 1024.0
        arr = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y))], -1) * 100 + 128
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="WEBP", quality=80)
        pictures.append(buf.getvalue())
    sizes = [len(p) for p in pictures]
    source = tmp_path / "outputs"
    source.mkdir()
    for i, data in enumerate(pictures):
        (source / f"out-{i}.webp").write_bytes(data)
    now = time.time()
    for n in range(100):
        pid = new_id()
        folder = server.data_dir / "outputs" / pid
        folder.mkdir(parents=True)
        for i in range(4):
            os.link(source / f"out-{i}.webp", folder / f"out-{i}.webp")
        store.insert_prediction(
            id=pid, status="succeeded", version="hidden", logs="Using seed: 1\n" + "100%|##########| 28/28\n",
            input={"prompt": f"a red door, number {n}", "image": f"{server.url}/v1/files/{new_id()}",
                   "mask": f"{server.url}/v1/files/{new_id()}", "num_outputs": 4},
            output=[f"out-{i}.webp" for i in range(4)], created_at=now + n, started_at=now + n,
            completed_at=now + n + 5, predict_time=5.0, base_url=server.url, output_token=secrets.token_urlsafe(24))
    store.close()
    page = httpx.get(f"{server.url}/v1/predictions")
    assert page.headers["content-encoding"] == "gzip"
    wire = page.num_bytes_downloaded
    results = page.json()["results"]
    assert len(results) == 100 and all(len(p["output"]) == 4 for p in results)
    assert wire < 1_000_000, wire
    plain = httpx.get(f"{server.url}/v1/predictions", headers={"Accept-Encoding": "identity"})
    one = httpx.get(results[0]["urls"]["get"])  # a single prediction carries its four files as data: URIs
    assert one.json()["output"][0].startswith("data:image/webp;base64,")
    assert httpx.get(results[0]["output"][3]).content == pictures[3]
    print(f"\nlist page of 100 predictions x 4 outputs of 1 MP ({sum(sizes) // 4 // 1024} KB each): "
          f"{wire} bytes gzip, {len(plain.content)} bytes plain; one prediction: {one.num_bytes_downloaded} bytes gzip")


def test_prediction_shape_details(auth_server, picture):
    """started_at, completed_at and metrics are left out until set, as Replicate does (its
    predictions.create example has none of them); ids are 26 characters of Replicate's alphabet; HEAD
    is answered wherever GET is; a trailing slash is served, not redirected (the Python client
    follows no redirect)."""
    import re

    img, mask = picture
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{auth_server.url}/v1/models/{MODEL}/predictions"
    slow = httpx.post(url, headers=headers,
                      json={"input": fast_input(img, mask, num_inference_steps=50, megapixels="1", num_outputs=4)}).json()
    queued = httpx.post(url, headers=headers, json={"input": fast_input(img, mask)}).json()
    assert not {"started_at", "completed_at", "metrics"} & set(queued)
    assert queued["output"] is None and queued["error"] is None and queued["status"] == "starting"
    cancel = httpx.post(queued["urls"]["cancel"], headers=headers).json()
    assert cancel["status"] == "canceled" and "started_at" not in cancel and cancel["completed_at"]
    ids = [slow["id"], queued["id"]]
    made = [httpx.post(f"{auth_server.url}/v1/files", headers=headers, files={"content": ("a", b"a")}).json()["id"]
            for _ in range(30)]
    for pid in ids + made:
        assert re.fullmatch(r"[0-9a-hjkmnp-tv-z]{26}", pid), pid
    assert set("0123456789") & set("".join(made))  # digits too, as in Replicate's ids
    for path in (f"/v1/predictions/{slow['id']}", "/v1/predictions", f"/v1/files/{made[0]}", "/health",
                 f"/v1/models/{MODEL}", "/replicate/v1/predictions", f"/v1/predictions/{queued['id']}/stream"):
        started = time.monotonic()
        head = httpx.head(auth_server.url + path, headers=headers, timeout=10)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
        assert time.monotonic() - started < 5, path
    for path in ("/v1/predictions/", f"/v1/predictions/{slow['id']}/", f"/v1/models/{MODEL}/",
                 f"/replicate/v1/predictions/{slow['id']}/"):
        r = httpx.get(auth_server.url + path, headers=headers, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code)
    r = httpx.post(url + "/", headers=headers, json={"input": fast_input(img, mask)}, follow_redirects=False)
    assert r.status_code == 201
    assert httpx.get(auth_server.url + "/replicate/", follow_redirects=False).status_code == 200  # the web page
    started = time.monotonic()
    stopping = httpx.post(slow["urls"]["cancel"], headers=headers, timeout=10)
    assert time.monotonic() - started < 2.5 and stopping.json()["id"] == slow["id"]
    assert set(stopping.json()) >= {"id", "model", "version", "input", "status", "urls", "logs", "output"}
    httpx.post(r.json()["urls"]["cancel"], headers=headers)
