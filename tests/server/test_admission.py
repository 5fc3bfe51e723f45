"""The checks a create passes before anything is written: pure functions, tested as tables."""

from __future__ import annotations

import pytest

from server.admission import Wait, parse_cancel_after, parse_prefer, url_problem
from server.catalog import VERSION_ID, resolve_version
from server.protocol import ApiError


@pytest.mark.parametrize("header, expected", [
    (None, None), ("", None), ("respond-async", None), ("wait=abc", None), ("wait=-1", None), ("wait=1.5", None),
    ("wait", Wait(60, False)), ("WAIT", Wait(60, False)), ("wait=", None),
    ("wait=5", Wait(5, True)), ("wait=0", Wait(1, True)), ("wait=000007", Wait(7, True)), ("wait=61", Wait(60, True)),
    ("wait=" + "9" * 5000, Wait(60, True)), ('wait="12"', Wait(12, True)), ("respond-async, wait=7", Wait(7, True)),
    (" wait = 12 ; foo=bar", Wait(12, True)), ("wait=\u00b2", None),
])
def test_prefer(header, expected):
    """RFC 7240 preferences; Replicate documents wait=n with n in 1..60 (HTTP API reference, Prefer)."""
    assert parse_prefer(header) == expected
    if expected:
        assert expected.applied == (f"wait={expected.seconds}" if expected.explicit else "wait")


@pytest.mark.parametrize("header, seconds", [
    (None, None), ("30", 30), ("30s", 30), ("90s", 90), ("5m", 300), ("15m", 900), ("1h", 3600), ("2h30m", 9000),
    ("1h30m45s", 5445), ("5", 5), (" 45 ", 45), ("1.5h", 5400), ("30S", 30),
])
def test_cancel_after_as_documented(header, seconds):
    """Replicate's HTTP API reference, Cancel-After: s, m, h suffixes, combinable, seconds without a
    suffix, at least 5 seconds."""
    assert parse_cancel_after(header) == seconds


@pytest.mark.parametrize("header", ["", "soon", "4", "4.9s", "0", "-5s", "1d", "5 m", "1e3", "s", "5ms", "nan",
                                    "1h" * 200, "9" * 5000, "\u00b2s", "5.s", ".5h"])
def test_cancel_after_refused(header):
    with pytest.raises(ApiError) as err:
        parse_cancel_after(header)
    assert err.value.problem.status == 400 and "Cancel-After" in err.value.problem.detail


@pytest.mark.parametrize("value, data_ok, problem", [
    ("data:image/png;base64,AAAA", True, None), ("http://example.com/a.png", True, None),
    ("https://example.com:8443/a.png?x=1", True, None), ("  https://example.com/a.png ", True, None),
    ("data:image/png;base64,AAAA", False, "must be an http(s) URL, not data:"),
    ("data:image/png;base64", True, "is not a valid data URI (no comma)"),
    ("not a url", True, "must be a data: URI or an http(s) URL, not a plain string"),
    ("file:///etc/passwd", True, "must be a data: URI or an http(s) URL, not file:"),
    ("http:///x.png", True, "has no host"), ("http://[::1:1/x", True, "is not a valid URL"),
    ("http://127.0.0.1:99999/x", True, "is not a valid URL"), ("", True, "must be a data: URI or an http(s) URL, not a plain string"),
])
def test_url_problem(value, data_ok, problem):
    assert url_problem(value, allow_data=data_ok) == problem


@pytest.mark.parametrize("value, version", [
    ("black-forest-labs/flux-fill-dev", "hidden"), ("hidden", "hidden"), (VERSION_ID, VERSION_ID),
    (f"black-forest-labs/flux-fill-dev:{VERSION_ID}", VERSION_ID),
])
def test_versions_accepted(value, version):
    assert resolve_version(value) == version


@pytest.mark.parametrize("value", ["0" * 64, "deadbeef", "black-forest-labs/flux-fill-dev:deadbeef", "acme/other",
                                   f"acme/other:{VERSION_ID}", "black-forest-labs/flux-fill-dev:hidden", "", ":",
                                   VERSION_ID.upper()])
def test_versions_refused_as_replicate_refuses_them(value):
    with pytest.raises(ApiError) as err:
        resolve_version(value)
    assert err.value.problem.status == 422 and err.value.problem.title == "Invalid version or not permitted"
