"""A prediction's long input strings, stored apart from its row.

A client may send a 90 MB data URI as ``image``. Kept in the row, it would be read back with every
list page, webhook body and queue scan. So at create every string of the input longer than
``INLINE_LIMIT`` characters (at any depth, whatever its key) is written to a file of its own
(:meth:`FileStore.write_inputs`) and the row keeps the rest of the input with ``""`` in its place,
plus where each one stood (``input_blobs``: ``[{"path": [...], "name": ..., "index": n}]``).

The input is then shown in two forms:

- exactly as sent (create, get and cancel answers): the stored strings are streamed from their
  files into the JSON body (:mod:`server.bodies`), never held whole in memory;
- with each stored string replaced by the URL at which this server serves it (list pages and
  webhook bodies): ``<base>/inputs/<prediction id>/<token>/<name>``, unguessable like output URLs.
  A data URI is served as its bytes (as its image type when it is one, else as a download),
  any other string as UTF-8 text.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from inference.images import ACCEPTED_TYPES

INLINE_LIMIT = 4096  # characters: longer input strings are stored apart from the row
CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
# Types served as what they say: the images the engine reads. Anything else is a download, so that
# a client's data URI is never served as a page (HTML, SVG, ...) of this server's origin.
IMAGE_TYPES = frozenset(ACCEPTED_TYPES.values())
_BASE64_ALPHABET = re.compile(rb"[^A-Za-z0-9+/]")


@dataclass(frozen=True)
class Stored:
    """One string stored apart: where it stood (keys and list indices from the input's root), the
    name in its URL, and its file's index."""

    path: list
    name: str
    index: int

    @classmethod
    def of(cls, ref: dict) -> "Stored":
        return cls(path=list(ref["path"]), name=ref["name"], index=int(ref["index"]))

    def ref(self) -> dict:
        return {"path": self.path, "name": self.name, "index": self.index}


def split(sent: dict[str, Any], limit: int = INLINE_LIMIT) -> tuple[dict[str, Any], list[Stored], list[str]]:
    """The input with every string longer than ``limit`` blanked, where they stood, and the strings."""
    inline = dict(sent)
    stored: list[Stored] = []
    values: list[str] = []
    stack: list[tuple[Any, list]] = [(inline, [])]
    while stack:  # no recursion: a hostile input may nest deeply
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, str) and len(value) > limit:
                index = len(values)
                top = len(path) == 0 and isinstance(key, str) and _SAFE_NAME.fullmatch(key)
                stored.append(Stored(path=[*path, key], name=key if top else f"value-{index}", index=index))
                values.append(value)
                node[key] = ""
            elif isinstance(value, (dict, list)) and value:
                copy = dict(value) if isinstance(value, dict) else list(value)
                node[key] = copy
                stack.append((copy, [*path, key]))
    return inline, stored, values


def fill(inline: dict[str, Any], stored: list[Stored], value_of: Callable[[Stored], Any]) -> dict[str, Any]:
    """A copy of the row's input with ``value_of(s)`` where each stored string stood; the row's
    containers are copied along the way, never changed."""
    out = dict(inline)
    copied: dict[tuple, Any] = {(): out}
    for item in stored:
        node, prefix = out, ()
        try:
            for key in item.path[:-1]:
                prefix += (key,)
                if prefix not in copied:
                    child = node[key]
                    copied[prefix] = node[key] = dict(child) if isinstance(child, dict) else list(child)
                node = copied[prefix]
            node[item.path[-1]] = value_of(item)
        except (KeyError, IndexError, TypeError):  # a row edited by hand: show what is there
            continue
    return out


def utf8_size(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode("utf-8"))


# -- serving a stored string -----------------------------------------------------------------------

def _head(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read(1024)


def served_form(path: Path) -> tuple[str, bool]:
    """(media type, whether the body is a download) of a stored string as its URL serves it."""
    head = _head(path)
    if head[:5].lower() == "data:" and "," in head:
        media = head[5:head.index(",")].split(";")[0].strip().lower()
        return (media, False) if media in IMAGE_TYPES else ("application/octet-stream", True)
    return "text/plain; charset=utf-8", False


def served_bytes(path: Path) -> Iterator[bytes]:
    """The bytes a stored string stands for, read from its file a chunk at a time: a data URI's
    decoded content, or any other string's UTF-8 text."""
    head = _head(path)
    if not (head[:5].lower() == "data:" and "," in head):
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        return
    header = head[:head.index(",")]
    offset = len(header.encode("utf-8")) + 1
    with open(path, "rb") as fh:
        fh.seek(offset)
        if not header.lower().endswith(";base64"):
            yield urllib.parse.unquote_to_bytes(fh.read())
            return
        rest = b""
        while chunk := fh.read(CHUNK):
            rest += _BASE64_ALPHABET.sub(b"", chunk)
            whole = len(rest) - len(rest) % 4
            if whole:
                yield base64.b64decode(rest[:whole])
                rest = rest[whole:]
        if len(rest) > 1:
            try:
                yield base64.b64decode(rest + b"=" * (-len(rest) % 4))
            except binascii.Error:
                pass
