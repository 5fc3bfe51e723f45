"""Tokens through the live server: every route but the public ones needs one, in each API's shape;
tokens never reach the log; the rate limit answers 429."""

from __future__ import annotations

import base64
import re
import secrets

import httpx

from tests.conftest import TOKEN
from tests.server.hostile import (MODEL_PATH, assert_problem, quick_input, wait_terminal)


PUBLIC_PATHS = {"/health", "/outputs/{prediction_id}/{token}/{name}", "/inputs/{prediction_id}/{token}/{name}",
                "/v1/predictions/{prediction_id}/stream", "/v1/predictions/{prediction_id}/preview"}
PARAMS = {"owner": "black-forest-labs", "name": "flux-fill-dev", "prediction_id": "a" * 26, "file_id": "b" * 26,
          "version_id": "abc123", "token": "t" * 32}


BFL_PATHS = {"/v1/flux-pro-1.0-fill", "/v1/flux-pro-1.0-expand", "/v1/get_result"}
OPENAI_PATHS = {"/v1/images/edits", "/v1/images/generations", "/v1/models/{name}"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], path)


def test_every_route_but_the_public_ones_needs_the_token(auth_server):
    schema = httpx.get(auth_server.url + "/openapi.json").json()
    operations = [(method.upper(), path) for path, item in schema["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")]
    assert len(operations) >= 14, operations
    wrong = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Token wrong-token"},
             {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"},
             {"Authorization": TOKEN}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}]
    checked = 0
    for method, path in operations:
        for prefix in ("", "/replicate"):
            url = auth_server.url + prefix + concrete(path)
            if path in PUBLIC_PATHS:
                r = httpx.request(method, url, timeout=10)
                assert r.status_code not in (401, 403) and r.status_code < 500, (method, path, r.status_code)
                continue
            for headers in wrong:
                r = httpx.request(method, url, headers=headers, json={} if method == "POST" else None, timeout=10)
                if path in BFL_PATHS:  # BFL's routes answer as BFL does: 403 in its words
                    assert r.status_code == 403, (method, path, r.status_code)
                    assert r.json() == {"detail": "Not authenticated - Invalid Authentication"}, (method, path)
                    checked += 1
                    continue
                if path in OPENAI_PATHS:  # OpenAI's routes answer in OpenAI's shape
                    assert r.status_code == 401, (method, path, r.status_code)
                    error = r.json()["error"]
                    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
                    checked += 1
                    continue
                body = assert_problem(r, 401)
                assert body["title"] == "Unauthenticated", (method, path)
                assert body["detail"] == "You did not pass a valid authentication token"
                checked += 1
            r = httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert r.status_code != 401 and r.status_code < 500, (method, path, r.status_code, r.text[:200])
    for public in ("/", "/replicate/", "/ui/app.js", "/openapi.json"):
        assert httpx.get(auth_server.url + public).status_code == 200, public
    print(f"\nauth: {len(operations)} operations x 2 prefixes, {checked} unauthenticated requests, all refused (401; BFL's 403)")


def test_tokens_are_never_logged_and_rate_limits_answer_429(server_factory):
    first, second = "tok-" + secrets.token_hex(16), "tok-" + secrets.token_hex(16)
    bad = "bad-" + secrets.token_hex(16)
    server = server_factory("--api-token", first, "--api-token", second, "--rate-limit-per-minute", "3",
                            "--log-level", "debug")
    auth = {"Authorization": f"Bearer {first}"}
    assert httpx.get(server.url + "/v1/predictions", headers=auth).status_code == 200
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Token {second}"}).status_code == 200
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
    assert httpx.get(server.url + "/v1/predictions", headers={"Authorization": f"Token {bad}"}).status_code == 401
    secret = httpx.get(server.url + "/v1/webhooks/default/secret", headers=auth).json()["key"]

    statuses = [httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers=auth).status_code
                for _ in range(3)]
    assert statuses == [201, 201, 201]
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers=auth)
    assert_problem(r, 429)
    assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60
    # Per token: the other token still has its own three.
    r = httpx.post(server.url + MODEL_PATH, json={"input": quick_input()}, headers={"Authorization": f"Bearer {second}"})
    assert r.status_code == 201
    # Invalid bodies are refused before they cost anything; reads are never rate limited.
    assert httpx.post(server.url + MODEL_PATH, json={"input": {}}, headers=auth).status_code == 422
    assert httpx.get(server.url + "/v1/predictions", headers=auth).status_code == 200

    wait_terminal(server.url, [p["id"] for p in httpx.get(server.url + "/v1/predictions", headers=auth).json()["results"]],
                  headers=auth)
    server.stop()
    log = server.log()
    assert "DEBUG" in log or "debug" in log.lower()  # the log really was at its most verbose
    for leaked in (first, second, bad, secret, secret.removeprefix("whsec_")):
        assert leaked not in log
