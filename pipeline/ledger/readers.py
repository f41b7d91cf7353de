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

import numpy as np
import orjson

from pipeline.ledger.format import ATTEMPT, INTENT, RECIPIENT, parse_header
from pipeline.ledger.state import LedgerState, Status, recipient_lines, replay

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
    "follow",
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


def follow(path: Path, offset: int) -> tuple[list[Intent | Attempt], int]:
    """The intents and attempts of the whole lines after byte ``offset``, and the offset after
    them: for a reader that keeps up with a ledger still being written (the receipt listener)."""
    out: list[Intent | Attempt] = []
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return out, offset
    with f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            if line.startswith((INTENT, ATTEMPT)):
                event = _event(line, False)
                if isinstance(event, Intent | Attempt):
                    out.append(event)
    return out, offset


@dataclass(slots=True)  # not frozen: built once per row, and a frozen __init__ costs twice as much
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


_BLOCK = 1 << 20  # bytes read at a time by the final-state passes
_SETTLED = np.zeros(16, bool)
_SETTLED[[Status.SENT, Status.FAILED, Status.REJECTED, Status.UNKNOWN, Status.DEFERRED]] = True


def _blocks(path: Path) -> Iterator[bytes]:
    """The ledger's whole lines, about a MiB at a time (a torn last line left out)."""
    carry = b""
    with path.open("rb") as f:
        while data := f.read(_BLOCK):
            block = carry + data if carry else data
            end = block.rfind(b"\n") + 1
            carry = block[end:]
            if end:
                yield block[:end]


def _recipient_rows(block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The recipient lines of ``block`` as replay's fast path reads them (``recipient_lines``):
    (row, start, end) of each, the end being the index of its newline."""
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if not len(ends):
        return ends, ends, ends
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    index, rows, _ = recipient_lines(buf, starts, ends)
    return rows, starts[index], ends[index]


def _final_blocks(path: Path, state: LedgerState) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
    """The recipient lines that are the final word of a settled row, in ledger order: each row's
    last recipient line, unless the row was sent again since (``state``, the ledger's replay,
    says in flight or pending). Per block: (block, start, end) of those lines. Two passes,
    column-wise: the first counts each row's recipient lines (two bytes a row), the second
    counts them down and keeps the lines that reach zero."""
    if not path.exists():
        return
    size = len(state.status)
    remaining = np.zeros(size, np.uint16)  # a row with 65 535 lines or more would wrap: not in practice
    for block in _blocks(path):
        rows, _, _ = _recipient_rows(block)
        np.add.at(remaining, rows[rows < size], 1)
    for block in _blocks(path):
        rows, starts, ends = _recipient_rows(block)
        keep = rows < size
        rows, starts, ends = rows[keep], starts[keep], ends[keep]
        if not len(rows):
            continue
        order = np.argsort(rows, kind="stable")
        by_row = rows[order]
        last = np.ones(len(order), bool)  # the block's last line of each row
        last[:-1] = by_row[1:] != by_row[:-1]
        lines_per_row = np.diff(np.concatenate(([-1], np.flatnonzero(last))))
        block_rows = by_row[last]
        remaining[block_rows] -= lines_per_row.astype(np.uint16)
        final = (remaining[block_rows] == 0) & _SETTLED[state.status.take(block_rows)]
        at = np.sort(order[last][final])
        yield block, starts[at], ends[at]


def final_states(path: Path, state: LedgerState | None = None) -> Iterator[FinalState]:
    """Each settled row's final state, once per row, in ledger order. Rows in flight when the
    process stopped, sent again and not settled since, or never sent are not settled.
    ``state``: the ledger's :func:`replay`, if the caller has it."""
    state = state or replay(path)
    batches = {
        e.batch: (e.provider_id, e.time) for e in events(path, recipients=False) if isinstance(e, Attempt)
    }
    for block, starts, ends in _final_blocks(path, state):
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            try:
                obj = orjson.loads(block[start : end + 1])
                row, status = obj["r"], obj["s"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # damaged: replay counted it
            batch = obj.get("b")
            batch_id, batch_time = batches.get(batch, (None, None)) if batch is not None else (None, None)
            key, code, reason = obj.get("k", str(row)), obj.get("c"), obj.get("e")
            yield FinalState(row, key, status, code, obj.get("id") or batch_id, batch, batch_time, reason)


def final_outcomes(path: Path, state: LedgerState | None = None) -> Counter[tuple[str, str | None]]:
    """Settled rows by (final status, code): each row once, whatever was written before its last
    word. Only final lines with a code are parsed; the others are counted column-wise by the
    status ``state`` (the ledger's :func:`replay`, read if not given) holds for their row."""
    state = state or replay(path)
    out: Counter[tuple[str, str | None]] = Counter()
    plain = np.zeros(16, np.int64)  # final lines without a code, by status
    for block, starts, ends in _final_blocks(path, state):
        buf = np.frombuffer(block, np.uint8)
        marks = np.flatnonzero((buf[:-3] == 34) & (buf[1:-2] == 99) & (buf[2:-1] == 34) & (buf[3:] == 58))
        coded = np.zeros(len(starts), bool)  # lines holding '"c":'
        line_of = np.searchsorted(ends, marks)
        inside = line_of < len(ends)
        line_of, marks = line_of[inside], marks[inside]
        coded[line_of[marks >= starts[line_of]]] = True
        for i in np.flatnonzero(coded).tolist():
            event = _event(block[int(starts[i]) : int(ends[i]) + 1], False)
            if isinstance(event, Recipient):
                out[event.status, event.code] += 1
        rows, _, _ = _recipient_rows(_lines_of(block, starts[~coded], ends[~coded]))
        plain += np.bincount(state.status.take(rows), minlength=16)
    for status in Status:
        if plain[status]:
            out[status.name.lower(), None] += int(plain[status])
    return out


def _lines_of(block: bytes, starts: np.ndarray, ends: np.ndarray) -> bytes:
    return b"".join([block[s : e + 1] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
