"""Long inputs are stored apart from rows: rows, list pages and webhook bodies stay small whatever a
client sends, one prediction's answer streams its input exactly as sent, retention removes them.

The figures that matter (database size, list page size, the server's memory) are measured on a
live server fed ten 50 MB data URIs; the pieces (splitting an input, streaming a JSON body,
serving a stored data URI) are checked as tables.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import time

import httpx
import pytest
import replicate

from server import bodies, stored_inputs
from tests.helpers import Receiver, box_mask, data_uri, fast_input, noise_image, png_bytes, response_bytes

MODEL = "black-forest-labs/flux-fill-dev"
MODEL_PATH = f"/v1/models/{MODEL}/predictions"
TERMINAL = ("succeeded", "failed", "canceled")


def wait_all(url: str, ids: list[str], timeout: float = 120) -> dict[str, dict]:
    """Poll with the list (small) until every prediction is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        found = {p["id"]: p for p in httpx.get(f"{url}/v1/predictions", timeout=30).json()["results"]}
        if all(found.get(pid, {}).get("status") in TERMINAL for pid in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> bool:
    """Start VmHWM again from the current RSS (Linux's clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- the pieces, as tables ----------------------------------------------------------------------------

LONG = "x" * (stored_inputs.INLINE_LIMIT + 1)


@pytest.mark.parametrize("sent, stored_paths", [
    ({"prompt": "short", "image": "data:image/png;base64,AAAA"}, []),
    ({"prompt": LONG}, [["prompt"]]),
    ({"prompt": "a", "image": LONG, "mask": LONG + "y"}, [["image"], ["mask"]]),
    ({"my-tag": {"a": [1, LONG, {"b": LONG}]}, "x": [LONG]}, [["my-tag", "a", 1], ["my-tag", "a", 2, "b"], ["x", 0]]),
    ({"é\"\\": LONG.replace("x", "é\"\\\n\u2028😀")}, [["é\"\\"]]),
    ({"n": 30, "f": 1.0, "t": True, "z": None, "e": {}, "l": []}, []),
])
def test_split_and_fill_give_back_the_input_exactly(sent, stored_paths):
    inline, stored, values = stored_inputs.split(sent)
    assert sorted(s.path for s in stored) == sorted(stored_paths)
    assert len(json.dumps(inline)) < 2 * stored_inputs.INLINE_LIMIT
    assert stored_inputs.fill(inline, stored, lambda s: values[s.index]) == sent
    assert json.dumps(stored_inputs.fill(inline, stored, lambda s: values[s.index])) == json.dumps(sent)  # order kept
    names = [s.name for s in stored]
    assert len(set(names)) == len(names)
    top_level_safe = {s.name for s in stored if len(s.path) == 1 and s.path[0] in ("prompt", "image", "mask", "x")}
    assert top_level_safe <= {"prompt", "image", "mask", "x"}
    before = json.dumps(sent)
    stored_inputs.fill(inline, stored, lambda s: "changed")
    assert json.dumps(sent) == before  # neither the sent input nor the row's copy is changed


@pytest.mark.parametrize("text", ["", "plain", "é\"\\\n\t\x00\x1f\u2028😀" * 997, "a" * 10_000])
def test_a_streamed_body_is_byte_for_byte_the_json_of_the_whole(tmp_path, monkeypatch, text):
    monkeypatch.setattr(bodies, "CHUNK", 7)  # many chunk boundaries, inside multi-byte characters too
    monkeypatch.setattr(bodies, "_B64_CHUNK", 9)
    source = tmp_path / "value"
    source.write_text(text, encoding="utf-8")
    image = tmp_path / "out-0.png"
    image.write_bytes(png_bytes(noise_image(9, 7)))
    strings = bodies.LargeStrings()
    content = {"input": {"image": strings.add(bodies.text_file(source)), "n": 30, "f": 1.0},
               "output": [strings.add(bodies.data_uri_file(image, "image/png"))], "gone": strings.add(
                   bodies.text_file(tmp_path / "missing"))}
    whole = {"input": {"image": text, "n": 30, "f": 1.0},
             "output": ["data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()], "gone": ""}
    got = response_bytes(strings.response(content))
    assert got == json.dumps(whole, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize("value, media_type, download, content", [
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(range(256)) * 20).decode(), "image/png", False,
     b"\x89PNG" + bytes(range(256)) * 20),
    ("data:image/jpeg;base64," + "\n".join(base64.b64encode(b"j" * 5000).decode()[i:i + 76] for i in range(0, 6668, 76)),
     "image/jpeg", False, b"j" * 5000),
    ("data:text/html;base64," + base64.b64encode(b"<script>alert(1)</script>" * 200).decode(),
     "application/octet-stream", True, b"<script>alert(1)</script>" * 200),
    ("data:image/svg+xml," + "%3Csvg%3E" * 600, "application/octet-stream", True, b"<svg>" * 600),
    ("data:," + "hello%20" * 700, "application/octet-stream", True, b"hello " * 700),
    ("a long prompt " * 400, "text/plain; charset=utf-8", False, ("a long prompt " * 400).encode()),
])
def test_a_stored_string_is_served_as_what_it_stands_for(tmp_path, monkeypatch, value, media_type, download, content):
    monkeypatch.setattr(stored_inputs, "CHUNK", 1000)
    path = tmp_path / "0"
    path.write_text(value, encoding="utf-8")
    assert stored_inputs.served_form(path) == (media_type, download)
    assert b"".join(stored_inputs.served_bytes(path)) == content


# -- ten 50 MB data URIs on a live server ---------------------------------------------------------------

def test_fifty_mb_inputs_keep_rows_pages_webhooks_and_memory_small(server_factory):
    """Ten creates with 50 MB data URIs (bytes that are no image: each fails at once, as in the
    report that found this). Before, the database grew to 1 GB and one list request answered 944 MB."""
    server = server_factory("--log-level", "warning")
    pid = server.process.pid
    uri = "data:image/png;base64," + base64.b64encode(os.urandom(37_500_000)).decode()
    assert len(uri) > 50_000_000
    receiver = Receiver()
    ids, create_s = [], []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for i in range(10):
                body = {"input": {"prompt": f"number {i}", "image": uri, "mask": data_uri(box_mask(8, 8, (1, 1, 7, 7)))}}
                if i == 0:
                    body |= {"webhook": receiver.url}
                started = time.monotonic()
                r = http.post(MODEL_PATH, json=body)
                create_s.append(time.monotonic() - started)
                assert r.status_code == 201, r.text[:300]
                ids.append(r.json()["id"])
                assert r.json()["input"] == body["input"]  # the create's answer: the input as sent
            found = wait_all(server.url, ids)
            assert all(found[i]["status"] == "failed" for i in ids), {i: found[i]["status"] for i in ids}
            after_creates = memory(pid)
            time.sleep(1.0)  # the last webhook is sent
            peak_reset = reset_peak(pid)
            base = memory(pid)

            # The database: rows hold a reference, the strings are files of their own.
            db = server.data_dir / "flux-fill.sqlite3"
            db_bytes = sum(p.stat().st_size for p in server.data_dir.glob("flux-fill.sqlite3*"))
            assert db_bytes < 2_000_000, db_bytes
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                longest = con.execute("SELECT MAX(length(input)) FROM predictions").fetchone()[0]
            assert longest < 1000, longest
            assert (server.data_dir / "inputs" / ids[0] / "0").stat().st_size == len(uri)

            # A list page: the stored strings are URLs of this server.
            started = time.monotonic()
            plain = http.get("/v1/predictions", headers={"Accept-Encoding": "identity"})
            page_s = time.monotonic() - started
            assert plain.status_code == 200 and len(plain.content) < 1_000_000, len(plain.content)
            listed = {p["id"]: p for p in plain.json()["results"]}
            image_url = listed[ids[0]]["input"]["image"]
            assert image_url.startswith(f"{server.url}/inputs/{ids[0]}/") and image_url.endswith("/image")
            client = replicate.Client(base_url=server.url, api_token="unused")
            assert len(client.predictions.list().results) == 10

            # The URL serves the data URI's bytes, streamed; as a download, since they are no PNG.
            served = http.get(image_url)
            assert served.status_code == 200 and len(served.content) == 37_500_000
            assert served.content == base64.b64decode(uri.split(",", 1)[1])

            # One prediction, read by the official client: the input exactly as sent, streamed.
            started = time.monotonic()
            one = client.predictions.get(ids[3])
            get_s = time.monotonic() - started
            assert one.input["image"] == uri and one.input["prompt"] == "number 3"
            health_s = time.monotonic()
            assert http.get("/health").status_code == 200
            health_s = time.monotonic() - health_s
            peak = memory(pid)
    finally:
        receiver.close()

    webhook_sizes = [len(body) for _, body in receiver.posts]
    assert webhook_sizes and max(webhook_sizes) < 10_000, webhook_sizes
    assert json.loads(receiver.posts[-1][1])["input"]["image"].endswith(f"/inputs/{ids[0]}/" +
                                                                      image_url.split("/")[-2] + "/image")
    assert health_s < 1.0
    grew = peak["VmHWM"] - base["VmRSS"]
    if peak_reset:
        # The list page, a 37 MB download and a 50 MB answer cost the server a few MB, not their size.
        assert grew < 80 * 1024 * 1024, grew
    print(f"\nten creates of 50 MB data URIs ({sum(create_s) / 10:.2f} s each): database {db_bytes} bytes, "
          f"longest row input {longest} chars; list page {len(plain.content)} bytes in {page_s:.2f} s; "
          f"one prediction (50 MB of input) read in {get_s:.2f} s; webhook bodies {max(webhook_sizes)} bytes; "
          f"server RSS {base['VmRSS'] >> 20} MB, peak while answering {peak['VmHWM'] >> 20} MB "
          f"(+{grew >> 20} MB), peak while creating {after_creates['VmHWM'] >> 20} MB; /health {health_s * 1000:.0f} ms")


def test_one_prediction_with_four_large_outputs_is_streamed_not_built(server_factory):
    """A 6000x6000 crop_to_mask prediction with four PNG outputs answered one GET of 290 MB, built in
    memory. Its data: URIs are now streamed from the files: here four 20 MB outputs (107 MB of JSON)
    cost the server a few MB. Rows and files are written as the worker writes them."""
    from server.files import new_id
    from server.store import SqliteStore

    server = server_factory("--log-level", "warning")
    pid, token = new_id(), secrets.token_urlsafe(24)
    folder = server.data_dir / "outputs" / pid
    folder.mkdir(parents=True)
    outputs = [os.urandom(20 << 20) for _ in range(4)]
    for i, data in enumerate(outputs):
        (folder / f"out-{i}.png").write_bytes(data)
    store = SqliteStore(server.data_dir / "flux-fill.sqlite3")
    now = time.time()
    store.insert_prediction(id=pid, status="succeeded", version="hidden", input={"prompt": "large", "crop_to_mask": True},
                            output=[f"out-{i}.png" for i in range(4)], logs="", created_at=now, started_at=now,
                            completed_at=now + 1, predict_time=1.0, output_token=token, input_blobs=[])
    store.close()
    process = server.process.pid
    reset = reset_peak(process)
    base = memory(process)
    received = 0
    started = time.monotonic()
    with httpx.stream("GET", f"{server.url}/v1/predictions/{pid}", timeout=120) as r:
        assert r.status_code == 200
        first = b""
        for chunk in r.iter_bytes():
            received += len(chunk)
            first = first or chunk
    seconds = time.monotonic() - started
    peak = memory(process)
    expected = sum(len('"data:image/png;base64,"') + 4 * ((len(o) + 2) // 3) for o in outputs)
    assert received > expected and first.startswith(b'{"id":"' + pid.encode())
    if reset:
        assert peak["VmHWM"] - base["VmRSS"] < 40 << 20, (peak, base)
    one = replicate.Client(base_url=server.url, api_token="unused").predictions.get(pid)  # what the client parses
    assert [base64.b64decode(o.split(",", 1)[1]) for o in one.output] == outputs
    print(f"\none prediction with 4 x 20 MB outputs: {received >> 20} MB answered in {seconds:.2f} s, server peak "
          f"+{(peak['VmHWM'] - base['VmRSS']) >> 20} MB")


# -- retention -----------------------------------------------------------------------------------------

def test_retention_removes_stored_inputs_and_blanks_the_input(server_factory):
    server = server_factory("--retention-hours", "0.0003")  # about one second
    img, mask = noise_image(64, 64, seed=2), box_mask(64, 64, (8, 8, 40, 40))
    sent = fast_input(img, mask, prompt="a door " * 1000)
    assert len(sent["image"]) > stored_inputs.INLINE_LIMIT
    p = httpx.post(server.url + MODEL_PATH, json={"input": sent}, headers={"Prefer": "wait=20"}, timeout=30).json()
    assert p["status"] == "succeeded" and p["input"] == sent
    listed = httpx.get(f"{server.url}/v1/predictions").json()["results"][0]
    if not listed["data_removed"]:  # it may already be gone: retention here is one second
        url = listed["input"]["image"]
        got = httpx.get(url)
        assert got.status_code in (200, 404)
        if got.status_code == 200:
            assert got.content == png_bytes(img) and got.headers["content-type"] == "image/png"
    deadline = time.monotonic() + 90
    while not p["data_removed"] and time.monotonic() < deadline:
        time.sleep(0.5)
        p = httpx.get(f"{server.url}/v1/predictions/{p['id']}").json()
    assert p["data_removed"] and p["input"] == {} and p["output"] is None
    assert httpx.get(f"{server.url}/v1/predictions").json()["results"][0]["input"] == {}
    assert not (server.data_dir / "inputs" / p["id"]).exists()
    assert not (server.data_dir / "outputs" / p["id"]).exists()
    assert httpx.get(listed["input"]["image"]).status_code == 404
    with sqlite3.connect(f"file:{server.data_dir / 'flux-fill.sqlite3'}?mode=ro", uri=True) as con:
        row = con.execute("SELECT input, input_bytes, output_bytes FROM predictions WHERE id = ?", (p["id"],)).fetchone()
    assert row == ("{}", 0, 0)


# -- a database from before ----------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, version TEXT NOT NULL,
    input TEXT NOT NULL, logs TEXT NOT NULL DEFAULT '', output TEXT, error TEXT, created_at REAL NOT NULL,
    started_at REAL, completed_at REAL, predict_time REAL, webhook TEXT, webhook_events TEXT, base_url TEXT,
    data_removed INTEGER NOT NULL DEFAULT 0, output_token TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT, cancel_at REAL
);
CREATE INDEX predictions_status ON predictions(status, seq);
CREATE INDEX predictions_created ON predictions(created_at);
CREATE TABLE files (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    md5 TEXT NOT NULL, metadata TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL, path TEXT NOT NULL
);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_a_database_from_before_moves_its_long_inputs_out_at_start(server_factory, tmp_path):
    """Rows written with their data URIs inline, as every server before this one wrote them: at the
    first start the long strings move to files, the database is compacted, the inputs read back
    exactly, removed data is blanked, and the queue runs."""
    data = tmp_path / "old"
    data.mkdir()
    db = data / "flux-fill.sqlite3"
    img, mask = noise_image(64, 64, seed=4), box_mask(64, 64, (8, 8, 40, 40))
    big = {"prompt": "kept", "image": "data:image/png;base64," + base64.b64encode(os.urandom(3 << 20)).decode(),
           "nested": {"list": [data_uri(img)]}}
    queued = fast_input(img, mask, seed=1)
    now = time.time()
    with sqlite3.connect(db) as con:
        con.executescript(OLD_SCHEMA)
        rows = [("done", "failed", big, 0, "http://evil.example"), ("gone", "succeeded", big, 1, None),
                ("queued", "starting", queued, 0, "http://evil.example")]
        for n, (name, status, inp, removed, base) in enumerate(rows):
            con.execute("INSERT INTO predictions (id, status, version, input, created_at, completed_at, data_removed, "
                        "output_token, base_url) VALUES (?, ?, 'hidden', ?, ?, ?, ?, ?, ?)",
                        (name.ljust(26, "0"), status, json.dumps(inp), now + n,
                         None if status == "starting" else now + n, removed, secrets.token_urlsafe(24), base))
    before = db.stat().st_size
    assert before > 8_000_000
    server = server_factory(data_dir=data)
    done, gone, waiting = (name.ljust(26, "0") for name in ("done", "gone", "queued"))
    assert wait_all(server.url, [waiting])[waiting]["status"] == "succeeded"
    after = sum(p.stat().st_size for p in data.glob("flux-fill.sqlite3*"))
    assert after < 1_000_000, (before, after)
    again = httpx.get(f"{server.url}/v1/predictions/{done}").json()
    assert again["input"] == big and again["urls"]["get"] == f"{server.url}/v1/predictions/{done}"
    assert httpx.get(f"{server.url}/v1/predictions/{gone}").json()["input"] == {}
    listed = {p["id"]: p for p in httpx.get(f"{server.url}/v1/predictions").json()["results"]}
    assert listed[done]["input"]["image"].startswith(f"{server.url}/inputs/{done}/")
    assert listed[done]["input"]["nested"]["list"][0].startswith(f"{server.url}/inputs/{done}/")
    assert httpx.get(listed[done]["input"]["nested"]["list"][0]).content == png_bytes(img)
    assert listed[waiting]["input"]["seed"] == 1 and listed[waiting]["input"]["image"].startswith(f"{server.url}/inputs/")
    assert httpx.get(f"{server.url}/v1/predictions/{waiting}").json()["input"] == queued  # and it ran from the files
    assert "evil.example" not in json.dumps(listed)
    server.stop()
    orphan = data / "inputs" / ("x" * 26)  # a create that crashed after its files, before its row
    orphan.mkdir()
    (orphan / "0").write_text("data:,lost")
    restarted = server_factory(data_dir=data)  # nothing left to move: it starts as any server does
    assert httpx.get(f"{restarted.url}/v1/predictions/{done}").json()["input"] == big
    assert not orphan.exists() and (data / "inputs" / done).is_dir()


def test_links_of_a_list_page_are_inputs_and_an_output_url_opens_no_input(server_factory):
    """A list page's input URL (a long data: URI stored apart) and an output URL work as the next
    prediction's inputs: the worker reads them where they lie (this server refuses its own fetches).
    Holding an output URL, shared to show a picture, does not open the prediction's inputs."""
    server = server_factory("--output-urls", "url")
    picture = noise_image(48, 48, seed=4)
    first = httpx.post(server.url + MODEL_PATH, headers={"Prefer": "wait=60"}, timeout=90, json={
        "input": {**fast_input(picture, box_mask(48, 48, (8, 8, 30, 30)), seed=2), "prompt": "p " * 3000}}).json()
    assert first["status"] == "succeeded", first.get("error")
    listed = next(p for p in httpx.get(server.url + "/v1/predictions", timeout=30).json()["results"]
                  if p["id"] == first["id"])
    image_url, output_url = listed["input"]["image"], listed["output"][0]
    assert image_url.startswith(server.url + "/inputs/") and output_url.startswith(server.url + "/outputs/")
    assert httpx.get(image_url, timeout=30).content == png_bytes(picture)
    output_token = output_url.split("/")[-2]
    assert image_url.split("/")[-2] != output_token
    borrowed = image_url.rsplit("/", 2)[0].rsplit("/", 1)[0] + f"/{output_token}/image"
    assert httpx.get(borrowed, timeout=30).status_code == 404
    second = httpx.post(server.url + MODEL_PATH, headers={"Prefer": "wait=60"}, timeout=90, json={
        "input": {**fast_input(picture, seed=3), "image": image_url, "mask": output_url}}).json()
    assert second["status"] == "succeeded", second.get("error")
