"""The ledger's byte format: its version line, its statuses and how a line starts.

Format 2 (this module writes it) begins with a version line; format 1 (ledgers written before
it) has none and no ``throttled`` attempt status. Both are read the same way otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import orjson

from pipeline.errors import SluiceError
from providers.base import Outcome

__all__ = (
    "VERSION",
    "LedgerVersionError",
    "header_line",
    "json_text",
    "keyed_lines",
    "parse_header",
    "read_version",
)

VERSION = 2
_HEADER_PREFIX = b'{"ledger":'

# Line starts: a recipient, an intent, an attempt (what an intent came to).
RECIPIENT = b'{"r":'
INTENT = b'{"i":'
ATTEMPT = b'{"b":'

RECIPIENT_STATUSES = ("sent", "failed", "rejected", "unknown", "deferred")
# Attempt statuses that leave the rows of their intent unsent (back to pending if still in
# flight): "throttled" and "retry" are sent again, "fatal" stopped the run, "split" is sent
# in parts with intents of their own.
UNSENT_ATTEMPTS = ("retry", "throttled", "fatal", "split")

OUTCOME_STATUS = {
    Outcome.SENT: "sent",
    Outcome.FAILED: "failed",
    Outcome.SPLIT: "failed",  # a recipient alone whose call was refused for it
    Outcome.UNKNOWN: "unknown",
    Outcome.DEFER: "deferred",
    Outcome.THROTTLED: "deferred",
    Outcome.RETRY: "deferred",
    Outcome.FATAL: "deferred",
}


class LedgerVersionError(SluiceError):
    """The ledger was written in a format newer than this sluice reads."""


def header_line(version: int = VERSION) -> bytes:
    """The first line of a ledger of format ``version``."""
    return b"%s%d}\n" % (_HEADER_PREFIX, version)


def parse_header(line: bytes) -> int | None:
    """The version a first line names, or None when it is no version line (format 1)."""
    if not line.startswith(_HEADER_PREFIX):
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    version = obj.get("ledger") if isinstance(obj, dict) else None
    if not isinstance(version, int) or version < 1:
        return None
    if version > VERSION:
        raise LedgerVersionError(
            f"the ledger is in format {version}; this sluice reads formats up to {VERSION}: upgrade sluice"
        )
    return version


def read_version(first_line: bytes) -> int:
    """A ledger's format from its first line (1 when it has no version line)."""
    return parse_header(first_line) or 1


def json_text(text: str) -> bytes:
    """A JSON string; undecodable source bytes (surrogate escapes) written as ``\\xNN``."""
    try:
        return orjson.dumps(text)
    except TypeError:
        clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return orjson.dumps(clean)


# What JSON must escape in a string; undecodable bytes (lone surrogates) fail the encode.
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def keyed_lines(head: bytes, rows: Sequence[int], keys: Sequence[str]) -> bytes:
    """``head % row + b',"k":' + json_text(key) + b"}\n"`` for each (row, key), with one
    formatting call for the whole batch when no key needs escaping (keys are ids, usually)."""
    if _NEEDS_ESCAPE.search("".join(keys)) is None:
        try:
            line = head.decode() + ',"k":"%s"}\n'
            flat = [x for pair in zip(rows, keys, strict=True) for x in pair]
            return (line * len(rows) % tuple(flat)).encode()
        except UnicodeEncodeError:
            pass
    return b"".join(
        [head % row + b',"k":' + json_text(key) + b"}\n" for row, key in zip(rows, keys, strict=True)]
    )
