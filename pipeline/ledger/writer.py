"""The ledger's writer: buffered appends, an intent on the OS (or the disk) before its request leaves."""

from __future__ import annotations

import enum
import errno
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import anyio
import orjson

from pipeline.errors import SluiceError
from pipeline.ledger.format import OUTCOME_STATUS, VERSION, header_line, json_text, keyed_lines, read_version
from pipeline.ledger.state import BY_NAME, LedgerState, Status
from providers.base import ENDPOINT_STOP_CODES, Batch, BatchOutcome, Outcome, RecipientOutcome

__all__ = ("Durability", "LedgerFault", "LedgerWriter")


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
    per batch, run in a worker thread and shared by the intents written while the
    previous one ran. ``interval``: like ``process``, plus an fsync every N ms;
    a machine crash loses at most that window.
    """

    PROCESS = "process"
    BATCH = "batch"
    INTERVAL = "interval"


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
            if self._size == 0:  # a new ledger: its version line first
                self._size = os.write(self._fd, header_line())
                self.version = VERSION
            else:
                with path.open("rb") as f:
                    self.version = read_version(f.readline(64))
        except OSError as exc:
            raise LedgerFault(path, exc) from None
        self.state.version = self.version
        # A format-1 ledger keeps format-1 lines: its throttles are written as retries.
        self._throttled = "throttled" if self.version >= 2 else "retry"
        self._buf = bytearray()
        self._limit = buffer_bytes
        self._durability = durability
        self._fsync_interval = fsync_interval
        self._last_fsync = time.monotonic()
        self._synced = 0  # bytes known to be on the disk: none of an existing file, to be safe
        self._syncing: anyio.Event | None = None  # set when the fsync running in a thread ends
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
        self.state.set(row, BY_NAME[status.encode()])
        if self._keyed and key != str(row):
            tail += b',"k":' + json_text(key)
        self._buf += b'{"r":%d,"s":"%s"%s}\n' % (row, status.encode(), tail)

    def rejected(self, rejections: Iterable[tuple[int, str, str]]) -> None:
        n = 0
        for row, key, reason in rejections:
            self._recipient(row, key, "rejected", b',"e":' + orjson.dumps(reason))
            n += 1
        self.counts["rejected"] += n
        self._maybe_flush()

    def intent(self, batch: Batch) -> None:
        """Record that ``batch`` is about to be sent, and put it on the OS (and on the disk
        with ``durability = "batch"``, fsynced here: see :meth:`record_intent` for a run)."""
        self._add_intent(batch)
        if self.fault is None:
            self.flush(sync=self._durability is Durability.BATCH)
        self._refuse_if_faulty(batch)

    async def record_intent(self, batch: Batch) -> None:
        """:meth:`intent` for the event loop: with ``durability = "batch"`` the fsync runs in a
        worker thread and is shared by every intent written while the previous fsync ran
        (group commit). Returns once the intent is as durable as the mode asks."""
        self._add_intent(batch)
        if self.fault is None:
            self.flush()
            if self._durability is Durability.BATCH:
                await self._sync_through(self._size)
        self._refuse_if_faulty(batch)

    def _add_intent(self, batch: Batch) -> None:
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

    def _refuse_if_faulty(self, batch: Batch) -> None:
        if self.fault is not None:
            # Not sent: should the intent reach the disk later, this line puts its rows back.
            self._buf += b'{"b":%d,"a":%d,"s":"retry","c":"LedgerWriteFailed"}\n' % (batch.id, batch.attempt)
            raise self.fault

    async def _sync_through(self, size: int) -> None:
        """Return once the first ``size`` bytes are fsynced (or the disk failed). One fsync
        runs at a time, in a thread; an intent written meanwhile waits for the next one,
        which covers every intent written before it starts."""
        while self._synced < size and self.fault is None:
            running = self._syncing
            if running is not None:
                await running.wait()
                continue
            done = self._syncing = anyio.Event()
            covered = self._size
            try:
                await anyio.to_thread.run_sync(os.fsync, self._fd)
            except OSError as exc:
                self._fail(exc)
            else:
                self._synced = max(self._synced, covered)
                self._last_fsync = time.monotonic()
            finally:
                self._syncing = None
                done.set()

    def attempt(self, batch: Batch, result: BatchOutcome, status: str, latency_ms: float) -> None:
        """The batch-level line: what one attempt came to (``status``: an outcome's word, or
        ``retry``, ``throttled``, ``fatal``, ``split`` for an attempt that left its rows unsent)."""
        if status == "throttled":
            status = self._throttled
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
        status = OUTCOME_STATUS[result.outcome] if per is None else "mixed"
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
            self.state.status.set_many(rows, BY_NAME[status.encode()])
            # a provider's code may hold '%': only the row is a format field
            head = b'{"r":%d,"s":"' + (status.encode() + b'"' + tail).replace(b"%", b"%%")
            if self._keyed:
                self._buf += keyed_lines(head, rows, [m.key for m in msgs])
            else:  # every line in one formatting call
                self._buf += ((head + b"}\n") * len(rows)) % tuple(rows)
            self.counts[status] += len(msgs)
        else:
            for m, r in zip(batch.messages, per, strict=True):
                st = OUTCOME_STATUS[r.outcome]
                tail = b
                if r.code is not None and r.outcome is not Outcome.SENT:
                    tail += b',"c":' + orjson.dumps(r.code)
                if r.provider_id is not None:
                    tail += b',"id":' + orjson.dumps(r.provider_id)
                if r.message is not None and r.outcome is not Outcome.SENT:
                    tail += b',"e":' + json_text(r.message)
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
                self._synced = self._size
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
        if self._durability is not Durability.PROCESS and self._synced < self._size:
            try:
                os.fsync(self._fd)  # the checkpoint never counts bytes a machine crash could lose
            except OSError as exc:
                self._fail(exc)
                return
            self._synced = self._size
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
