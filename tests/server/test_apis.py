"""Every API's errors in that API's shape, on every route of its own: the refusals the middleware
makes before a route runs (413 over the body limit, with or without a Content-Length; 408 for a body
that stalls), 405, 401 and a rate limit's 429. The shape is picked by one registry (server.apis),
so each API registered there is checked here the same way, on one server (a prefix, tokens, a small
body limit, a short body time and one create a minute per token)."""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest

from tests.helpers import LiveServer, box_mask, fast_input, noise_image, png_bytes

LIMIT = 100_000
PROBLEM = "application/problem+json"


def replicate_shape(r: httpx.Response, status: int) -> None:
    assert r.headers["content-type"] == PROBLEM, r.text
    body = r.json()
    assert body["status"] == status and body["detail"], body


def openai_shape(r: httpx.Response, status: int) -> None:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body


def detail_shape(r: httpx.Response, status: int) -> None:  # BFL's and Cog's: {"detail": ...}
    assert r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert set(body) == {"detail"} and body["detail"], body


@dataclass(frozen=True)
class Route:
    api: str
    path: str  # the create route
    body: Callable[[], dict]
    shape: Callable[[httpx.Response, int], None]
    token: str  # each API's creates are charged to a token of its own
    unauthenticated: int = 401  # BFL answers a bad key with 403
    headers: tuple = ()


def quick() -> dict:
    return fast_input(noise_image(64, 64, 3), box_mask(64, 64, (8, 8, 40, 40)))


def bfl_body() -> dict:
    def b64(img) -> str:
        return base64.b64encode(png_bytes(img)).decode()

    return {"image": b64(noise_image(64, 64, 4)), "mask": b64(box_mask(64, 64, (8, 8, 40, 40))), "prompt": "a door",
            "steps": 15}


ROUTES = [
    Route("replicate", "/v1/models/black-forest-labs/flux-fill-dev/predictions", lambda: {"input": quick()}, replicate_shape, "token-replicate"),
    Route("openai", "/v1/images/generations", lambda: {"prompt": "a door", "size": "64x64"}, openai_shape,
          "token-openai"),
    Route("bfl", "/v1/flux-pro-1.0-fill", bfl_body, detail_shape, "token-bfl", unauthenticated=403),
    Route("cog", "/cog/predictions", lambda: {"input": quick()}, detail_shape, "token-cog",
          headers=(("Prefer", "respond-async"),)),
]
IDS = [route.api for route in ROUTES]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    args = ["--weights", str(tiny_dir), "--prefix", "/replicate", "--max-body-bytes", str(LIMIT),
            "--body-timeout-s", "1", "--rate-limit-per-minute", "1"]
    for route in ROUTES:
        args += ["--api-token", route.token]
    server = LiveServer(tmp_path_factory.mktemp("apis") / "data", args=args).start()
    yield server
    server.stop()


def auth(route: Route) -> dict:
    return {"Authorization": f"Bearer {route.token}", **dict(route.headers)}


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
@pytest.mark.parametrize("prefix", ["", "/replicate"])
def test_a_body_over_the_limit_is_413_in_the_apis_shape(server, route, prefix):
    big = {**route.body(), "prompt": "x" * (LIMIT + 1)}
    declared = httpx.post(server.url + prefix + route.path, json=big, headers=auth(route), timeout=30)
    assert declared.status_code == 413
    route.shape(declared, 413)
    streamed = httpx.post(server.url + prefix + route.path, headers={**auth(route), "content-type": "application/json"},
                          content=iter([b'{"prompt": "', b"x" * (LIMIT + 1), b'"}']), timeout=30)
    assert streamed.status_code == 413
    route.shape(streamed, 413)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_a_stalled_body_is_408_in_the_apis_shape(server, route):
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(f"POST {route.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {route.token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro".encode())
        conn.settimeout(15)
        answer = b""
        while chunk := conn.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    content_type = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-type:"))
    response = httpx.Response(408, headers={"content-type": content_type.decode()}, content=body)
    route.shape(response, 408)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_a_wrong_method_is_405_in_the_apis_shape(server, route):
    r = httpx.delete(server.url + route.path, headers=auth(route))
    assert r.status_code == 405
    route.shape(r, 405)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_a_wrong_token_is_refused_in_the_apis_shape(server, route):
    r = httpx.post(server.url + route.path, json=route.body(), headers={**auth(route), "Authorization": "Bearer wrong"})
    assert r.status_code == route.unauthenticated
    route.shape(r, route.unauthenticated)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_the_rate_limit_is_429_in_the_apis_shape(server, route):
    answers = [httpx.post(server.url + route.path, json=route.body(), headers=auth(route), timeout=60)
               for _ in range(2)]
    assert answers[0].status_code < 300, answers[0].text  # one create a minute: the first goes through
    assert answers[1].status_code == 429
    route.shape(answers[1], 429)
    assert int(answers[1].headers["retry-after"]) >= 1


def test_the_rest_of_the_server_keeps_problem_json(server):
    r = httpx.get(server.url + "/v1/nothing/here", headers={"Authorization": "Bearer token-replicate"})
    assert r.status_code == 404
    replicate_shape(r, 404)
    r = httpx.get(server.url + "/cog/nothing/here", headers={"Authorization": "Bearer token-cog"})
    assert r.status_code == 404
    detail_shape(r, 404)


def test_the_registry_holds_every_api():
    from server.app import APIS

    names = {api.name or "replicate" for api in APIS}  # Replicate's predictions carry no api name
    assert names == {"replicate", "openai", "bfl", "cog"} and {route.api for route in ROUTES} == names
