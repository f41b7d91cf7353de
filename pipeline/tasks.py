"""The run's tasks: the methods of :class:`Run`, joined by small bounded streams.

::

    read_source ──chunks (2)──▶ admit_and_batch ──batches (concurrency)──▶ send_batches
    (the source; CSV as         (admission: settled rows skipped, keys,   (N workers: rate
     column chunks)              render, suppression, phone dedupe;         limit, send, classify,
                                 batch, linger; the end of the source)      retry; outcomes to
                                                                            the ledger's buffer)
    flush_ledger   every progress interval: the ledger's buffer written, a progress snapshot
    watch_stop     a stop (asked for, or decided by a task): in-flight requests finish, then
                   every task is cancelled

Streams between tasks are small and bounded, so the source reads only as fast as the
workers send and memory stays flat at any number of recipients. Their fill is in each
:class:`Progress` snapshot: batches waiting for a worker say the provider is the limit; no
chunk and no batch waiting say the source is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.admit import Admission, skip_table
from pipeline.app.campaign import Campaign
from pipeline.batch import Batcher
from pipeline.dispatch import Dispatcher
from pipeline.errors import LEASE_LOST, REJECT_RATIO, SourceError
from pipeline.ledger import LedgerState, LedgerWriter
from pipeline.limit import Governor
from pipeline.render import rejects_over_limit
from pipeline.schedule import SendGate
from pipeline.source import Chunk, Source, check_decoded
from providers.base import Batch

__all__ = ("Progress", "Run")

log = structlog.get_logger("sluice.engine")


@dataclass
class Progress:
    """A snapshot for progress displays, counted from ledger outcomes."""

    counts: dict[str, int]
    rows_read: int
    total: int | None
    elapsed: float
    requests: int
    throttles: int
    rate_limit: float
    done: bool = False
    paused: str | None = None
    # The bounded streams between the tasks: chunks read, waiting for admission; batches
    # made, waiting for a worker (see :attr:`bottleneck`).
    chunks_queued: int = 0
    chunks_capacity: int = 0
    batches_queued: int = 0
    batches_capacity: int = 0
    earlier: int = 0  # recipients settled by earlier sessions (a resume): not in this session's rates
    stopped: str | None = None

    @property
    def settled(self) -> int:
        return sum(self.counts.values())

    @property
    def bottleneck(self) -> str | None:
        """``provider``: batches wait for a worker (sending is the limit); ``source``: no
        chunk and no batch waits (reading is); None when neither shows."""
        if self.batches_capacity and self.batches_queued >= self.batches_capacity:
            return "provider"
        if self.chunks_capacity and not self.chunks_queued and not self.batches_queued:
            return "source"
        return None


class Run:
    """One run: its state, and its tasks as methods (see the module docstring)."""

    def __init__(
        self,
        campaign: Campaign,
        state: LedgerState,
        writer: LedgerWriter,
        *,
        resend_unknown: bool,
        started: float,
        base_counts: dict[str, int],
        total_hint: int | None,
    ) -> None:
        self.campaign = campaign
        self.state = state
        self.writer = writer
        self.started = started
        self.base_counts = base_counts  # outcomes of earlier sessions (see run_campaign)
        self.total_hint = total_hint
        self.skip = skip_table(resend_unknown=resend_unknown)
        self.admission = Admission(campaign, writer.rejected, status=state.status, skip=self.skip)
        self.stop_reason: str | None = None
        self.stop_code: str | None = None
        self.stop_event = anyio.Event()
        self.source_done = anyio.Event()  # the source was read to its end
        self.dispatcher: Dispatcher | None = None
        self.governor: Governor | None = None
        self.chunks_send, self.chunks_recv = anyio.create_memory_object_stream[Chunk](2)
        concurrency = campaign.limits.concurrency
        self.batches_send, self.batches_recv = anyio.create_memory_object_stream[Batch](concurrency)

    def stop(self, reason: str, code: str | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_code = code
            log.warning("run_stopping", reason=reason, code=code)
        if self.dispatcher is not None:
            self.dispatcher.stopping = True
        self.stop_event.set()

    def snapshot(self, done: bool = False) -> Progress:
        counts = dict(self.base_counts)
        for k, v in self.writer.counts.items():
            counts[k] = counts.get(k, 0) + v
        dispatcher, governor = self.dispatcher, self.governor
        chunks, batches = self.chunks_send.statistics(), self.batches_send.statistics()
        return Progress(
            counts=counts,
            rows_read=self.admission.rows_read,
            total=self.state.eof_rows or self.total_hint,
            elapsed=time.monotonic() - self.started,
            requests=dispatcher.requests if dispatcher is not None else 0,
            throttles=governor.throttles if governor is not None else 0,
            rate_limit=governor.current if governor is not None else 0.0,
            done=done,
            paused=_pause_text(dispatcher.gate if dispatcher is not None else None),
            chunks_queued=chunks.current_buffer_used,
            chunks_capacity=int(chunks.max_buffer_size),
            batches_queued=batches.current_buffer_used,
            batches_capacity=int(batches.max_buffer_size),
            earlier=sum(self.base_counts[k] for k in ("sent", "failed", "unknown", "deferred")),
            stopped=self.stop_reason,
        )

    # -- the tasks ----------------------------------------------------------------
    async def read_source(self, source: Source) -> None:
        """Chunks of rows from the source into the admission stream."""
        chunks = source.chunks()
        sent = 0
        async with self.chunks_send:
            try:
                async for chunk in chunks:
                    if self.stop_event.is_set():
                        return
                    if not sent:
                        check_decoded(chunk, self.campaign)  # the wrong encoding: stop before sending
                    await self.chunks_send.send(chunk)
                    sent += 1
            except anyio.BrokenResourceError:
                return
            except SourceError as exc:
                if not sent:
                    raise  # nothing was read: an error like any before the run
                # A source failing mid-run (a lost database connection) stops the
                # run like a provider refusal; a resume continues.
                self.stop(f"the source failed: {exc}", "SourceError")
                return
            finally:
                await _aclose(chunks)
        if not self.stop_event.is_set():
            self.source_done.set()

    async def admit_and_batch(self, batcher: Batcher, source: Source) -> None:
        """Admitted rows into batches, each batch to the workers' stream; partial batches
        go after ``linger_ms`` without a new chunk. Marks the ledger's end when all is read."""
        linger = self.campaign.limits.linger_ms / 1000
        recv, send = self.chunks_recv, self.batches_send
        async with recv, send:
            try:
                while True:
                    chunk: Chunk | None = None
                    try:
                        chunk = recv.receive_nowait()  # the source is usually ahead: no timer
                    except anyio.WouldBlock:
                        with anyio.move_on_after(linger if batcher.pending else None):
                            try:
                                chunk = await recv.receive()
                            except anyio.EndOfStream:
                                break
                    except anyio.EndOfStream:
                        break
                    if self.stop_event.is_set():
                        return
                    if chunk is None:  # lingered: flush partial batches
                        for b in batcher.drain():
                            await send.send(b)
                        continue
                    messages = self.admission.admit(chunk)
                    rejected, read = self.writer.counts["rejected"], self.admission.rows_read
                    too_many = rejects_over_limit(rejected, read, self.campaign.limits)
                    if too_many:
                        self.stop(too_many, REJECT_RATIO)
                        return
                    for b in batcher.add(messages):
                        await send.send(b)
                if not self.stop_event.is_set():
                    for b in batcher.drain():
                        await send.send(b)
            except anyio.BrokenResourceError:
                return  # every worker has stopped
        if self.source_done.is_set() and not self.stop_event.is_set():
            # A database source resumed past its settled rows did not read them again.
            self.writer.eof(self.admission.rows_read + getattr(source, "rows_before", 0))

    async def send_batches(self, dispatcher: Dispatcher) -> None:
        """``limits.concurrency`` workers, each sending one batch at a time."""

        async def worker(recv: MemoryObjectReceiveStream[Batch]) -> None:
            async with recv:
                async for batch in recv:
                    if dispatcher.stopping:
                        return
                    await dispatcher.send(batch)

        async with self.batches_recv, anyio.create_task_group() as tg:
            for _ in range(self.campaign.limits.concurrency):
                tg.start_soon(worker, self.batches_recv.clone())

    async def watch_stop(self, scope: anyio.CancelScope, external: anyio.Event | None) -> None:
        """On a stop (asked for, or decided by a task), let in-flight requests finish up to
        ``run.stop_deadline_s``, then cancel the other tasks."""
        if external is not None:
            async with anyio.create_task_group() as tg:

                async def asked() -> None:
                    await external.wait()
                    self.stop("stop requested")

                tg.start_soon(asked)
                await self.stop_event.wait()
                tg.cancel_scope.cancel()
        else:
            await self.stop_event.wait()
        await anyio.sleep(self.campaign.run.stop_deadline_s)
        scope.cancel()

    async def flush_ledger(self, interval: float, on_progress: Callable[[Progress], None] | None) -> None:
        """The ledger written out every ``interval`` seconds, then a progress snapshot."""
        while True:
            await anyio.sleep(interval)
            self.writer.flush()
            if on_progress is not None:
                on_progress(self.snapshot())

    async def run_tasks(
        self,
        source: Source,
        batcher: Batcher,
        dispatcher: Dispatcher,
        *,
        stop: anyio.Event | None,
        on_progress: Callable[[Progress], None] | None,
        progress_interval: float,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        """Every task until the source is sent or the run stops."""
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as main:
                main.start_soon(self.read_source, source)
                main.start_soon(self.admit_and_batch, batcher, source)
                main.start_soon(self.send_batches, dispatcher)
                outer.start_soon(self.watch_stop, main.cancel_scope, stop)
                outer.start_soon(self.flush_ledger, progress_interval, on_progress)
                if fence is not None:
                    outer.start_soon(self.watch_fence, fence)
            outer.cancel_scope.cancel()

    async def watch_fence(self, fence: Callable[[], bool], every: float = 0.05) -> None:
        """Stop the run once ``fence`` says no, even while every worker waits (on a limiter
        that is down, say): the dispatcher asks it again before each send."""
        while fence():  # noqa: ASYNC110 (a clock deadline each heartbeat moves: polled)
            await anyio.sleep(every)
        self.stop("the shard's lease lapsed", LEASE_LOST)


async def _aclose(iterator: object) -> None:
    """Close an async generator now, so that a database connection it holds is closed."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.move_on_after(10, shield=True):
            await aclose()


def _pause_text(gate: SendGate | None) -> str | None:
    if gate is None or gate.paused_until is None:
        return None
    return f"paused until {gate.paused_until:%Y-%m-%d %H:%M %Z}: {gate.pause_reason}"
