"""Typed readers of a ledger: its events in order, and the final state of every settled row.

The operator tools (status, report, export, reconcile) and the daily cap read the ledger
through these; no other module parses its bytes. Lines are read whole: a torn last line (a
kill mid-write) and damaged lines are skipped (``replay`` counts them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.ledger.format import ATTEMPT, INTENT, RECIPIENT, parse_header

__all__ = (
    "Attempt",
    "Eof",
    "Event",
    "FinalState",
    "Header",
    "Intent",
    "Recipient",
    "events",
    "final_outcomes",
    "final_states",
)


@dataclass(frozen=True, slots=True)
class Header:
    """The version line (format 2 on): only ever the first event."""

    version: int


@dataclass(frozen=True, slots=True)
class Intent:
    """A request about to leave: batch ``batch``'s attempt ``attempt`` for ``rows``."""

    batch: int
    attempt: int
    out_id: str
    rows: list[int]
    time: float | None
    parent: int | None  # the refused batch this one is a part of


@dataclass(frozen=True, slots=True)
class Attempt:
    """What an attempt came to: an outcome's word (``sent``, ``failed``, ``unknown``,
    ``deferred``, ``mixed``: per recipient) or ``retry``, ``throttled``, ``fatal``, ``split``
    (its rows were not settled by it). Format-1 ledgers write throttles as ``retry``."""

    batch: int
    attempt: int
    status: str
    code: str | None
    provider_id: str | None
    retry_after: float | None
    message: str | None  # kept for endpoint stops only: sluice's words
    ms: float | None
    time: float | None


@dataclass(frozen=True, slots=True)
class Recipient:
    """A row's outcome: ``sent``, ``failed``, ``rejected``, ``unknown`` or ``deferred``."""

    row: int
    status: str
    key: str
    batch: int | None
    code: str | None
    provider_id: str | None
    reason: str | None  # the provider's or the check's words


@dataclass(frozen=True, slots=True)
class Eof:
    """The source ended with ``rows`` rows."""

    rows: int


Event = Header | Intent | Attempt | Recipient | Eof


def _lines(path: Path) -> Iterator[bytes]:
    """Whole lines; none when the ledger does not exist."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if line.endswith(b"\n"):
                yield line


def _event(line: bytes, first: bool) -> Event | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    try:
        if "r" in obj and "s" in obj:
            return _recipient(obj)
        if "i" in obj:
            rows = list(obj["r"])
            return Intent(obj["i"], obj.get("a", 1), obj.get("o", ""), rows, obj.get("t"), obj.get("p"))
        if "b" in obj:
            return Attempt(
                obj["b"],
                obj.get("a", 1),
                obj["s"],
                obj.get("c"),
                obj.get("id"),
                obj.get("ra"),
                obj.get("m"),
                obj.get("ms"),
                obj.get("t"),
            )
        if "eof" in obj:
            return Eof(obj["eof"])
        if first and (version := parse_header(line)) is not None:
            return Header(version)
    except (KeyError, TypeError):
        pass
    return None


def _recipient(obj: dict[str, Any]) -> Recipient:
    row = obj["r"]
    key = obj.get("k", str(row))
    return Recipient(row, obj["s"], key, obj.get("b"), obj.get("c"), obj.get("id"), obj.get("e"))


def events(path: Path, *, recipients: bool = True) -> Iterator[Event]:
    """The ledger's events in order. ``recipients=False`` skips the recipient lines unparsed
    (nearly all of a ledger): for readers of intents and attempts only."""
    first = True
    for line in _lines(path):
        if not recipients and line.startswith(RECIPIENT):
            first = False
            continue
        event = _event(line, first)
        first = False
        if event is not None:
            yield event


@dataclass(frozen=True, slots=True)
class FinalState:
    """A settled row's last word: its recipient line, with its batch's provider id and time."""

    row: int
    key: str
    status: str
    code: str | None
    provider_id: str | None
    batch: int | None
    time: float | None  # the time of its batch's attempt
    reason: str | None


def _row_of(line: bytes) -> int | None:
    end = line.find(b",", 5)
    digits = line[5:end]
    return int(digits) if end > 5 and digits.isdigit() else None


def _intent_rows(line: bytes) -> list[int]:
    try:
        rows = orjson.loads(line).get("r")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, int) and r >= 0] if isinstance(rows, list) else []


def _final_lines(path: Path) -> tuple[Iterator[bytes], dict[int, tuple[str | None, float | None]]]:
    """The recipient lines that are their row's last word, in ledger order, and per batch its
    provider id and time. Two passes: the first counts each row's lines (recipients and
    intents: a row sent again after its last outcome is in flight, not settled), a byte per row."""
    remaining = bytearray()
    beyond: dict[int, int] = {}  # the counts of rows with more than 255 lines
    batches: dict[int, tuple[str | None, float | None]] = {}

    def bump(row: int) -> None:
        if row >= len(remaining):
            remaining.extend(bytes(row + 1 - len(remaining) + len(remaining) // 2))
        if remaining[row] == 255:
            beyond[row] = beyond.get(row, 255) + 1
        else:
            remaining[row] += 1

    def last(row: int) -> bool:
        """Count one of the row's lines down: True for its last."""
        if row in beyond:
            beyond[row] -= 1
            if beyond[row] == 255:
                del beyond[row]
            return False
        remaining[row] -= 1
        return not remaining[row]

    for line in _lines(path):
        if line.startswith(RECIPIENT):
            row = _row_of(line)
            if row is not None:
                bump(row)
        elif line.startswith(INTENT):
            for row in _intent_rows(line):
                bump(row)
        elif line.startswith(ATTEMPT):
            event = _event(line, False)
            if isinstance(event, Attempt):
                batches[event.batch] = (event.provider_id, event.time)

    def last_words() -> Iterator[bytes]:
        for line in _lines(path):
            if line.startswith(RECIPIENT):
                row = _row_of(line)
                if row is not None and last(row):
                    yield line
            elif line.startswith(INTENT):
                for row in _intent_rows(line):
                    last(row)

    return last_words(), batches


def final_states(path: Path) -> Iterator[FinalState]:
    """Each settled row's final state, once per row, in ledger order. Rows whose last word is an
    intent (in flight when the process stopped) and rows never sent are not settled."""
    lines, batches = _final_lines(path)
    for line in lines:
        event = _event(line, False)
        if not isinstance(event, Recipient):
            continue
        batch_id, batch_time = (None, None) if event.batch is None else batches.get(event.batch, (None, None))
        yield FinalState(
            row=event.row,
            key=event.key,
            status=event.status,
            code=event.code,
            provider_id=event.provider_id or batch_id,
            batch=event.batch,
            time=batch_time,
            reason=event.reason,
        )


def final_outcomes(path: Path) -> Counter[tuple[str, str | None]]:
    """Settled rows by (final status, code): each row once, whatever was written before its last
    word. Only lines with a code are parsed (the rest is read by position)."""
    lines, _ = _final_lines(path)
    out: Counter[tuple[str, str | None]] = Counter()
    for line in lines:
        if b'"c":' in line:
            event = _event(line, False)
            if isinstance(event, Recipient):
                out[event.status, event.code] += 1
            continue
        start = line.find(b',"s":"') + 6
        out[line[start : line.find(b'"', start)].decode(), None] += 1
    return out
