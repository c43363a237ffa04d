"""Bytes from outside read within bounds: lines no longer than a limit, JSON no deeper than a limit.

A record is sized before it is parsed and its nesting measured before `json.loads` recurses into it:
one 30 MB dataset line took 9.3 GB of memory on its way through parsing and tokenizing, and a line
nested 200,000 deep raised RecursionError out of the parser, which failed its whole dataset version
(an adapter_config.json nested as deep was a 500). A record over a limit is one bad record, reported
where it is, like any other.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from adaptery.settings import Settings

READ_CHUNK = 1024 * 1024
# A JSON string, unrolled so a long one is one linear match: "[^"\\]*(?:\\.[^"\\]*)*"
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True)
class RecordLimits:
    """How large one record (a line, an element, a row, a document) and how deep its JSON may be."""

    max_bytes: int
    max_depth: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordLimits:
        return cls(max_bytes=settings.max_record_bytes, max_depth=settings.max_json_depth)

    def too_large(self, size: int | None = None) -> str:
        measured = f"{size} bytes, over" if size is not None else "over"
        return f"{measured} the limit of {self.max_bytes} bytes for one record: shorten or split it"

    def too_deep(self) -> str:
        return _too_deep(self.max_depth)


class UntrustedJSONError(ValueError):
    """Not JSON, or JSON over a limit; the message says which, for a person to fix."""


def _too_deep(max_depth: int) -> str:
    return f"nested deeper than {max_depth} levels of arrays and objects"


def json_depth(text: bytes | str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings may hold any brackets)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def too_long_number(text: bytes) -> str | None:
    """Where (`a.b[2]`) a JSON text has an integer too long for Python to convert (more than
    sys.get_int_max_str_digits() digits, a ValueError inside any parser); None when it has none."""
    limit = sys.get_int_max_str_digits()
    if not re.search(rb"\d{%d}" % (limit + 1), _JSON_STRING.sub(b'""', text)):
        return None
    marker = object()
    try:
        value = json.loads(text, parse_int=lambda digits: marker if len(digits.lstrip("-")) > limit else int(digits))
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if node is marker:
            return path or "body"
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(node))
    return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(text: bytes) -> str | None:
    """Where (`a.b[2]`) a JSON text holds a string with a lone UTF-16 surrogate (`"\\ud800"`: valid JSON, not
    text: every encoder, database driver and tokenizer raises on it); None when it has none."""
    if not _SURROGATE_ESCAPE.search(text):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(node, dict):
            for key, item in node.items():
                where = f"{path}.{key}" if path else str(key)
                stack.extend([(where, key), (where, item)])
        elif isinstance(node, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(node))
    return None


def loads(text: bytes | str, *, max_depth: int, max_bytes: int | None = None) -> Any:
    """`json.loads`, after the size and nesting are known to be within bounds; UntrustedJSONError otherwise
    (never RecursionError, and never the ValueError of a number too long to convert)."""
    size = len(text)
    if max_bytes is not None and size > max_bytes:
        raise UntrustedJSONError(f"{size} bytes, over the limit of {max_bytes} bytes")
    brackets = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if brackets > max_depth and json_depth(text) > max_depth:
        raise UntrustedJSONError(_too_deep(max_depth))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UntrustedJSONError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise UntrustedJSONError(f"not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise UntrustedJSONError(f"invalid JSON: {exc}") from None


@dataclass(frozen=True)
class LineTooLong:
    """A line over the limit, in place of its bytes: it was skipped while reading, never held whole."""

    size: int  # bytes, without the line ending


def bounded_lines(handle: BinaryIO, max_bytes: int) -> Iterator[bytes | LineTooLong]:
    """The lines of a binary file (each with its b"\\n", as iterating the file gives them), a line longer
    than `max_bytes` as LineTooLong. Memory stays within `max_bytes` plus one read, whatever a line's length."""
    line = bytearray()
    dropped = 0  # bytes of the current line already let go: it is over the limit
    while chunk := handle.read(READ_CHUNK):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end < 0 else end
            if dropped or len(line) + stop - start > max_bytes:
                dropped += len(line) + stop - start
                line.clear()
            else:
                line += chunk[start:stop]
            if end < 0:
                break
            yield LineTooLong(dropped) if dropped else bytes(line) + b"\n"
            line.clear()
            dropped = 0
            start = end + 1
    if dropped:
        yield LineTooLong(dropped)
    elif line:
        yield bytes(line)
