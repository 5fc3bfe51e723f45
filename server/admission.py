"""What a create request must pass before anything is written: its headers (``Prefer``,
``Cancel-After``), its version, its file inputs and webhook URLs.

Each check is a pure function of the request; a failure raises :class:`ApiError` (4xx) and no
prediction exists. No header value, however long or odd, raises anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import catalog
from .protocol import ApiError, InvalidField, PredictionRequest, lone_surrogate_at, not_unicode, validation_failed

MAX_WAIT_S = 60
MIN_CANCEL_AFTER_S = 5.0
_HEADER_MAX = 256  # longer Cancel-After values are refused before they are parsed
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
FILE_INPUTS = ("image", "mask")


@dataclass(frozen=True)
class Wait:
    """``Prefer: wait`` (60 s) or ``wait=N`` (N in 1..60)."""

    seconds: int
    explicit: bool  # the client gave N

    @property
    def applied(self) -> str:
        """The ``Preference-Applied`` value."""
        return f"wait={self.seconds}" if self.explicit else "wait"


def parse_prefer(value: str | None) -> Wait | None:
    """The ``wait`` preference of a ``Prefer`` header (RFC 7240), or None. Other preferences, and a
    ``wait`` whose value is not a number, are ignored as RFC 7240 asks; N is clamped to 1..60."""
    for preference in (value or "").split(","):
        token, eq, rest = preference.split(";", 1)[0].partition("=")
        if token.strip().lower() != "wait":
            continue
        if not eq:
            return Wait(MAX_WAIT_S, explicit=False)
        number = rest.strip().strip('"')
        if number.isascii() and number.isdigit():
            digits = number.lstrip("0") or "0"  # never int() of thousands of digits
            seconds = MAX_WAIT_S if len(digits) > 2 else max(1, min(MAX_WAIT_S, int(digits)))
            return Wait(seconds, explicit=True)
    return None


def parse_cancel_after(value: str | None) -> float | None:
    """Seconds from a ``Cancel-After`` header, as Replicate documents it: a number with an optional
    unit suffix, ``s``, ``m`` or ``h`` (``30``, ``30s``, ``5m``, ``2h30m``, ``1h30m45s``); at least 5 s.
    Absent is None; anything else is a 400."""
    if value is None:
        return None
    text = value.strip().lower()
    seconds = None
    if len(text) <= _HEADER_MAX:
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds is None:
        raise ApiError(400, "Cancel-After must be a duration such as 30s, 5m, 2h30m or 45 (seconds).", "Bad Request")
    if seconds < MIN_CANCEL_AFTER_S:
        raise ApiError(400, f"Cancel-After must be at least {MIN_CANCEL_AFTER_S:g} seconds.", "Bad Request")
    return seconds


def url_problem(value: str, *, allow_data: bool) -> str | None:
    """Why ``value`` is not a URL this server can use, or None. Only the form is checked here; the
    host is resolved (and checked against --block-private-urls) when the URL is used."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if not parts.hostname:
                return "has no host"
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
            return None
    except ValueError:
        return "is not a valid URL"
    if scheme == "data" and allow_data:
        return None if "," in text else "is not a valid data URI (no comma)"
    allowed = "a data: URI or an http(s) URL" if allow_data else "an http(s) URL"
    return f"must be {allowed}, not {scheme + ':' if scheme else 'a plain string'}"


def check_body(body: PredictionRequest) -> None:
    """File inputs must be data: URIs or http(s) URLs (uploads' URLs included), webhooks http(s)
    URLs, and no string may hold a lone surrogate. One 422 lists every broken field."""
    bad = lone_surrogate_at({"input": body.sent_input, "version": body.version, "webhook": body.webhook,
                             "webhook_completed": body.webhook_completed})
    if bad:
        raise not_unicode(bad)
    fields = []
    for name in FILE_INPUTS:
        value = getattr(body.input, name)
        problem = url_problem(value, allow_data=True) if value is not None else None
        if problem:
            fields.append(InvalidField(type="format", field=f"input.{name}", description=f"{name} {problem}"))
    for name in ("webhook", "webhook_completed"):
        value = getattr(body, name)
        problem = url_problem(value, allow_data=False) if value is not None else None
        if problem:
            fields.append(InvalidField(type="format", field=name, description=f"{name} {problem}"))
    if fields:
        raise validation_failed(fields)


@dataclass(frozen=True)
class Admission:
    """A create that passed every check: what to write and how to answer."""

    version: str
    wait: Wait | None
    cancel_after_s: float | None


def admit(body: PredictionRequest, version: str | None, prefer: str | None, cancel_after: str | None) -> Admission:
    """Every check of a create, in order; ``version`` is the route's (None: the body's)."""
    wait = parse_prefer(prefer)
    cancel_after_s = parse_cancel_after(cancel_after)
    if version is None:
        if not body.version:
            raise validation_failed([InvalidField(type="required", field="version", description="version is required")])
        version = catalog.resolve_version(body.version)
    check_body(body)
    return Admission(version=version, wait=wait, cancel_after_s=cancel_after_s)
