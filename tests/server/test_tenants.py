"""Tokens are tenants: a red team's attempts across tenants, against live servers on loopback.

One server has three tenants: "alice" with two tokens, "bob" with one bare token, and an admin
token. Every way one tenant could reach another's predictions, files or webhook secret is tried;
each is answered as an unknown id is. Quotas answer 429 and 413 in words; a full disk answers 507.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from tests.helpers import (ROOT, LiveServer, Receiver, box_mask, data_uri, fast_input, free_port, noise_image,
                           png_bytes, wait_for)

MODEL = "black-forest-labs/flux-fill-dev"
MODEL_PATH = f"/v1/models/{MODEL}/predictions"
ALICE, ALICE_TOO, BOB, ADMIN = "alice-token-1", "alice-token-2", "bob-token-1", "admin-token-1"
NOT_FOUND = {"detail": "The requested resource could not be found.", "status": 404}
PROBLEM = "application/problem+json"
TERMINAL = ("succeeded", "failed", "canceled")


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def quick(side: int = 16, **extra) -> dict:
    return fast_input(noise_image(side, side, seed=side), box_mask(side, side, (2, 2, side - 2, side - 2)),
                      num_inference_steps=1, **extra)


def slow() -> dict:
    """Some seconds of work on the CPU: it stays queued or running while the test looks."""
    return fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), num_inference_steps=50,
                      megapixels="1", num_outputs=4)


def create(server: LiveServer, token: str | None, inp: dict, **body) -> dict:
    r = httpx.post(server.url + MODEL_PATH, json={"input": inp, **body}, headers=auth(token) if token else {},
                   timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def wait_done(server: LiveServer, token: str | None, pid: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = httpx.get(f"{server.url}/v1/predictions/{pid}", headers=auth(token) if token else {}, timeout=10).json()
        if p["status"] in TERMINAL or time.monotonic() > deadline:
            return p
        time.sleep(0.1)


def assert_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body = r.json()
    assert body["status"] == status and isinstance(body["detail"], str) and body["detail"]
    return body


def assert_unknown(r: httpx.Response) -> None:
    """Exactly what an id that never existed gets."""
    assert r.status_code == 404, (r.status_code, r.text[:300])
    assert r.json() == NOT_FOUND


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_dir):
    server = LiveServer(tmp_path_factory.mktemp("tenants") / "data", args=[
        "--weights", str(tiny_dir), "--api-token", f"alice:{ALICE}", "--api-token", f"alice:{ALICE_TOO}",
        "--api-token", BOB, "--admin-token", ADMIN, "--prefix", "/replicate"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alices_work(tenants):
    """What alice made: a finished prediction, a queued one behind a slow one, and an upload."""
    running = create(tenants, ALICE, slow())
    done = create(tenants, ALICE, quick(prompt="alice's secret prompt"))
    queued = create(tenants, ALICE, quick(prompt="alice's queued prompt"))
    upload = httpx.post(f"{tenants.url}/v1/files", headers=auth(ALICE),
                        files={"content": ("alice.png", png_bytes(noise_image(32, 32, seed=5)), "image/png")}).json()
    yield {"running": running, "done": done, "queued": queued, "file": upload}
    for p in (running, queued):
        httpx.post(f"{tenants.url}/v1/predictions/{p['id']}/cancel", headers=auth(ADMIN), timeout=10)


def test_a_tenant_lists_reads_cancels_and_streams_only_its_own_predictions(tenants, alices_work):
    ids = {alices_work[k]["id"] for k in ("running", "done", "queued")}
    bob = replicate.Client(base_url=f"{tenants.url}/replicate", api_token=BOB)
    mine = bob.predictions.create(model=MODEL, input=quick())
    listed = {p.id for p in bob.predictions.list().results}
    assert listed == {mine.id}
    raw = httpx.get(f"{tenants.url}/v1/predictions", headers=auth(BOB)).text
    assert "alice's" not in raw and not any(pid in raw for pid in ids)
    unknown = "0" * 26
    for pid in (*ids, unknown):
        assert_unknown(httpx.get(f"{tenants.url}/v1/predictions/{pid}", headers=auth(BOB)))
        assert_unknown(httpx.post(f"{tenants.url}/v1/predictions/{pid}/cancel", headers=auth(BOB)))
        assert_unknown(httpx.get(f"{tenants.url}/v1/predictions/{pid}/stream", headers=auth(BOB)))
        with pytest.raises(ReplicateError) as err:
            bob.predictions.get(pid)
        assert err.value.status == 404
        with pytest.raises(ReplicateError):
            bob.predictions.cancel(pid)
    # Bob's cancels changed nothing: alice's queued prediction is still hers and still queued.
    queued = httpx.get(f"{tenants.url}/v1/predictions/{alices_work['queued']['id']}", headers=auth(ALICE)).json()
    assert queued["status"] == "starting" and queued["input"]["prompt"] == "alice's queued prompt"
    # The stream URL needs no token (the JavaScript client sends none): the id is the capability.
    assert httpx.head(alices_work["done"]["urls"]["stream"]).status_code == 200


def test_a_named_tenant_shares_everything_between_its_tokens(tenants, alices_work):
    pid = alices_work["done"]["id"]
    assert httpx.get(f"{tenants.url}/v1/predictions/{pid}", headers=auth(ALICE_TOO)).status_code == 200
    listed = {p["id"] for p in httpx.get(f"{tenants.url}/v1/predictions", headers=auth(ALICE_TOO)).json()["results"]}
    assert {alices_work[k]["id"] for k in ("running", "done", "queued")} <= listed
    file_id = alices_work["file"]["id"]
    assert httpx.get(f"{tenants.url}/v1/files/{file_id}", headers=auth(ALICE_TOO)).status_code == 200
    secrets = {httpx.get(f"{tenants.url}/v1/webhooks/default/secret", headers=auth(t)).json()["key"]
               for t in (ALICE, ALICE_TOO)}
    assert len(secrets) == 1


def test_a_tenant_sees_reads_and_deletes_only_its_own_files(tenants, alices_work):
    file_id = alices_work["file"]["id"]
    bob = replicate.Client(base_url=tenants.url, api_token=BOB)
    bobs = bob.files.create(io.BytesIO(png_bytes(noise_image(8, 8))), metadata={"owner": "bob"})
    assert [f.id for f in bob.files.list()] == [bobs.id]
    assert_unknown(httpx.get(f"{tenants.url}/v1/files/{file_id}", headers=auth(BOB)))
    assert_unknown(httpx.delete(f"{tenants.url}/v1/files/{file_id}", headers=auth(BOB)))
    with pytest.raises(ReplicateError) as err:
        bob.files.get(file_id)
    assert err.value.status == 404
    # Alice's file is untouched; alice does not see bob's.
    assert httpx.get(f"{tenants.url}/v1/files/{file_id}", headers=auth(ALICE)).json()["size"] == alices_work["file"]["size"]
    alice_files = [f["id"] for f in httpx.get(f"{tenants.url}/v1/files", headers=auth(ALICE)).json()["results"]]
    assert file_id in alice_files and bobs.id not in alice_files


def test_another_tenants_file_url_is_no_input(tenants, alices_work):
    """Bob passes alice's file URL as his image, with crop_to_mask and a black mask (the output
    would be her picture, bit for bit). It is not resolved for him: the server fetches it like any
    URL, and this server refuses its own fetches, so that fails in words. Alice's own use of the URL
    works."""
    import numpy as np
    from PIL import Image

    for p in (alices_work["running"], alices_work["queued"]):  # not needed here: nothing waits behind them
        httpx.post(f"{tenants.url}/v1/predictions/{p['id']}/cancel", headers=auth(ADMIN), timeout=10)
    url = alices_work["file"]["urls"]["get"]
    black = data_uri(box_mask(32, 32, (0, 0, 0, 0)))
    inp = {"prompt": "copy", "image": url, "mask": black, "crop_to_mask": True, "output_format": "png",
           "num_inference_steps": 1}
    bobs = wait_done(tenants, BOB, create(tenants, BOB, inp)["id"])
    assert bobs["status"] == "failed" and bobs["output"] is None, bobs
    assert bobs["error"].startswith("image is the URL of a file this token cannot read"), bobs["error"]
    alices = wait_done(tenants, ALICE, create(tenants, ALICE, inp)["id"])
    assert alices["status"] == "succeeded", alices["error"]
    out = Image.open(io.BytesIO(base64.b64decode(alices["output"][0].split(",", 1)[1])))
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(noise_image(32, 32, seed=5)))  # hers, bit for bit


def test_the_admin_token_sees_and_cancels_everything(tenants, alices_work):
    listed = {p["id"] for p in httpx.get(f"{tenants.url}/v1/predictions", headers=auth(ADMIN)).json()["results"]}
    assert {alices_work[k]["id"] for k in ("running", "done", "queued")} <= listed
    files = {f["id"] for f in httpx.get(f"{tenants.url}/v1/files", headers=auth(ADMIN)).json()["results"]}
    assert alices_work["file"]["id"] in files
    extra = create(tenants, ALICE, quick())
    assert httpx.post(f"{tenants.url}/v1/predictions/{extra['id']}/cancel", headers=auth(ADMIN)).status_code == 200
    assert httpx.get(f"{tenants.url}/v1/predictions/{extra['id']}", headers=auth(ALICE)).json()["status"] in TERMINAL
    run_counts = {t: httpx.get(f"{tenants.url}/v1/models/{MODEL}", headers=auth(t)).json()["run_count"]
                  for t in (ADMIN, BOB)}
    assert run_counts[ADMIN] > run_counts[BOB]  # a tenant counts its own runs only


def test_each_tenant_has_its_own_webhook_secret_and_its_webhooks_are_signed_with_it(tenants):
    from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

    keys = {t: httpx.get(f"{tenants.url}/v1/webhooks/default/secret", headers=auth(t)).json()["key"]
            for t in (ALICE, BOB, ADMIN)}
    assert len(set(keys.values())) == 3 and all(k.startswith("whsec_") for k in keys.values())
    assert keys[BOB] == replicate.Client(base_url=tenants.url, api_token=BOB).webhooks.default.secret().key
    receiver = Receiver()
    try:
        made = {create(tenants, token, quick(), webhook=receiver.url, webhook_events_filter=["completed"])["id"]: token
                for token in (ALICE, BOB)}
        receiver.wait(2)
    finally:
        receiver.close()
    assert len(receiver.posts) == 2
    for headers, body in receiver.posts:
        owner = made[json.loads(body)["id"]]
        other = BOB if owner == ALICE else ALICE
        Webhooks.validate(headers=headers, body=body.decode(), secret=WebhookSigningSecret(key=keys[owner]))
        with pytest.raises(InvalidSignatureError):  # another tenant cannot forge nor read it as theirs
            Webhooks.validate(headers=headers, body=body.decode(), secret=WebhookSigningSecret(key=keys[other]))


def test_health_shows_no_paths_or_errors_without_a_token(tenants):
    public = httpx.get(f"{tenants.url}/health").json()
    assert public["status"] in ("READY", "BUSY") and public["weights"] is None and public["speed"] is None
    with_token = httpx.get(f"{tenants.url}/health", headers=auth(BOB)).json()
    assert with_token["weights"] and with_token["speed"] is not None
    assert httpx.get(f"{tenants.url}/health", headers=auth("wrong")).json()["weights"] is None


def test_a_setup_error_is_shown_only_with_a_token(tmp_path):
    missing = tmp_path / "no-such-weights"
    server = LiveServer(tmp_path / "data", args=["--weights", str(missing), "--api-token", BOB])
    with pytest.raises(RuntimeError, match="setup failed"):
        server.start()
    try:
        public = httpx.get(f"{server.url}/health").json()
        assert public["status"] == "SETUP_FAILED" and str(missing) not in json.dumps(public)
        assert public["setup_error"] == "The model failed to load; the server log has the details."
        private = httpx.get(f"{server.url}/health", headers=auth(BOB)).json()
        assert str(missing) in private["setup_error"] and private["weights"] == str(missing)
    finally:
        server.stop()


# -- the Host header ----------------------------------------------------------------------------------

def test_no_client_chosen_host_is_stored_or_sent_in_webhooks(server_factory):
    server = server_factory("--api-token", BOB)
    receiver = Receiver()
    try:
        r = httpx.post(server.url + MODEL_PATH, json={"input": quick(), "webhook": receiver.url},
                       headers={**auth(BOB), "Host": "evil.example", "Prefer": "wait=20"}, timeout=30)
        p = r.json()
        assert p["urls"]["get"].startswith("http://evil.example/")  # this answer's own URLs, built for it
        receiver.wait(2)
    finally:
        receiver.close()
    again = httpx.get(f"{server.url}/v1/predictions/{p['id']}", headers=auth(BOB)).json()
    assert again["urls"]["get"] == f"{server.url}/v1/predictions/{p['id']}"
    assert receiver.posts and all(json.loads(b)["urls"]["get"] == again["urls"]["get"] for _, b in receiver.posts)
    import sqlite3

    with sqlite3.connect(f"file:{server.data_dir / 'flux-fill.sqlite3'}?mode=ro", uri=True) as db:
        dump = "\n".join(db.iterdump())
    assert "evil.example" not in dump


# -- quotas -------------------------------------------------------------------------------------------

def test_a_tenant_at_its_queue_quota_gets_429_in_words_and_others_do_not(server_factory):
    server = server_factory("--api-token", ALICE, "--api-token", BOB, "--admin-token", ADMIN,
                            "--tenant-max-queued", "2")
    made = [create(server, ALICE, slow())["id"] for _ in range(3)]  # one runs, two wait
    wait_for(lambda: httpx.get(f"{server.url}/v1/predictions/{made[0]}", headers=auth(ALICE)).json()["status"]
             != "starting")
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick()}, headers=auth(ALICE))
    body = assert_problem(r, 429)
    assert body["detail"] == ("This token has 2 predictions waiting to run, the most it may queue. "
                              "Try again when some have started.")
    assert int(r.headers["retry-after"]) >= 1
    with pytest.raises(ReplicateError) as err:  # what the official client shows
        replicate.Client(base_url=server.url, api_token=ALICE).predictions.create(model=MODEL, input=quick())
    assert err.value.status == 429 and "predictions waiting to run" in err.value.detail
    assert httpx.post(server.url + MODEL_PATH, json={"input": quick()}, headers=auth(BOB)).status_code == 201
    assert httpx.post(server.url + MODEL_PATH, json={"input": quick()}, headers=auth(ADMIN)).status_code == 201
    for pid in made:
        httpx.post(f"{server.url}/v1/predictions/{pid}/cancel", headers=auth(ALICE))


def test_a_tenant_past_its_storage_quota_gets_413_in_words_until_it_frees_room(server_factory):
    server = server_factory("--api-token", ALICE, "--api-token", BOB, "--admin-token", ADMIN,
                            "--tenant-max-stored-mb", "1")
    blob = os.urandom(600 * 1024)
    first = httpx.post(f"{server.url}/v1/files", headers=auth(ALICE), files={"content": ("a.bin", blob)})
    assert first.status_code == 201, first.text
    second = httpx.post(f"{server.url}/v1/files", headers=auth(ALICE), files={"content": ("b.bin", blob)})
    detail = assert_problem(second, 413)["detail"]
    assert detail.startswith("Storage quota exceeded: this token's uploads, prediction inputs and outputs take 600 KB "
                             "of its 1 MB and this request adds"), detail
    # A create whose input data URI would be stored past the quota: 413 as well, and nothing written.
    big = quick(image="data:image/png;base64," + base64.b64encode(blob).decode())
    r = httpx.post(server.url + MODEL_PATH, json={"input": big}, headers=auth(ALICE))
    assert "Storage quota exceeded" in assert_problem(r, 413)["detail"]
    assert httpx.get(f"{server.url}/v1/predictions", headers=auth(ALICE)).json()["results"] == []
    # Other tenants and the admin have their own room; a small create still fits alice's.
    assert httpx.post(f"{server.url}/v1/files", headers=auth(BOB), files={"content": ("b.bin", blob)}).status_code == 201
    assert httpx.post(f"{server.url}/v1/files", headers=auth(ADMIN), files={"content": ("c.bin", blob * 3)}).status_code == 201
    assert httpx.post(server.url + MODEL_PATH, json={"input": quick()}, headers=auth(ALICE)).status_code == 201
    # Deleting her file frees her room.
    assert httpx.delete(f"{server.url}/v1/files/{first.json()['id']}", headers=auth(ALICE)).status_code == 204
    again = httpx.post(f"{server.url}/v1/files", headers=auth(ALICE), files={"content": ("b.bin", blob)})
    assert again.status_code == 201, again.text


def test_quotas_apply_only_to_tenants_of_tokens():
    from server.settings import Settings

    defaults = Settings()
    assert (defaults.tenant_max_queued, defaults.tenant_max_stored_mb) == (1000, 5120)


def test_token_names_parse_as_documented():
    from server.auth import Auth, Caller, tenant_of
    from server.settings import split_token

    assert split_token("alice:s3cret") == ("alice", "s3cret")
    assert split_token("me:to:ken") == ("me", "to:ken")  # a token holding a colon is given a name
    assert split_token("r8_abc") == (None, "r8_abc")
    assert split_token(":abc") == (None, ":abc") and split_token("alice:") == (None, "alice:")
    assert split_token("a b:c") == (None, "a b:c")
    assert tenant_of(None, "r8_abc") == __import__("hashlib").sha256(b"r8_abc").hexdigest()[:16]
    assert Caller("tenant:alice").sees("tenant:alice") and not Caller("tenant:alice").sees("tenant:bob")
    assert Caller("admin", admin=True).sees("tenant:bob") and Caller(None).sees("x")
    assert not Auth([]).enabled and Auth([], admin_tokens=["x"]).enabled


def test_one_token_for_two_tenants_is_refused_at_start(tmp_path):
    for args in (["--api-token", "a:same", "--api-token", "b:same"], ["--api-token", "same", "--admin-token", "same"]):
        r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path), *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and ("two tenants" in r.stderr or "both as --api-token and --admin-token" in r.stderr)


# -- a full disk ----------------------------------------------------------------------------------

def test_below_the_free_disk_threshold_uploads_and_creates_are_507(server_factory):
    server = server_factory("--api-token", BOB, "--min-free-disk-mb", str(10**12))  # the disk is always "full"
    r = httpx.post(f"{server.url}/v1/files", headers=auth(BOB), files={"content": ("a.png", png_bytes(noise_image(8, 8)))})
    body = assert_problem(r, 507)
    assert body["title"] == "Insufficient Storage" and "disk is full" in body["detail"]
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick()}, headers=auth(BOB))
    assert "disk is full" in assert_problem(r, 507)["detail"]
    with pytest.raises(ReplicateError) as err:
        replicate.Client(base_url=server.url, api_token=BOB).run(MODEL, input=quick())
    assert err.value.status == 507
    assert httpx.get(f"{server.url}/v1/predictions", headers=auth(BOB)).json()["results"] == []
    assert httpx.get(f"{server.url}/v1/files", headers=auth(BOB)).json()["results"] == []
    assert httpx.get(f"{server.url}/health").json()["status"] == "READY"


UNSHARE = shutil.which("unshare")


def _can_mount_tmpfs() -> bool:
    if UNSHARE is None or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run([UNSHARE, "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=20)
    return probe.returncode == 0


def chunked_upload(data: bytes, name: str):
    """A multipart upload sent without Content-Length: nothing tells the server its size before it
    has written it."""
    yield (f'--b0undary\r\nContent-Disposition: form-data; name="content"; filename="{name}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for start in range(0, len(data), 1 << 18):
        yield data[start:start + (1 << 18)]
    yield b"\r\n--b0undary--\r\n"


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and tmpfs mounts (Linux user namespaces)")
def test_a_really_full_disk_answers_507_never_500(tmp_path, tiny_dir):
    """The data directory on a 24 MB tmpfs (in a private mount namespace), and no free-disk margin:
    uploads of unannounced size run the disk out for real while they are written. Every answer is
    201 or 507 in problem+json, never a 500; freeing room makes uploads work again."""
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    serve = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(data),
             "--weights", str(tiny_dir), "--min-free-disk-mb", "0", "--max-body-bytes", str(8 << 20),
             "--max-upload-bytes", str(8 << 20)]
    script = f"mount -t tmpfs -o size=24m tmpfs {data} && exec " + " ".join(serve)
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([UNSHARE, "-rm", "sh", "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "READY":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        stored, statuses = [], []
        multipart = {"content-type": "multipart/form-data; boundary=b0undary"}
        for i in range(12):  # 12 x 3 MB uploads into 24 MB
            r = httpx.post(url + "/v1/files", content=chunked_upload(os.urandom(3 << 20), f"{i}.bin"),
                           headers=multipart, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 201:
                stored.append(r.json()["id"])
            else:
                assert_problem(r, 507)
        assert 507 in statuses and stored, statuses
        big = quick(image="data:image/png;base64," + base64.b64encode(os.urandom(3 << 20)).decode())
        for _ in range(3):
            r = httpx.post(url + MODEL_PATH, json={"input": big}, timeout=30)
            assert r.status_code in (201, 507), r.text[:300]
            if r.status_code == 507:
                assert_problem(r, 507)
        assert httpx.get(url + "/health").json()["status"] in ("READY", "BUSY")
        assert httpx.get(url + "/v1/predictions").status_code == 200
        for file_id in stored[:4]:
            assert httpx.delete(f"{url}/v1/files/{file_id}").status_code == 204
        r = httpx.post(url + "/v1/files", files={"content": ("again.bin", os.urandom(1 << 20))}, timeout=30)
        assert r.status_code == 201, r.text
        text = (tmp_path / "server.log").read_text(errors="replace")
        assert "the disk is full: [Errno 28] No space left on device" in text  # a real ENOSPC, mid-write
        assert " 500 " not in text and "Internal Server Error" not in text and "Traceback" not in text
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)
        log.close()
