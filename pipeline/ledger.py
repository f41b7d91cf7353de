"""Ledger: the append-only JSONL record of every recipient's fate.

Line shapes (short keys: these lines are most of a run's I/O)::

    {"i":7,"a":1,"o":"3f9c2a1b-7-1","r":[11,12,...],"t":1700000000.1}   intent: batch 7, attempt 1
    {"b":7,"a":1,"s":"sent","c":"OK","id":"9006^0","ms":41.2,"t":...}      what the attempt came to
    {"i":12,"a":1,"o":"3f9c2a1b-12-1","r":[11,...],"p":7,"t":...}          a part of refused batch 7
    {"r":11,"s":"sent","b":7,"k":"cust-11"}                                one line per recipient
    {"r":3,"s":"rejected","k":"cust-3","e":"invalid phone number ..."}
    {"r":12,"s":"failed","b":7,"c":"Failure","e":"Incorrect phone number format"}   the provider's reason
    {"eof":1000000}                                                         the source ended with N rows

An intent is written (to the OS, and fsynced if the durability mode asks) before
the request leaves. A recipient whose last word is an intent with no result is
``unknown`` on replay: the process died while its request was in flight.
The last recipient line for a row wins (a resumed ``deferred`` row becomes
``sent``). ``k`` is omitted when the key is the row number.
"""

from __future__ import annotations

import enum
import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from pipeline.errors import SluiceError
from providers.base import ENDPOINT_STOP_CODES, Batch, BatchOutcome, Outcome, RecipientOutcome

__all__ = (
    "Durability",
    "LedgerFault",
    "LedgerState",
    "LedgerWriter",
    "Status",
    "StatusArray",
    "replay",
)


class Status(enum.IntEnum):
    """A row's state, half a byte per row in :class:`LedgerState` (values fit 4 bits)."""

    PENDING = 0
    INFLIGHT = 1
    SENT = 2
    FAILED = 3
    REJECTED = 4
    UNKNOWN = 5
    DEFERRED = 6


_BY_NAME = {
    b"sent": Status.SENT,
    b"failed": Status.FAILED,
    b"rejected": Status.REJECTED,
    b"unknown": Status.UNKNOWN,
    b"deferred": Status.DEFERRED,
}
_BY_INITIAL = bytes(next((st for name, st in _BY_NAME.items() if name[0] == i), 0) for i in range(256))
_OUTCOME_STATUS = {
    Outcome.SENT: "sent",
    Outcome.FAILED: "failed",
    Outcome.SPLIT: "failed",  # a recipient alone whose call was refused for it
    Outcome.UNKNOWN: "unknown",
    Outcome.DEFER: "deferred",
    Outcome.THROTTLED: "deferred",
    Outcome.RETRY: "deferred",
    Outcome.FATAL: "deferred",
}


def _json_text(text: str) -> bytes:
    """A JSON string; undecodable source bytes (surrogate escapes) written as ``\\xNN``."""
    try:
        return orjson.dumps(text)
    except TypeError:
        clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return orjson.dumps(clean)


class LedgerFault(SluiceError):
    """The ledger could not be written (disk full, read-only, permissions, I/O error)."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = path
        self.error = error
        super().__init__(f"cannot write {path}: {error.strerror or error}")


class Durability(enum.Enum):
    """When the ledger reaches the disk.

    ``process``: every intent is written to the OS before its request leaves;
    survives a crash of the process (the default). ``batch``: also fsynced
    before the request leaves; survives a machine crash, at a syscall's cost
    per batch. ``interval``: like ``process``, plus an fsync every N ms;
    a machine crash loses at most that window.
    """

    PROCESS = "process"
    BATCH = "batch"
    INTERVAL = "interval"


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
        """``self[row] = value`` for each row; a run of consecutive rows (a batch, usually)
        is set a byte at a time."""
        if not rows:
            return
        lo, hi = rows[0], rows[-1]
        if hi - lo + 1 != len(rows) or list(rows) != list(range(lo, hi + 1)):
            for row in rows:
                self[row] = value
            return
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
_R_PREFIX = b'{"r":'
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
    source) one by one. Every line is an event on its rows, ordered by line, and a
    row's status is its last event's: the same as reading line by line, and faster.
    """
    state = LedgerState()
    if not path.exists():
        return state
    good_end = 0
    carry = b""
    with path.open("rb") as f:
        while True:
            data = f.read(_BLOCK)
            if not data:
                break
            block = carry + data if carry else data
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


def _replay_block(block: bytes, state: LedgerState) -> None:
    """Apply whole lines ``block`` (ending in a newline) to ``state``."""
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    # Recipient lines: {"r":N,"s":"word",... (at least 13 bytes before the newline)
    fast = ends - starts >= 13
    for k, byte in enumerate(_R_PREFIX):
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
    fast_at = np.flatnonzero(fast)
    slow = np.ones(len(ends), bool)
    slow[fast_at[ok]] = False
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
    all_rows = np.concatenate((rows[ok], np.array(slow_rows, np.int64)))
    if not len(all_rows):
        return
    all_codes = np.concatenate((codes[ok], np.repeat(np.array(slow_codes, np.uint8), slow_counts)))
    lines = np.concatenate((fast_at[ok], np.repeat(np.array(slow_lines, np.int64), slow_counts)))
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
    if line.startswith(_R_PREFIX):
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
        if obj.get("s") in ("retry", "fatal", "split") and rows:
            # Provably not processed (a split call was refused whole): the rows still in
            # flight go back to pending; a split's parts have their own intents.
            return rows, _IF_INFLIGHT
    elif "eof" in obj:
        state.eof_rows = obj["eof"]
    return None


class LedgerWriter:
    """Buffered appends; an intent flushes everything before it to the OS."""

    def __init__(
        self,
        path: Path,
        *,
        durability: Durability = Durability.PROCESS,
        fsync_interval: float = 1.0,
        buffer_bytes: int = 1 << 18,
        state: LedgerState | None = None,
        keyed: bool = True,
        checkpoint: Callable[[int], None] | None = None,
        on_fault: Callable[[LedgerFault], None] | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        self.path = path
        self._keyed = keyed  # False: keys are row numbers, never written
        self.state = state or LedgerState()  # kept in step with every recipient line
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise LedgerFault(path, exc) from None
        self._buf = bytearray()
        self._limit = buffer_bytes
        self._durability = durability
        self._fsync_interval = fsync_interval
        self._last_fsync = time.monotonic()
        self._checkpoint = checkpoint
        self._checkpointed = -1
        self._last_checkpoint = 0.0
        self.on_fault = on_fault
        self.fault: LedgerFault | None = None
        # Space set aside on the same disk, given back when the disk fills, so that the
        # results of the requests still in flight can be written (see _fail).
        self._reserve: Path | None = None
        if reserve_bytes > 0:
            self._reserve = path.with_name(path.name + ".reserve")
            try:
                fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, reserve_bytes)
                finally:
                    os.close(fd)
            except OSError:
                self._reserve.unlink(missing_ok=True)
                self._reserve = None
        self.counts: dict[str, int] = dict.fromkeys(("sent", "failed", "rejected", "unknown", "deferred"), 0)

    # -- writing ---------------------------------------------------------
    def _recipient(self, row: int, key: str, status: str, tail: bytes) -> None:
        self.state.set(row, _BY_NAME[status.encode()])
        if self._keyed and key != str(row):
            tail += b',"k":' + _json_text(key)
        self._buf += b'{"r":%d,"s":"%s"%s}\n' % (row, status.encode(), tail)

    def rejected(self, rejections: Iterable[tuple[int, str, str]]) -> None:
        n = 0
        for row, key, reason in rejections:
            self._recipient(row, key, "rejected", b',"e":' + orjson.dumps(reason))
            n += 1
        self.counts["rejected"] += n
        self._maybe_flush()

    def intent(self, batch: Batch) -> None:
        """Record that ``batch`` is about to be sent, and put it on the OS."""
        line: dict[str, object] = {
            "i": batch.id,
            "a": batch.attempt,
            "o": batch.out_id,
            "r": [m.row for m in batch.messages],
            "t": round(time.time(), 3),
        }
        if batch.parent is not None:
            line["p"] = batch.parent  # a part of a refused batch being split
        self._buf += orjson.dumps(line)
        self._buf += b"\n"
        if self.fault is None:
            self.flush(sync=self._durability is Durability.BATCH)
        if self.fault is not None:
            # Not sent: should the intent reach the disk later, this line puts its rows back.
            self._buf += b'{"b":%d,"a":%d,"s":"retry","c":"LedgerWriteFailed"}\n' % (batch.id, batch.attempt)
            raise self.fault

    def attempt(self, batch: Batch, result: BatchOutcome, status: str, latency_ms: float) -> None:
        """The batch-level line: what one attempt came to."""
        line: dict[str, object] = {"b": batch.id, "a": batch.attempt, "s": status}
        if result.code is not None:
            line["c"] = result.code
        if result.provider_id is not None:
            line["id"] = result.provider_id
        if result.retry_after is not None:
            line["ra"] = result.retry_after
        if status == "fatal" and result.message and result.code in ENDPOINT_STOP_CODES:
            line["m"] = result.message[:500]  # our transport's words (no provider text): for `status`
        line["ms"] = round(latency_ms, 1)
        line["t"] = round(time.time(), 3)
        self._buf += orjson.dumps(line)
        self._buf += b"\n"

    def outcome(self, batch: Batch, result: BatchOutcome, latency_ms: float) -> None:
        """The attempt's line and one line per recipient, in one buffered append."""
        per: Sequence[RecipientOutcome] | None = result.recipients
        status = _OUTCOME_STATUS[result.outcome] if per is None else "mixed"
        self.attempt(batch, result, status, latency_ms)
        b = b',"b":%d' % batch.id
        if per is None:
            tail = b
            if result.code is not None and result.outcome is not Outcome.SENT:
                tail += b',"c":' + orjson.dumps(result.code)
            # The hot path (every recipient of every batch): one formatted line each.
            msgs = batch.messages
            rows = [m.row for m in msgs]
            self.state.reserve(max(rows))
            self.state.status.set_many(rows, _BY_NAME[status.encode()])
            # a provider's code may hold '%': only the row is a format field
            head = b'{"r":%d,"s":"' + (status.encode() + b'"' + tail).replace(b"%", b"%%")
            if self._keyed:
                self._buf += b"".join([head % m.row + b',"k":' + _json_text(m.key) + b"}\n" for m in msgs])
            else:  # every line in one formatting call
                self._buf += ((head + b"}\n") * len(rows)) % tuple(rows)
            self.counts[status] += len(msgs)
        else:
            for m, r in zip(batch.messages, per, strict=True):
                st = _OUTCOME_STATUS[r.outcome]
                tail = b
                if r.code is not None and r.outcome is not Outcome.SENT:
                    tail += b',"c":' + orjson.dumps(r.code)
                if r.provider_id is not None:
                    tail += b',"id":' + orjson.dumps(r.provider_id)
                if r.message is not None and r.outcome is not Outcome.SENT:
                    tail += b',"e":' + _json_text(r.message)
                self._recipient(m.row, m.key, st, tail)
                self.counts[st] += 1
        self._maybe_flush()

    def settle(self, items: Iterable[tuple[int, str, str, str]]) -> None:
        """Lines for rows settled outside a send (reconciliation): (row, key, status, code)."""
        for row, key, status, code in items:
            self._recipient(row, key, status, b',"c":' + orjson.dumps(code))
            self.counts[status] += 1
        self._maybe_flush()

    def unknown_rows(self, rows: Iterable[int], code: str) -> int:
        """Settle rows whose intent has no result (used by resume and stop)."""
        tail = b',"c":' + orjson.dumps(code)
        n = 0
        for row in rows:
            self.state.set(row, Status.UNKNOWN)
            self._buf += b'{"r":%d,"s":"unknown"%s}\n' % (row, tail)
            n += 1
        self.counts["unknown"] += n
        self._maybe_flush()
        return n

    def eof(self, rows: int) -> None:
        self.state.eof_rows = rows
        self._buf += b'{"eof":%d}\n' % rows
        self.flush()

    # -- flushing --------------------------------------------------------
    def _maybe_flush(self) -> None:
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self, *, sync: bool = False) -> None:
        """Write the buffer to the OS (and the disk when asked). A failure of the disk does not
        raise: it is recorded in :attr:`fault` and reported once to ``on_fault``; the lines stay
        buffered and the next flush tries again; :meth:`intent` refuses from then on."""
        try:
            if self._buf:
                written = 0
                view = memoryview(self._buf)
                try:
                    while written < len(view):
                        written += os.write(self._fd, view[written:])
                except OSError:
                    # What was not written goes to a new buffer: the old one may still be
                    # exported to the frames of the traceback, and cannot be resized.
                    self._buf = bytearray(view[written:])
                    raise
                else:
                    view.release()
                    self._buf.clear()
                finally:
                    self._size += written
            if sync or (
                self._durability is Durability.INTERVAL
                and time.monotonic() - self._last_fsync >= self._fsync_interval
            ):
                os.fsync(self._fd)
                self._last_fsync = time.monotonic()
        except OSError as exc:
            self._fail(exc)
            return
        self._maybe_checkpoint(force=False)

    def _fail(self, exc: OSError) -> None:
        if self._reserve is not None and exc.errno == errno.ENOSPC:
            self._reserve.unlink(missing_ok=True)  # room for what is in flight
            self._reserve = None
        if self.fault is None:
            self.fault = LedgerFault(self.path, exc)
            if self.on_fault is not None:
                self.on_fault(self.fault)

    def _maybe_checkpoint(self, *, force: bool) -> None:
        """Record the ledger's length (at most once a second): a resume refuses a shorter one."""
        if self._checkpoint is None or self._buf or self._size == self._checkpointed:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < 1.0:
            return
        if self._durability is not Durability.PROCESS:
            try:
                os.fsync(self._fd)  # the checkpoint never counts bytes a machine crash could lose
            except OSError as exc:
                self._fail(exc)
                return
        try:
            self._checkpoint(self._size)
        except OSError as exc:
            self._fail(exc)
            return
        self._checkpointed = self._size
        self._last_checkpoint = now

    def close(self) -> None:
        if self._fd >= 0:
            self.flush(sync=self._durability is not Durability.PROCESS)
            self._maybe_checkpoint(force=True)
            os.close(self._fd)
            self._fd = -1
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)
            self._reserve = None
