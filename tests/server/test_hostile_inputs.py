"""Hundreds of hostile inputs and ten thousand hostile header values through the live server: no
5xx, and nothing created by a request that is refused."""

from __future__ import annotations

import base64
import json
import re

import httpx

from tests.conftest import TOKEN
from tests.helpers import LiveServer, noise_image, png_bytes
from tests.server.hostile import (MODEL_PATH, PROBLEM, quick_input, wait_terminal)


def _deep(n: int):
    value: object = "bottom"
    for _ in range(n):
        value = [value]
    return value


HOSTILE_VALUES = [
    None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, 2**64 + 1, 10**40, 1e308, -1e308,
    "", " ", "\x00", "a\x00b", "\u202e\u0645\u0631\u062d\u0628\u0627", "🎨" * 500, "\ud800", "x" * 70_000,
    "'; DROP TABLE predictions; --", "\" OR 1=1 --", "<script>alert(1)</script>", "../../../../etc/passwd",
    "%00%2e%2e%2f", "${jndi:ldap://127.0.0.1/a}", "{{7*7}}", [], {}, [1, 2, 3], {"$gt": ""}, _deep(60),
    "data:image/png;base64,AAAA", "data:,", "data:image/png;base64,!!!!", "data:;base64," + "A" * 1000,
    "file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://127.0.0.1/x.png", "javascript:alert(1)",
    "http://[::1]:1/x", "http://999.999.999.999/x", "http://127.0.0.1:1/" + "a" * 5000, "NaN", "Infinity", "1e999",
]
FIELDS = ["prompt", "image", "mask", "num_outputs", "num_inference_steps", "guidance", "seed", "megapixels",
          "output_format", "output_quality", "lora_weights", "lora_scale", "disable_safety_checker", "go_fast",
          "preserve_unmasked", "crop_to_mask", "outpaint", "mask_grow"]


def hostile_requests(valid: dict) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments) for ~400 malformed and hostile requests."""
    out: list[tuple[str, str, dict]] = []
    # Every field of the input set to every hostile value (a sample of fields per value keeps it bounded).
    for i, value in enumerate(HOSTILE_VALUES):
        for field in FIELDS[i % 3::3] + ["image", "prompt"]:
            out.append(("POST", MODEL_PATH, {"json": {"input": {**valid, field: value}}}))
    # The body around the input.
    for value in HOSTILE_VALUES[::3]:
        out.append(("POST", MODEL_PATH, {"json": {"input": value}}))
        out.append(("POST", "/v1/predictions", {"json": {"version": value, "input": valid}}))
        out.append(("POST", "/v1/deployments/a/b/predictions", {"json": {"input": valid, "webhook": value}}))
        out.append(("POST", MODEL_PATH, {"json": {"input": valid, "webhook_events_filter": value}}))
    for extra in ({"stream": True}, {"unknown": 1}, {"input": valid, "x" * 1000: 1}, {"webhook_completed": "x"}):
        out.append(("POST", MODEL_PATH, {"json": extra}))
    # Raw bodies: not JSON, not an object, odd encodings and content types.
    raw = [b"", b"{", b"}", b"null", b"[]", b"1", b'"input"', b"\x00" * 64, b"\xff\xfe\xfd", b'{"input": NaN}',
           b'{"input": {"prompt": "a", "seed": Infinity}}', b'{"input": {"prompt": "\\ud800"}}',
           b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"[" * 100_000, b'{"input": {}}' * 1000,
           b'{"input":' + json.dumps(valid).encode() + b', "input": 5}', "{\"input\": {\"prompt\": \"é\"}}".encode("latin-1")]
    for body in raw:
        for ctype in ("application/json", "text/plain"):
            out.append(("POST", MODEL_PATH, {"content": body, "headers": {"content-type": ctype}}))
    # Prefer headers, the model path's names.
    for prefer in ("wait=0", "wait=-5", "wait=99999999999999999999999", "wait=abc", "wait=1, wait=2", "\x7f", "wait" * 500):
        out.append(("POST", MODEL_PATH, {"json": {"input": valid}, "headers": {"prefer": prefer}}))
    for owner, name in (("black-forest-labs", "x" * 3000), ("..", ".."), ("%00", "%2F"), ("a b", "ü")):
        out.append(("POST", f"/v1/models/{owner}/{name}/predictions", {"json": {"input": valid}}))
    # The files route.
    png = png_bytes(noise_image(8, 8))
    for form, files in (
        ({}, {"content": ("a.png", png)}), ({"filename": "../../etc/passwd"}, {"content": ("x", png)}),
        ({"filename": "a\x00b.png"}, {"content": ("x", png)}), ({"filename": "x" * 10_000}, {"content": ("x", png)}),
        ({"metadata": "{"}, {"content": ("x", png)}), ({"metadata": '{"a": "\\ud800"}'}, {"content": ("x", png)}), ({"metadata": "[1,2]"}, {"content": ("x", png)}),
        ({"metadata": "[" * 5000 + "]" * 5000}, {"content": ("x", png)}), ({"metadata": "null"}, {"content": ("x", png)}),
        ({"type": "\x00/\x00"}, {"content": ("x", png)}), ({"type": "x" * 5000}, {"content": ("x", b"")}),
        ({"content": "a string, not a file"}, None), ({}, {"other": ("x", png)}),
        ({}, {"content": ("🎨.png", png)}), ({}, [("content", ("a", png)), ("content", ("b", png))]),
        ({f"f{i}": "x" for i in range(20)}, {"content": ("x", png)}),
    ):
        out.append(("POST", "/v1/files", {"data": form, "files": files}))
    for body, ctype in ((b"", "multipart/form-data"), (b"junk", "multipart/form-data; boundary=zz"),
                        (b"--zz\r\n\r\n", "multipart/form-data; boundary=zz"), (b'{"content": 1}', "application/json"),
                        (b"content=abc", "application/x-www-form-urlencoded"), (png, "image/png"),
                        (b'--zz\r\nContent-Disposition: form-data; name="content"; filename="\xff\xfe.png"\r\n\r\n'
                         b"abc\r\n--zz--\r\n", "multipart/form-data; boundary=zz"),
                        (b'--zz\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"a": "\xff\xfe"}\r\n--zz\r\n'
                         b'Content-Disposition: form-data; name="content"; filename="a"\r\n\r\nabc\r\n--zz--\r\n',
                         "multipart/form-data; boundary=zz")):
        out.append(("POST", "/v1/files", {"content": body, "headers": {"content-type": ctype}}))
    for file_id in ("x", "a" * 26, "%00", "..%2F..%2Fetc%2Fpasswd", "ü" * 50, "a" * 5000):
        out.append(("GET", f"/v1/files/{file_id}", {}))
        out.append(("DELETE", f"/v1/files/{file_id}", {}))
        out.append(("GET", f"/v1/predictions/{file_id}", {}))
        out.append(("POST", f"/v1/predictions/{file_id}/cancel", {}))
        out.append(("GET", f"/v1/predictions/{file_id}/stream", {}))
        out.append(("GET", f"/outputs/{file_id}/{file_id}/out-0.png", {}))
    # The list's query parameters.
    cursors = ["x", "", "====", "b:1", base64.urlsafe_b64encode(b"b:abc").decode(),
               base64.urlsafe_b64encode(b"b:99999999999999999999999999").decode(),
               base64.urlsafe_b64encode(b"a:-99999999999999999999999999").decode(),
               base64.urlsafe_b64encode(b"\xff\xfe:1").decode(), base64.urlsafe_b64encode(b"z:1").decode(),
               base64.urlsafe_b64encode(b"b:1e400").decode(), "%00", "a" * 10_000]
    dates = ["x", "", "2024-13-45", "99999-01-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
             "1e400", "2024-01-01T00:00:00Z\x00", "-1", "2024-02-30"]
    for cursor in cursors:
        out.append(("GET", "/v1/predictions", {"params": {"cursor": cursor}}))
    for date in dates:
        out.append(("GET", "/v1/predictions", {"params": {"created_after": date}}))
        out.append(("GET", "/v1/predictions", {"params": {"created_before": date, "cursor": cursors[1]}}))
    out.append(("GET", "/v1/predictions", {"params": [("cursor", "a"), ("cursor", "b")]}))
    return out


def test_hundreds_of_hostile_inputs_get_no_5xx(server_factory):
    server = server_factory("--max-queue", "1000")
    valid = quick_input(8)
    cases = hostile_requests(valid)
    assert len(cases) >= 300
    accepted, statuses, problems = [], {}, []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, kw in cases:
            if "json" in kw:  # ASCII JSON, so that lone surrogates travel as escapes
                kw = {**kw, "content": json.dumps(kw.pop("json")).encode(),
                      "headers": {"content-type": "application/json", **kw.get("headers", {})}}
            if "prefer" in kw.get("headers", {}):  # `Prefer: wait=N` may rightly hold the answer up to 60 s
                kw = {**kw, "timeout": 70}
            try:
                r = client.request(method, path, **kw)
            except httpx.TransportError as exc:
                problems.append(("no answer", method, path[:80], repr(kw)[:160], repr(exc)))
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            shown = (method, path[:80], repr(kw)[:160], r.status_code, r.text[:200])
            if r.status_code >= 500:
                problems.append(shown)
            elif r.status_code >= 400 and not r.headers.get("content-type", "").startswith(PROBLEM):
                problems.append(("not problem+json",) + shown)
            elif r.status_code == 201 and path.endswith("/predictions"):
                accepted.append(r.json()["id"])
    assert not problems, "\n".join(map(str, problems[:20]))
    found = wait_terminal(server.url, accepted, timeout=120)
    stuck = {pid: p["status"] for pid, p in found.items() if p["status"] not in ("succeeded", "failed")}
    assert not stuck
    assert all(p["error"] is None or isinstance(p["error"], str) for p in found.values())
    unclear = [(p["input"].get("image", "")[:60], p["error"]) for p in found.values()
               if p["error"] and p["error"].startswith("Internal error")]
    assert not unclear, unclear  # a hostile input is the caller's fault: say what is wrong with it
    assert httpx.get(server.url + "/health").json()["status"] in ("READY", "BUSY")
    print(f"\nhostile: {len(cases)} requests, answers {dict(sorted(statuses.items()))}, 5xx 0; "
          f"{len(accepted)} predictions accepted, all ended "
          f"({sum(p['status'] == 'succeeded' for p in found.values())} succeeded, "
          f"{sum(p['status'] == 'failed' for p in found.values())} failed)")


HEADER_VALUES_PER_NAME = 2700
DOCUMENTED_CANCEL_AFTER = re.compile(r"\s*(?:(?:[0-9]+(?:\.[0-9]+)?[hms])+|[0-9]+(?:\.[0-9]+)?)\s*", re.IGNORECASE)


def hostile_header_values(name: str, count: int, seed: int) -> list[bytes]:
    """``count`` odd values for one header: random bytes, huge numbers, near misses of valid values."""
    import random

    rng = random.Random(seed)
    printable = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
    near = {
        "Prefer": [b"wait", b"wait=", b"wait=0", b"wait=-1", b"wait=1e9", b"wait=0x10", b"wait=\xb2", b"wait=\"5\"",
                   b"respond-async, wait=", b"wait=5;x", b"wait==5", b"WAIT=", b"wait=" + b"9" * 5000],
        "Cancel-After": [b"1d", b"-5s", b"4s", b"4.999s", b"1e3", b"5 m", b"s", b"m5", b"0x10s", b"\xb2s", b"5ms",
                         b"9" * 300, b"1h" * 200, b"nan", b"inf", b"5.s", b".5h"],
        "Authorization": [b"Bearer", b"Bearer ", b"Token", b"Basic " + base64.b64encode(b"a:b"), b"bearer  x",
                          b"Bearer " + b"x" * 8000, b"\xff\xfe", b"Token " + TOKEN.encode() + b"\x80"],
        "Content-Type": [b"application/json; charset=\xff", b"application/json; charset=nope", b"text/json",
                         b"application/x-json+json", b"multipart/form-data", b"multipart/form-data; boundary=",
                         b"application/json;;;;", b"*/*", b"application/", b"/json", b"application/json" * 100],
    }[name]
    values = list(near)
    while len(values) < count:
        kind = rng.randrange(6)
        if kind == 0:
            value = bytes(rng.choice(printable) for _ in range(rng.randrange(0, 200)))
        elif kind == 1:
            value = str(rng.randrange(10 ** rng.randrange(1, 30))).encode() * rng.randrange(1, 300)
        elif kind == 2:
            value = (rng.choice(near) + bytes(rng.choice(printable) for _ in range(rng.randrange(1, 20))))
        elif kind == 3:
            value = bytes(rng.choice(b"0123456789.hms ,;=-+eE") for _ in range(rng.randrange(1, 40)))
        elif kind == 4:
            value = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 30))).encode("utf-8")
        else:
            value = rng.choice(near)[: rng.randrange(0, 20)] + b"\t" + bytes(rng.choice(printable) for _ in range(5))
        values.append(value.strip(b" \t"))
    if name == "Cancel-After":  # only invalid ones: a valid deadline would rightly create a prediction
        values = [v for v in values if not DOCUMENTED_CANCEL_AFTER.fullmatch(v.decode("latin-1"))]
    return values[:count]


def count_predictions(server: LiveServer) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{server.data_dir / 'flux-fill.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


def test_ten_thousand_hostile_header_values_get_no_5xx_and_create_nothing(server_factory):
    """Prefer, Cancel-After, Authorization and Content-Type, each with thousands of odd values on an
    otherwise valid create. Every request fails (an invalid Cancel-After rides along with the other
    headers; the token server refuses the wrong tokens), none with a 5xx or a dropped connection, and
    no prediction is written."""
    import h11

    server = server_factory("--api-token", TOKEN, "--log-level", "warning")
    body = json.dumps({"input": quick_input(8)}).encode()
    good = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Cancel-After": "never"}
    before = count_predictions(server)
    statuses: dict[int, int] = {}
    problems, sent = [], 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for index, name in enumerate(("Prefer", "Cancel-After", "Authorization", "Content-Type")):
            for value in hostile_header_values(name, HEADER_VALUES_PER_NAME, seed=index):
                headers = {**good, name: value}
                try:
                    r = client.post(MODEL_PATH, content=body, headers=headers)
                except h11.LocalProtocolError:
                    continue  # a value HTTP/1.1 itself cannot carry: never reaches any server
                except httpx.LocalProtocolError:
                    continue
                except httpx.TransportError as exc:
                    problems.append(("no answer", name, value[:80], repr(exc)))
                    continue
                sent += 1
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500 or r.status_code < 400 or not r.headers["content-type"].startswith(PROBLEM):
                    problems.append((r.status_code, name, value[:80], r.text[:200]))
    assert not problems, "\n".join(map(str, problems[:20]))
    assert sent >= 10_000, sent
    assert count_predictions(server) == before
    assert "Traceback" not in server.log()
    print(f"\nhostile headers: {sent} requests, answers {dict(sorted(statuses.items()))}, 5xx 0, predictions written 0")
