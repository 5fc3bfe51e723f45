"""API tokens: ``Authorization: Bearer <t>`` or the legacy ``Token <t>``, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

from fastapi import Request

from .protocol import ApiError, unauthenticated


class Auth:
    def __init__(self, tokens: list[str], rate_limit_per_minute: int = 0):
        self.digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        self.rate = rate_limit_per_minute
        self.buckets: dict[bytes, tuple[float, float]] = {}
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def token_of(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
        return None

    def check(self, request: Request) -> str | None:
        """The caller's identity (a token digest prefix), or raise 401. None when auth is off."""
        if not self.enabled:
            return None
        token = self.token_of(request)
        if token is None:
            raise unauthenticated()
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for known in self.digests:  # every token compared, in constant time
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise unauthenticated()
        return digest.hex()[:16]

    def charge(self, owner: str | None) -> None:
        """A token bucket per caller for creates; 429 with Retry-After when empty."""
        if not self.rate or owner is None:
            return
        with self.lock:
            t = time.monotonic()
            tokens, last = self.buckets.get(owner.encode(), (float(self.rate), t))
            tokens = min(float(self.rate), tokens + (t - last) * self.rate / 60.0)
            if tokens < 1.0:
                wait = int((1.0 - tokens) * 60.0 / self.rate) + 1
                self.buckets[owner.encode()] = (tokens, t)
                raise ApiError(429, f"Rate limit of {self.rate} predictions a minute reached.", "Too Many Requests",
                               headers={"Retry-After": str(wait)})
            self.buckets[owner.encode()] = (tokens - 1.0, t)
