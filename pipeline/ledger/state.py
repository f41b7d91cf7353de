"""What a ledger says: a status per row (half a byte), and :func:`replay`, which reads it back.

Replay applies the events of the ledger in order: an intent puts its rows in flight, an attempt
that left them unsent (``retry``, ``throttled``, ``fatal``, ``split``) puts those still in flight
back to pending, a recipient line sets its row's status; a row's status is its last event's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from pipeline.ledger.format import RECIPIENT, UNSENT_ATTEMPTS, parse_header

__all__ = ("LedgerState", "Status", "StatusArray", "recipient_lines", "replay")


class Status(enum.IntEnum):
    """A row's state, half a byte per row in :class:`LedgerState` (values fit 4 bits)."""

    PENDING = 0
    INFLIGHT = 1
    SENT = 2
    FAILED = 3
    REJECTED = 4
    UNKNOWN = 5
    DEFERRED = 6


BY_NAME = {
    b"sent": Status.SENT,
    b"failed": Status.FAILED,
    b"rejected": Status.REJECTED,
    b"unknown": Status.UNKNOWN,
    b"deferred": Status.DEFERRED,
}
_BY_INITIAL = bytes(next((st for name, st in BY_NAME.items() if name[0] == i), 0) for i in range(256))
_WINDOW = 1 << 20  # rows per bulk read
_LOW_NIBBLE = bytes(b & 15 for b in range(256))
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))


class StatusArray:
    """A status per row, two rows a byte (a status fits 4 bits): 5 MB for 10M rows.

    Rows ``0 .. len(self) - 1`` have room; a row past the end reads as ``PENDING``
    through :meth:`LedgerState.get`. Bulk reads go through numpy.
    """

    __slots__ = ("_packed",)

    def __init__(self) -> None:
        self._packed = bytearray()

    def __len__(self) -> int:
        return 2 * len(self._packed)

    def __bool__(self) -> bool:
        return bool(self._packed)

    def __getitem__(self, row: int) -> int:
        b = self._packed[row >> 1]
        return b >> 4 if row & 1 else b & 15

    def __setitem__(self, row: int, value: int) -> None:
        i = row >> 1
        b = self._packed[i]
        self._packed[i] = (b & 0x0F) | (value << 4) if row & 1 else (b & 0xF0) | value

    def reserve(self, row: int) -> None:
        """Room for rows up to ``row``, a MiB (2M rows) at a time: growing by half would
        leave up to half the array unused (a flat-memory goal)."""
        need = (row >> 1) + 1 - len(self._packed)
        if need > 0:
            self._packed.extend(bytes(max(need, 1 << 20)))

    def unpack(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One byte per row for rows ``start .. stop - 1`` (clipped to the array)."""
        stop = len(self) if stop is None else min(stop, len(self))
        start = min(max(start, 0), stop)
        packed = np.frombuffer(self._packed, np.uint8)[start >> 1 : (stop + 1) >> 1]
        rows = np.empty(2 * len(packed), np.uint8)
        rows[0::2] = packed & 15
        rows[1::2] = packed >> 4
        skew = start & 1
        return rows[skew : skew + stop - start]

    def _windows(self, start: int, stop: int | None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, unpacked statuses) over the range, 1M rows at a time: bulk reads of a
        100M-row array never unpack it whole."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(max(start, 0), stop, _WINDOW):
            yield lo, self.unpack(lo, min(lo + _WINDOW, stop))

    def flags(self, table: bytes | bytearray, start: int = 0, stop: int | None = None) -> bytes:
        """``table[status]`` for each row in the range (as ``bytes.translate`` would)."""
        lookup = np.frombuffer(table, np.uint8)
        return b"".join(lookup[rows].tobytes() for _, rows in self._windows(start, stop))

    def first(self, table: bytes | bytearray, start: int = 0) -> int:
        """The first row from ``start`` whose ``table[status]`` is non-zero, or -1."""
        lookup = np.frombuffer(table, np.uint8)
        for lo, rows in self._windows(start, None):
            hits = np.flatnonzero(lookup[rows])
            if len(hits):
                return lo + int(hits[0])
        return -1

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The statuses of ``rows`` (each with room), one byte each."""
        packed = np.frombuffer(self._packed, np.uint8)[rows >> 1]
        out: np.ndarray = np.where(rows & 1, packed >> 4, packed & 15).astype(np.uint8)
        return out

    def count(self, value: int, start: int = 0, stop: int | None = None) -> int:
        return sum(int(np.count_nonzero(rows == value)) for _, rows in self._windows(start, stop))

    def rows_with(self, *values: int) -> list[int]:
        out: list[int] = []
        for lo, rows in self._windows(0, None):
            out.extend((np.flatnonzero(np.isin(rows, values)) + lo).tolist())
        return out

    def histogram(self) -> list[int]:
        """Rows per status value (0-15), a MiB at a time (np.bincount would widen every
        byte to 8; translating the whole array would copy it twice)."""
        counts = [0] * 16
        packed = self._packed
        for lo in range(0, len(packed), _WINDOW >> 1):
            part = packed[lo : lo + (_WINDOW >> 1)]
            low, high = part.translate(_LOW_NIBBLE), part.translate(_HIGH_NIBBLE)
            for v in range(16):
                counts[v] += low.count(v) + high.count(v)
        return counts

    def set_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """``self[rows[i]] = values[i]``; rows distinct and all with room."""
        packed = np.frombuffer(self._packed, np.uint8)
        values = values.astype(np.uint8)
        low = (rows & 1) == 0
        at, v = rows[low] >> 1, values[low]
        packed[at] = (packed[at] & 0xF0) | v
        at, v = rows[~low] >> 1, values[~low]
        packed[at] = (packed[at] & 0x0F) | (v << 4)
        del packed  # release the buffer export, so the bytearray can grow again

    def set_many(self, rows: Sequence[int], value: int) -> None:
        """``self[row] = value`` for each row (all with room); each run of consecutive rows
        (a batch is one, or a few with rejected rows between) is set a byte at a time."""
        n = len(rows)
        if not n:
            return
        first = 0
        for i in range(1, n):
            if rows[i] != rows[i - 1] + 1:
                self._set_run(rows[first], rows[i - 1], value)
                first = i
        self._set_run(rows[first], rows[n - 1], value)

    def _set_run(self, lo: int, hi: int, value: int) -> None:
        if lo & 1:
            self[lo] = value
            lo += 1
        if not hi & 1 and hi >= lo:
            self[hi] = value
            hi -= 1
        if hi > lo:
            self._packed[lo >> 1 : (hi >> 1) + 1] = bytes((value * 17,)) * ((hi - lo + 1) >> 1)


@dataclass
class LedgerState:
    """What a ledger says, half a byte per row: small enough for 100M rows."""

    status: StatusArray = field(default_factory=StatusArray)
    eof_rows: int | None = None
    next_batch: int = 1
    open_intents: dict[int, list[int]] = field(default_factory=dict)
    bad_lines: int = 0
    torn_tail: int = 0
    version: int = 1  # the ledger's format (1: no version line)

    def reserve(self, row: int) -> None:
        self.status.reserve(row)

    def set(self, row: int, status: int) -> None:
        self.status.reserve(row)
        self.status[row] = status

    def get(self, row: int) -> Status:
        return Status(self.status[row]) if row < len(self.status) else Status.PENDING

    def counts(self) -> dict[str, int]:
        histogram = self.status.histogram()
        out = {s.name.lower(): histogram[s] for s in Status if s}
        seen = sum(out.values())
        out["pending"] = max(0, self.eof_rows - seen) if self.eof_rows is not None else 0
        return out


_BLOCK = 1 << 20  # bytes of ledger replayed at a time (larger blocks: slower, more memory)
_S_FIELD = b',"s":"'
_INITIAL = np.frombuffer(_BY_INITIAL, np.uint8)


def replay(path: Path, *, repair: bool = False) -> LedgerState:
    """Read a ledger into a :class:`LedgerState` without holding its lines.

    A torn last line (the process died mid-write) is ignored, and cut off the
    file when ``repair`` is true so that appends start on a fresh line.
    Rows still in flight at the end stay ``INFLIGHT``: the caller decides
    (``resume`` writes them as ``unknown``).

    The file is read a block at a time. The recipient lines (nearly all of them) are
    parsed with numpy, column-wise; the others (intents, attempts, the end of the
    source, the version line) one by one. A ledger in a format newer than this module
    reads raises :class:`~pipeline.ledger.format.LedgerVersionError`. Every line is an
    event on its rows, ordered by line, and a row's status is its last event's: the same
    as reading line by line, and faster.
    """
    state = LedgerState()
    if not path.exists():
        return state
    good_end = 0
    carry = b""
    first = True
    with path.open("rb") as f:
        while True:
            data = f.read(_BLOCK)
            if not data:
                break
            block = carry + data if carry else data
            if first and b"\n" in block:
                first = False
                state.version = parse_header(block[: block.index(b"\n") + 1]) or 1
            end = block.rfind(b"\n") + 1
            if end == 0:
                carry = block
                continue
            carry = block[end:]
            _replay_block(block[:end], state)
            good_end += end
    if carry:
        state.torn_tail = len(carry)
        if repair:
            with path.open("r+b") as f:
                f.truncate(good_end)
    return state


def recipient_lines(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The well-formed recipient lines among the lines ``starts``..``ends`` (the index of each
    line's newline) of ``buf``, read column-wise: their indexes among the lines, their rows and
    their status codes. Well formed: ``{"r":DIGITS,"s":"`` and a status word's initial."""
    # Recipient lines: {"r":N,"s":"word",... (at least 13 bytes before the newline)
    fast = ends - starts >= 13
    for k, byte in enumerate(RECIPIENT):
        fast &= buf[np.minimum(starts + k, len(buf) - 1)] == byte
    at = starts[fast] + 5
    line_end = ends[fast]
    rows = np.zeros(len(at), np.int64)
    digits = np.zeros(len(at), np.int64)
    going = np.ones(len(at), bool)
    for k in range(12):
        c = buf[np.minimum(at + k, line_end)].astype(np.int64)
        going &= (c >= 48) & (c <= 57)
        if not going.any():
            break
        rows = np.where(going, rows * 10 + (c - 48), rows)
        digits += going
    comma = at + digits
    ok = (digits > 0) & (digits <= 11) & (comma + 7 <= line_end)
    for k, byte in enumerate(_S_FIELD):
        ok &= buf[np.minimum(comma + k, line_end)] == byte
    codes = _INITIAL[buf[np.minimum(comma + 6, line_end)]]
    ok &= codes != 0
    return np.flatnonzero(fast)[ok], rows[ok], codes[ok]


def _replay_block(block: bytes, state: LedgerState) -> None:
    """Apply whole lines ``block`` (ending in a newline) to ``state``."""
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    fast_at, rows, codes = recipient_lines(buf, starts, ends)
    slow = np.ones(len(ends), bool)
    slow[fast_at] = False
    # Events: (row, index of the line, status); the index orders them within the block.
    slow_rows: list[int] = []
    slow_lines: list[int] = []
    slow_counts: list[int] = []
    slow_codes: list[int] = []
    for i in np.flatnonzero(slow).tolist():
        start = int(starts[i])
        event = _replay_line(block[start : int(ends[i]) + 1], state)
        if event is not None:
            slow_rows.extend(event[0])
            slow_lines.append(i)
            slow_counts.append(len(event[0]))
            slow_codes.append(event[1])
    all_rows = np.concatenate((rows, np.array(slow_rows, np.int64)))
    if not len(all_rows):
        return
    all_codes = np.concatenate((codes, np.repeat(np.array(slow_codes, np.uint8), slow_counts)))
    lines = np.concatenate((fast_at, np.repeat(np.array(slow_lines, np.int64), slow_counts)))
    # The last event of each row: sort by (row, line), keep each row's final one. Rows have
    # at most 11 digits, a block fewer than 2^26 lines: the key fits in 63 bits.
    key = all_rows * len(ends) + lines
    order = np.argsort(key, kind="stable")
    sorted_rows = all_rows[order]
    sorted_codes = all_codes[order]
    # "Back to pending if still in flight" depends on the row's state just before: resolved
    # in order (rare: the rows of attempts that were refused before being processed).
    status = state.status
    for j in np.flatnonzero(sorted_codes == _IF_INFLIGHT).tolist():
        row = int(sorted_rows[j])
        if j and sorted_rows[j - 1] == row:
            before = int(sorted_codes[j - 1])
        else:
            before = status[row] if row < len(status) else 0
        sorted_codes[j] = _PENDING if before == _INFLIGHT else before
    last = np.ones(len(order), bool)
    last[:-1] = sorted_rows[1:] != sorted_rows[:-1]
    final_rows = sorted_rows[last]
    state.reserve(int(final_rows[-1]))
    status.set_rows(final_rows, sorted_codes[last])


_INFLIGHT, _PENDING = int(Status.INFLIGHT), int(Status.PENDING)
_IF_INFLIGHT = 15  # an event, not a status: PENDING if the row is INFLIGHT, else no change


def _replay_line(line: bytes, state: LedgerState) -> tuple[list[int], int] | None:
    """One line other than a well-formed recipient line: its event (rows, status), if any."""
    if line.startswith(RECIPIENT):
        comma = line.find(_S_FIELD, 5)
        st = _BY_INITIAL[line[comma + 6]] if comma > 5 and len(line) > comma + 6 else 0
        digits = line[5:comma]
        if not st or not digits.isdigit():
            state.bad_lines += 1
            return None
        return [int(digits)], st
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        state.bad_lines += 1
        return None
    if not isinstance(obj, dict):
        state.bad_lines += 1
        return None
    if "i" in obj:
        rows = obj.get("r")
        if not isinstance(obj["i"], int) or not isinstance(rows, list):
            state.bad_lines += 1
            return None
        state.open_intents[obj["i"]] = rows
        state.next_batch = max(state.next_batch, obj["i"] + 1)
        return rows, _INFLIGHT
    if "b" in obj:
        rows = state.open_intents.pop(obj["b"], [])
        if obj.get("s") in UNSENT_ATTEMPTS and rows:
            # Provably not processed (a split call was refused whole): the rows still in
            # flight go back to pending; a split's parts have their own intents.
            return rows, _IF_INFLIGHT
    elif "eof" in obj:
        state.eof_rows = obj["eof"]
    return None
