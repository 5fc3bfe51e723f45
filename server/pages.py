"""Cursor pages, as Replicate's list routes give them: newest first, 100 a page, and absolute
``next``/``previous`` URLs carrying an opaque ``cursor``.

A cursor is a row's sequence number and a direction; the store answers "the rows older than" or
"newer than" it. Predictions and files page the same way.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlencode

from .protocol import ApiError

PAGE_SIZE = 100


@dataclass(frozen=True)
class Window:
    """Which rows a cursor asks for: older than ``before`` or newer than ``after`` (or the newest)."""

    before: int | None = None
    after: int | None = None


def parse_cursor(cursor: str | None) -> Window:
    if not cursor:
        return Window()
    try:
        direction, seq = base64.urlsafe_b64decode(cursor.encode() + b"==").decode().split(":", 1)
        seq = int(seq)
        if direction not in ("a", "b") or not 0 <= seq < 2**63:  # SQLite integers are 64-bit
            raise ValueError(cursor)
    except Exception:
        raise ApiError(400, "The cursor is not valid.", "Bad Request") from None
    return Window(before=seq) if direction == "b" else Window(after=seq)


@dataclass
class Page:
    rows: Sequence[Any]  # records, each with ``seq``
    next: str | None
    previous: str | None


def paginate(fetch: Callable[..., Sequence[Any]], window: Window, list_url: str,
             query: dict[str, str] | None = None, size: int = PAGE_SIZE) -> Page:
    """One page of ``fetch(limit=, before_seq=, after_seq=)`` (records newest first, each with ``seq``)
    and the links to its neighbours; ``query`` is kept in the links (filters)."""
    rows = fetch(limit=size + 1, before_seq=window.before, after_seq=window.after)
    has_more = len(rows) > size
    if window.after is not None:  # the page just newer than the cursor; rows are newest first
        rows = rows[1:] if has_more else rows
        older, newer = bool(rows), has_more
    else:
        rows = rows[:size]
        older, newer = has_more, window.before is not None and bool(rows)

    def link(direction: str, record: Any) -> str:
        token = base64.urlsafe_b64encode(f"{direction}:{record.seq}".encode()).decode().rstrip("=")
        return f"{list_url}?{urlencode({'cursor': token, **(query or {})})}"

    return Page(rows=rows, next=link("b", rows[-1]) if older else None,
                previous=link("a", rows[0]) if newer else None)
