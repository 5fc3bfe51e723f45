"""Webhook delivery against a real HTTP receiver on loopback, signatures checked by the official client."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time

import pytest
from replicate.webhook import Webhooks, WebhookSigningSecret

from server.webhooks import EVENTS, WebhookSender, new_secret, sign

LIMIT_S = 8.0  # every test's wall-clock bound


def run(coro):
    """Run one test's coroutine with a hard time bound."""
    return asyncio.run(asyncio.wait_for(coro, LIMIT_S))


@dataclasses.dataclass
class Request:
    path: str
    headers: dict
    body: bytes
    at: float

    @property
    def json(self):
        return json.loads(self.body)


class Receiver:
    """A minimal HTTP/1.1 server on 127.0.0.1 that records each request and answers by plan.

    plan[path] is a list consumed one item per request to that path: an int is the status to
    answer (3xx ones carry `Location: /target`), ("sleep", s) sleeps then answers 200. An empty
    or absent plan answers 200.
    """

    def __init__(self):
        self.requests: list[Request] = []
        self.plan: dict[str, list] = {}
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, condition, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; got {[(r.path, r.body) for r in self.requests]}"
            await asyncio.sleep(0.01)

    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            _, path, _ = request_line.split(" ")
            headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines if line))
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            self.requests.append(Request(path, headers, body, time.monotonic()))
            todo = self.plan.get(path) or [200]
            action = todo.pop(0) if self.plan.get(path) else todo[0]
            status = 200
            if isinstance(action, tuple):
                await asyncio.sleep(action[1])
            else:
                status = action
            location = "location: /target\r\n" if 300 <= status < 400 else ""
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n{location}\r\n".encode())
            await writer.drain()
        finally:
            writer.close()
            self._handlers.discard(task)


def snapshot_of(prediction_id: str, **fields):
    return lambda: {"id": prediction_id, "status": "processing", "logs": "", **fields}


async def started(secret: str | None = None, **options) -> WebhookSender:
    sender = WebhookSender(secret or new_secret(), **options)
    await sender.start()
    return sender


def test_sign_reproduces_the_spec_test_vector():
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                     b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_new_secret_is_32_random_bytes_behind_whsec():
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    assert EVENTS == ("start", "output", "logs", "completed")


def test_deliveries_verify_with_the_official_client_and_keep_order():
    async def scenario():
        secret = new_secret()
        async with Receiver() as receiver:
            receiver.plan["/hook?token=abc"] = [("sleep", 0.2)]  # start answers slowly
            sender = await started(secret)
            url = receiver.url("/hook?token=abc")
            sender.notify("p1", url, None, "start", snapshot_of("p1", logs="start"))
            sender.notify("p1", url, None, "logs", snapshot_of("p1", logs="logs"))
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
            sender.notify("p1", url, None, "completed", snapshot_of("p1", status="succeeded", logs="completed"))
            await receiver.wait_for(lambda: len(receiver.requests) == 3)
            await sender.close()
        assert [r.json["logs"] for r in receiver.requests] == ["start", "logs", "completed"]
        assert receiver.requests[1].at - receiver.requests[0].at >= 0.19  # logs waited for start's answer
        assert receiver.requests[-1].json["status"] == "succeeded"
        for request in receiver.requests:
            assert request.headers["content-type"] == "application/json"
            assert request.headers["user-agent"] == "flux-fill-server"
            assert request.headers["webhook-id"].startswith("msg_")
            assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
            Webhooks.validate(headers=request.headers, body=request.body.decode(),
                              secret=WebhookSigningSecret(key=secret), tolerance=60)
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 3
        assert sender.stats == {"delivered": 3, "failed": 0, "retried": 0, "dropped": 0}

    run(scenario())


def test_events_filter_drops_unlisted_events_and_forgets_the_prediction():
    async def scenario():
        async with Receiver() as receiver:
            sender = await started(throttle_s=0.2)
            filters = {"p1": ["completed"], "p2": [], "p3": ["start", "logs"], "p4": ["output"]}
            for prediction_id, events_filter in filters.items():
                for event in ("start", "output", "logs", "logs", "completed", "logs"):
                    sender.notify(prediction_id, receiver.url(f"/{prediction_id}"), events_filter, event,
                                  snapshot_of(prediction_id, logs=event))
            await receiver.wait_for(lambda: len(receiver.requests) == 4)
            await asyncio.sleep(0.4)
            assert not sender._channels  # nothing kept once every prediction completed
            await sender.close()
        # p3 and p4 did not ask for completed: their last throttled send still goes out.
        assert sorted((r.path, r.json["logs"]) for r in receiver.requests) == [
            ("/p1", "completed"), ("/p3", "logs"), ("/p3", "start"), ("/p4", "output")]
        assert len(receiver.requests) == 4

    run(scenario())


def test_a_burst_of_logs_is_coalesced_and_the_last_send_has_the_newest_state():
    async def scenario():
        async with Receiver() as receiver:
            sender = await started(throttle_s=0.5)
            state = {"logs": ""}
            snapshot = lambda: {"id": "p1", "status": "processing", "logs": state["logs"]}  # noqa: E731
            sender.notify("p1", receiver.url("/hook"), None, "start", snapshot)
            for step in range(20):
                state["logs"] += f"step {step}\n"
                sender.notify("p1", receiver.url("/hook"), None, "logs", snapshot)
                await asyncio.sleep(0.005)
            await asyncio.sleep(1.0)
            logs_sends = receiver.requests[1:]
            assert 1 <= len(logs_sends) <= 3
            assert logs_sends[-1].json["logs"].endswith("step 19\n")
            for earlier, later in zip(logs_sends, logs_sends[1:]):
                assert later.at - earlier.at >= 0.45
            await sender.close()

    run(scenario())


def test_no_output_or_logs_are_sent_once_completed_is_queued():
    async def scenario():
        async with Receiver() as receiver:
            sender = await started(throttle_s=0.3)
            url = receiver.url("/hook")
            sender.notify("p1", url, None, "logs", snapshot_of("p1", logs="first"))  # sent at once
            await receiver.wait_for(lambda: len(receiver.requests) == 1)
            sender.notify("p1", url, None, "output", snapshot_of("p1", logs="throttled"))  # waits 0.3 s
            sender.notify("p1", url, None, "completed", snapshot_of("p1", logs="final"))
            sender.notify("p1", url, None, "logs", snapshot_of("p1", logs="late"))
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
            await asyncio.sleep(0.5)
            await sender.close()
        assert [r.json["logs"] for r in receiver.requests] == ["first", "final"]

    run(scenario())


def test_completed_is_retried_after_two_500s_under_one_webhook_id():
    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/hook"] = [500, 500]
            sender = await started(retry_for_s=3, backoff_base_s=0.05)
            sender.notify("p1", receiver.url("/hook"), None, "completed", snapshot_of("p1", status="succeeded"))
            await receiver.wait_for(lambda: len(receiver.requests) == 3)
            await asyncio.sleep(0.05)
            await sender.close()
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
        assert receiver.requests[2].at - receiver.requests[1].at >= 0.09  # backoff doubled
        assert sender.stats == {"delivered": 1, "failed": 0, "retried": 2, "dropped": 0}

    run(scenario())


def test_another_apis_signer_replaces_the_standard_signature_on_every_attempt():
    """BFL's style: X-BFL-Signature, the hex HMAC-SHA256 of the raw body, in place of webhook-signature."""
    import hashlib
    import hmac

    from server.webhooks import sign_bfl

    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/hook"] = [500]
            sender = await started(retry_for_s=3, backoff_base_s=0.05)
            sender.notify("p1", receiver.url("/hook"), ["completed"], "completed",
                          snapshot_of("p1", status="Ready"),
                          signer=lambda body: {"X-BFL-Signature": sign_bfl("k3y", body)})
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
            await sender.close()
        for request in receiver.requests:
            assert request.headers["x-bfl-signature"] == \
                "sha256=" + hmac.new(b"k3y", request.body, hashlib.sha256).hexdigest()
            assert "webhook-signature" not in request.headers
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1

    run(scenario())


def test_only_completed_is_retried_and_retries_stop_after_retry_for_s():
    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/start"] = [500]
            receiver.plan["/done"] = [503] * 100
            sender = await started(retry_for_s=0.6, backoff_base_s=0.05)
            sender.notify("p1", receiver.url("/start"), None, "start", snapshot_of("p1"))
            sender.notify("p2", receiver.url("/done"), None, "completed", snapshot_of("p2"))
            began = time.monotonic()
            await receiver.wait_for(lambda: sender.stats["failed"] == 2)
            assert time.monotonic() - began < 1.5
            await sender.close()
        assert len(receiver.to("/start")) == 1
        assert 4 <= len(receiver.to("/done")) <= 7  # at 0, .05, .15, .35, .6 s (ish)

    run(scenario())


def test_a_redirect_is_a_failure_and_is_never_followed():
    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/hook"] = [302] * 100
            sender = await started(retry_for_s=0.3, backoff_base_s=0.05)
            sender.notify("p1", receiver.url("/hook"), None, "completed", snapshot_of("p1"))
            await receiver.wait_for(lambda: sender.stats["failed"] == 1)
            await sender.close()
        assert len(receiver.to("/hook")) >= 2 and not receiver.to("/target")
        assert sender.stats["delivered"] == 0

    run(scenario())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.1"])
def test_private_addresses_are_refused_without_allow_private(host):
    async def scenario():
        async with Receiver() as receiver:
            sender = await started(allow_private=False, retry_for_s=1, backoff_base_s=0.05)
            url = receiver.url("/hook").replace("127.0.0.1", host)
            sender.notify("p1", url, None, "start", snapshot_of("p1"))
            sender.notify("p1", url, None, "completed", snapshot_of("p1"))
            await asyncio.sleep(0.3)
            await sender.close()
        assert not receiver.requests
        assert sender.stats == {"delivered": 0, "failed": 0, "retried": 0, "dropped": 2}

    run(scenario())


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "not a url", "http://"])
def test_only_http_urls_are_posted_to(url):
    async def scenario():
        sender = await started(retry_for_s=1, backoff_base_s=0.05)
        sender.notify("p1", url, None, "completed", snapshot_of("p1"))
        await asyncio.sleep(0.1)
        await sender.close()
        assert sender.stats["dropped"] == 1 and sender.stats["retried"] == 0

    run(scenario())


def test_a_slow_receiver_stalls_neither_the_caller_nor_other_predictions():
    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/slow"] = [("sleep", 5)]
            sender = await started(timeout_s=10)
            began = time.monotonic()
            sender.notify("slow", receiver.url("/slow"), None, "start", snapshot_of("slow"))
            sender.notify("slow", receiver.url("/slow"), None, "completed", snapshot_of("slow"))
            sender.notify("fast", receiver.url("/fast"), None, "start", snapshot_of("fast"))
            sender.notify("fast", receiver.url("/fast"), None, "completed", snapshot_of("fast"))
            assert time.monotonic() - began < 0.05  # notify returns at once
            await receiver.wait_for(lambda: len(receiver.to("/fast")) == 2, timeout=1.0)
            assert len(receiver.to("/slow")) == 1  # still waiting on its first answer
            closing = time.monotonic()
            await sender.close(drain_s=0.2)
            assert time.monotonic() - closing < 1.0
        assert sender.stats["delivered"] == 2 and sender.stats["dropped"] == 2

    run(scenario())


def test_a_receiver_slower_than_timeout_s_is_a_failure():
    async def scenario():
        async with Receiver() as receiver:
            receiver.plan["/hook"] = [("sleep", 3)]
            sender = await started(timeout_s=0.3)
            sender.notify("p1", receiver.url("/hook"), None, "start", snapshot_of("p1"))
            await receiver.wait_for(lambda: sender.stats["failed"] == 1, timeout=1.5)
            await sender.close()

    run(scenario())


def test_notify_never_raises():
    async def scenario():
        sender = WebhookSender(new_secret())
        sender.notify("p1", "http://127.0.0.1:9/", None, "start", snapshot_of("p1"))  # not started
        await sender.start()

        def broken():
            raise RuntimeError("no snapshot")

        sender.notify("p1", "http://127.0.0.1:9/", None, "bogus", broken)
        sender.notify("p1", "http://127.0.0.1:9/", None, "start", broken)
        sender.notify("p1", "http://127.0.0.1:9/", None, "completed", {"not": "callable"})
        await asyncio.sleep(0.1)
        await sender.close()
        sender.notify("p2", "http://127.0.0.1:9/", None, "start", snapshot_of("p2"))  # closed
        assert sender.stats["dropped"] == 4

    run(scenario())


def test_notify_from_another_thread_is_handed_to_the_loop():
    async def scenario():
        async with Receiver() as receiver:
            sender = await started()
            await asyncio.to_thread(sender.notify, "p1", receiver.url("/hook"), None, "completed", snapshot_of("p1"))
            await receiver.wait_for(lambda: len(receiver.requests) == 1)
            await sender.close()

    run(scenario())


def test_a_slow_receiver_holds_only_its_own_slots_and_delays_no_other_receiver():
    """Twenty predictions' webhooks to a receiver that takes 3 s to answer, then one to another
    receiver: that one arrives at once. The slow one never has more than its four slots."""
    async def scenario():
        async with Receiver() as slow, Receiver() as fast:
            slow.plan["/hook"] = [("sleep", 3)] * 20
            sender = await started(timeout_s=10, max_concurrency=16, max_per_destination=4)
            for i in range(20):
                sender.notify(f"slow{i}", slow.url("/hook"), None, "completed", snapshot_of(f"slow{i}"))
            await asyncio.sleep(0.2)
            began = time.monotonic()
            sender.notify("fast", fast.url("/hook"), None, "completed", snapshot_of("fast"))
            await fast.wait_for(lambda: len(fast.requests) == 1, timeout=1.0)
            took = time.monotonic() - began
            assert len(slow.requests) == 4  # in flight to the slow receiver: its four slots, no more
            await sender.close(drain_s=0.1)
        assert took < 0.5, took

    run(scenario())
