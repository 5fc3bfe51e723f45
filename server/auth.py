"""API tokens and the tenants they stand for.

``Authorization: Bearer <t>`` or the legacy ``Token <t>``, or BFL's ``x-key: <t>`` (the same
tokens), compared in constant time. Each token
is a tenant: it sees, cancels and reads only the predictions and files it made. ``NAME:TOKEN``
names the tenant, so several tokens can share one; an admin token sees everything. With no tokens
at all there is one implicit tenant and everything is visible, as on a loopback-only server.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from .protocol import ApiError, unauthenticated
from .settings import split_token

ADMIN = "admin"  # the owner recorded for an admin's own predictions and files


@dataclass(frozen=True)
class Caller:
    """Who is asking. ``tenant`` is the owner recorded on what it creates: a bare token's tenant is
    the first 16 hex digits of its SHA-256 (as recorded before tenants had names), a named one
    ``tenant:NAME``, an admin ``admin``, and None when the server has no tokens."""

    tenant: str | None
    admin: bool = False

    @property
    def sees_everything(self) -> bool:
        """An admin, or the one implicit tenant of a server without tokens."""
        return self.admin or self.tenant is None

    @property
    def scope(self) -> str | None:
        """The owner that lists are filtered by; None: every row."""
        return None if self.sees_everything else self.tenant

    @property
    def has_quotas(self) -> bool:
        """Quotas bound the tenants of tokens; neither an admin nor a server without tokens has any."""
        return not self.sees_everything

    def sees(self, owner: str | None) -> bool:
        return self.sees_everything or owner == self.tenant


NOBODY = Caller(tenant=None)  # the implicit tenant of a server without tokens


def tenant_of(name: str | None, token: str) -> str:
    if name is not None:
        return f"tenant:{name}"
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Auth:
    def __init__(self, tokens: list[str], rate_limit_per_minute: int = 0, admin_tokens: list[str] = ()):
        self.known: list[tuple[bytes, Caller]] = []
        for spec in tokens:
            name, token = split_token(spec)
            self.known.append((hashlib.sha256(token.encode()).digest(), Caller(tenant_of(name, token))))
        for token in admin_tokens:
            self.known.append((hashlib.sha256(token.encode()).digest(), Caller(ADMIN, admin=True)))
        self.rate = rate_limit_per_minute
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.known)

    def token_of(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
        key = request.headers.get("x-key", "").strip()
        return key or None

    def identify(self, request: Request) -> Caller | None:
        """The caller of a valid token, NOBODY when the server has no tokens, else None."""
        if not self.enabled:
            return NOBODY
        token = self.token_of(request)
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, caller in self.known:  # every token compared, in constant time
            if hmac.compare_digest(digest, known) and found is None:
                found = caller
        return found

    def check(self, request: Request) -> Caller:
        """The caller, or raise 401."""
        caller = self.identify(request)
        if caller is None:
            raise unauthenticated()
        return caller

    def charge(self, caller: Caller) -> None:
        """A token bucket per tenant for creates; 429 with Retry-After when empty."""
        if not self.rate or caller.tenant is None:
            return
        key = caller.tenant
        with self.lock:
            t = time.monotonic()
            tokens, last = self.buckets.get(key, (float(self.rate), t))
            tokens = min(float(self.rate), tokens + (t - last) * self.rate / 60.0)
            if tokens < 1.0:
                wait = int((1.0 - tokens) * 60.0 / self.rate) + 1
                self.buckets[key] = (tokens, t)
                raise ApiError(429, f"Rate limit of {self.rate} predictions a minute reached.", "Too Many Requests",
                               headers={"Retry-After": str(wait)})
            self.buckets[key] = (tokens - 1.0, t)
