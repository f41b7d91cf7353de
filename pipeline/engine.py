"""The engine: wires Source → Render → Batch → Limit → Dispatch → Ledger.

::

    source task ──chunks of rows──▶ prepare task ──batches──▶ N dispatch workers
                                    (skip done rows,            (rate limit, send,
                                     reject duplicates,          classify, retry)
                                     render, batch, linger)            │
                                                                       ▼
                                                                 ledger writer

Streams between tasks are small and bounded, so the source reads only as fast
as the dispatchers send and memory stays flat at any number of recipients.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline._logging import on_log_fault
from pipeline.batch import Batcher
from pipeline.campaign import DB_KINDS, Campaign
from pipeline.dispatch import CircuitBreaker, Dispatcher, EndpointGuard, RetryPolicy, server_clock
from pipeline.errors import RunDirError, SourceError
from pipeline.keys import KeySet
from pipeline.ledger import Durability, Intent, LedgerFault, LedgerState, LedgerWriter, Status, events, replay
from pipeline.limit import RateGovernor
from pipeline.render import Renderer, Template, campaign_text_limit, normalize_phone, rejects_over_limit
from pipeline.rundir import RunDir
from pipeline.schedule import SendGate
from pipeline.source import Chunk, Columns, CsvSource, JsonlSource, Source, check_decoded
from pipeline.transport import TLS_NOT_VERIFIED, HttpTransport, Proxy
from providers.base import ENDPOINT_STOP_CODES, Batch, BatchOutcome, Message, Provider

__all__ = ("Progress", "RunResult", "open_source", "run_campaign")

log = structlog.get_logger("sluice.engine")

DISK_FAULT = "DiskFault"  # the stop code when the run directory cannot be written
REJECT_RATIO = "RejectRatio"  # the stop code past [limits] max_reject_ratio
LEDGER_RESERVE = 4 << 20  # bytes set aside for the in-flight results should the disk fill


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
    earlier: int = 0  # recipients settled by earlier sessions (a resume): not in this session's rates
    stopped: str | None = None

    @property
    def settled(self) -> int:
        return sum(self.counts.values())


@dataclass
class RunResult:
    counts: dict[str, int]
    complete: bool
    stopped: str | None = None
    stop_code: str | None = None
    elapsed: float = 0.0
    requests: int = 0
    throttles: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    settled_now: int = 0  # sent or failed by this session (a resume's own, for its rate)


def open_source(
    campaign: Campaign,
    *,
    run_dir: Path | None = None,
    state: LedgerState | None = None,
    skip: bytes | None = None,
    columnar: bool = False,
) -> Source:
    """The campaign's source. A database source given the run directory, its ledger state and
    the statuses a resume skips starts after the last settled checkpoint (pipeline/dbsource.py)."""
    spec = campaign.source
    if spec.kind in DB_KINDS:
        from pipeline.dbsource import open_db_source

        return open_db_source(campaign, run_dir=run_dir, state=state, skip=skip)
    if spec.kind == "csv":
        settled = None
        prefix = 0
        if state is not None and skip is not None:
            # Rows a resume skips only need what de-duplication reads: the key and the phone.
            keep = tuple(c for c in (spec.key, spec.phone if spec.dedupe_phone else None) if c)
            settled = (state.status, skip, keep)
            if not keep and len(state.status) > 1:
                # Nothing is read from settled rows: the leading run of them is not even parsed.
                end = state.status.first(bytes(not flag for flag in skip), 1)
                prefix = (len(state.status) if end < 0 else end) - 1
        return CsvSource(
            Path(spec.path),
            delimiter=spec.delimiter,
            encoding=spec.encoding,
            settled=settled,
            columnar=columnar,
            skip_records=prefix,
        )
    return JsonlSource(Path(spec.path))


class _Run:
    """State shared by the tasks of one run."""

    def __init__(
        self,
        campaign: Campaign,
        state: LedgerState,
        writer: LedgerWriter,
        provider: Provider,
        run_id: str,
        *,
        resend_unknown: bool,
    ) -> None:
        self.campaign = campaign
        self.state = state
        self.writer = writer
        self.provider = provider
        self.run_id = run_id
        self.skip = bytearray(256)  # indexed by a row's status byte: 1 = do not send
        for st in (Status.SENT, Status.FAILED, Status.REJECTED):
            self.skip[st] = 1
        if not resend_unknown:
            self.skip[Status.UNKNOWN] = 1
        sign, params = campaign.templates()
        content = campaign.message.content
        self.renderer = Renderer(
            phone_column=campaign.source.phone,
            sign_name=sign,
            params=params,
            content=Template.compile(content) if content is not None else None,
            default_country=campaign.source.default_country,
            text_limit=campaign_text_limit(campaign),
        )
        self.keys = KeySet() if campaign.source.key else None
        self.phones = KeySet() if campaign.source.dedupe_phone else None
        self.suppressed = _load_suppression(campaign) if campaign.source.suppress else None
        self.rows_read = 0
        self.stop_reason: str | None = None
        self.stop_code: str | None = None
        self.stop_event = anyio.Event()
        self.dispatcher: Dispatcher | None = None

    def stop(self, reason: str, code: str | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_code = code
            log.warning("run_stopping", reason=reason, code=code)
        if self.dispatcher is not None:
            self.dispatcher.stopping = True
        self.stop_event.set()

    # -- prepare: skip, de-duplicate, render ------------------------------
    def prepare(self, chunk: Chunk) -> list[Message]:
        if isinstance(chunk, Columns):
            out = self._prepare_columns(chunk)
            if out is not None:
                self.rows_read += len(chunk)
                return out
            chunk = chunk.records()
        status = self.state.status
        n_status = len(status)
        skip = self.skip
        key_col = self.campaign.source.key
        dup: list[bool] | None = None
        keys: list[str]
        if key_col is None:
            keys = [str(row) for row, _ in chunk]
        else:
            keys = []
            for row, rec in chunk:
                value = rec.get(key_col) if not isinstance(rec, str) else None
                keys.append(str(row) if value is None or value == "" else str(value))
            assert self.keys is not None
            dup = self.keys.add(keys)
        rejects: list[tuple[int, str, str]] = []
        todo: list[tuple[int, str, Mapping[str, object]]] = []
        skipped_phones: list[str] = []
        for i, (row, rec) in enumerate(chunk):
            if row < n_status and skip[status[row]]:
                # A settled row holds its number unless it was rejected (then it never took it).
                if self.phones is not None and not isinstance(rec, str) and status[row] != Status.REJECTED:
                    raw = str(rec.get(self.campaign.source.phone, ""))
                    phone = normalize_phone(raw, self.campaign.source.default_country)
                    if phone is not None:
                        skipped_phones.append(phone)  # settled earlier: still taken
                continue
            key = keys[i]
            if isinstance(rec, str):
                rejects.append((row, key, rec))
            elif key_col is not None and rec.get(key_col) in (None, ""):
                rejects.append((row, key, f"missing key column {key_col!r}"))
            elif not key.isascii() and not _valid_text(key):
                rejects.append((row, key, f"invalid UTF-8 in key column {key_col!r}"))
            elif dup is not None and dup[i]:
                rejects.append((row, key, "duplicate key"))
            else:
                todo.append((row, key, rec))
        out, bad = self.renderer.render_rows(todo)
        rejects.extend(bad)
        if self.suppressed is not None and out:
            by_phone = self.suppressed.contains([m.phone for m in out])
            by_key = self.suppressed.contains([m.key for m in out])
            kept = []
            for m, p, k in zip(out, by_phone, by_key, strict=True):
                if p or k:
                    rejects.append((m.row, m.key, "suppressed"))
                else:
                    kept.append(m)
            out = kept
        if self.phones is not None:
            self.phones.add(skipped_phones)
            dup_phone = self.phones.add([m.phone for m in out])
            pairs = list(zip(out, dup_phone, strict=True))
            rejects.extend((m.row, m.key, "duplicate phone") for m, d in pairs if d)
            out = [m for m, d in pairs if not d]
        if rejects:
            self.writer.rejected(rejects)
        self.rows_read += len(chunk)
        return out

    def _prepare_columns(self, chunk: Columns) -> list[Message] | None:
        """:meth:`prepare` for a chunk of columns, with no dict per row; None (before any
        side effect) when the chunk is not the common case, which the row path then takes."""
        if self.phones is not None or self.suppressed is not None:
            return None
        first, n = chunk.first, len(chunk)
        status = self.state.status
        key_col = self.campaign.source.key
        rows = range(first, first + n)
        if first < len(status):
            skipped = status.flags(self.skip, first, first + n)
            if 1 in skipped:  # rows settled earlier (a resume)
                if len(skipped) < n or 0 in skipped:
                    return None  # some still to send: the row path sorts them out
                if key_col is not None:  # all settled: only their keys still count
                    column = chunk.column(key_col)
                    if column is None:
                        return None
                    assert self.keys is not None
                    self.keys.note([v or str(r) for r, v in zip(rows, column, strict=True)])
                return []
        if key_col is None:
            keys = list(map(str, rows))
            dup = None
        else:
            column = chunk.column(key_col)
            if column is None or "" in column or not "".join(column).isascii():
                return None
            keys = list(column)
            assert self.keys is not None
            dup = self.keys.add(keys)
        rejects: list[tuple[int, str, str]] = []
        values = chunk.values
        if dup is not None and any(dup):
            rejects = [(r, k, "duplicate key") for r, k, d in zip(rows, keys, dup, strict=True) if d]
            keep = [not d for d in dup]
            rows = list(itertools.compress(rows, keep))  # type: ignore[assignment]
            keys = list(itertools.compress(keys, keep))
            values = [tuple(itertools.compress(v, keep)) for v in values]
        out = self.renderer.render_columns(rows, keys, chunk.header, values, rejects)
        if out is None:  # not all rows of the common shape: render them one by one
            by_row = dict(chunk.records())
            out, bad = self.renderer.render_rows(
                [(r, k, by_row[r]) for r, k in zip(rows, keys, strict=True)]  # type: ignore[misc]
            )
            rejects.extend(bad)
        if rejects:
            self.writer.rejected(rejects)
        return out


async def _aclose(iterator: object) -> None:
    """Close an async generator now, so that a database connection it holds is closed."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.move_on_after(10, shield=True):
            await aclose()


def _load_suppression(campaign: Campaign) -> KeySet:
    """The suppression file: one phone number (any common format) or key per line."""
    entries: list[str] = []
    path = Path(campaign.source.suppress or "")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            entries.append(entry)
            phone = normalize_phone(entry, campaign.source.default_country)
            if phone is not None:
                entries.append(phone)
    suppressed = KeySet()
    suppressed.add(entries)
    log.info("suppression_loaded", entries=suppressed.size)
    return suppressed


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _prepare_task(
    run: _Run,
    recv: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[Batch],
    batcher: Batcher,
    linger: float,
) -> None:
    async with recv, send:
        try:
            await _prepare_loop(run, recv, send, batcher, linger)
        except anyio.BrokenResourceError:
            return  # every worker has stopped


async def _prepare_loop(
    run: _Run,
    recv: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[Batch],
    batcher: Batcher,
    linger: float,
) -> None:
    while True:
        chunk: Chunk | None = None
        with anyio.move_on_after(linger if batcher.pending else None):
            try:
                chunk = await recv.receive()
            except anyio.EndOfStream:
                break
        if run.stop_event.is_set():
            return
        if chunk is None:  # lingered: flush partial batches
            for b in batcher.drain():
                await send.send(b)
            continue
        messages = run.prepare(chunk)
        if too_many := rejects_over_limit(run.writer.counts["rejected"], run.rows_read, run.campaign.limits):
            run.stop(too_many, REJECT_RATIO)
            return
        for b in batcher.add(messages):
            await send.send(b)
    if not run.stop_event.is_set():
        for b in batcher.drain():
            await send.send(b)


async def _worker(run: _Run, dispatcher: Dispatcher, recv: MemoryObjectReceiveStream[Batch]) -> None:
    async with recv:
        async for batch in recv:
            if dispatcher.stopping:
                return
            await dispatcher.send(batch)


def _pause_text(gate: SendGate | None) -> str | None:
    if gate is None or gate.paused_until is None:
        return None
    return f"paused until {gate.paused_until:%Y-%m-%d %H:%M %Z}: {gate.pause_reason}"


def _send_gate(campaign: Campaign, ledger: Path) -> SendGate | None:
    """The send window and daily cap, with what this account sent today per the ledger."""
    spec = campaign.schedule
    window = spec.gate_window()
    if window is None and spec.daily_cap is None and spec.start_at is None:
        return None
    tz = ZoneInfo(spec.timezone)
    sent_today = 0
    if spec.daily_cap is not None:
        today = dt.datetime.now(tz).date()
        for event in events(ledger, recipients=False):
            # A first attempt sent today, not a split's part (its rows were counted whole).
            if isinstance(event, Intent) and event.attempt == 1 and event.parent is None:
                if dt.datetime.fromtimestamp(event.time or 0, tz).date() == today:
                    sent_today += len(event.rows)
    return SendGate(
        window=window, daily_cap=spec.daily_cap, cap_tz=tz, sent_today=sent_today, start_at=spec.start_time()
    )


@contextlib.contextmanager
def _run_gc() -> Iterator[None]:
    """The garbage collector tuned for a run, restored after it.

    A run allocates a few short-lived objects per recipient and holds few long-lived
    ones: collecting the young generation every 10k allocations instead of 700 cuts
    CPU by ~15 %, and freezing what exists at the start (imports, the campaign) keeps
    it out of every pass. The older generations still run every ~1M allocations, so
    cyclic garbage cannot pile up.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _session(
    counts: dict[str, int], elapsed: float, complete: bool, run: _Run, requests: int
) -> dict[str, Any]:
    """How this run or resume ended, with its own outcomes, for ``sluice status`` (sessions.jsonl)."""
    return {
        "ended": time.time(),
        "elapsed": round(elapsed, 3),
        "settled": counts["sent"] + counts["failed"],
        "rejected": counts["rejected"],
        "requests": requests,
        "complete": complete,
        "stopped": run.stop_reason,
        "code": run.stop_code,
    }


def _settle_interrupted(state: LedgerState, writer: LedgerWriter) -> int:
    """Rows whose intent has no result: the process died mid-flight."""
    rows = state.status.rows_with(Status.INFLIGHT)
    state.open_intents.clear()
    if rows:
        writer.unknown_rows(rows, "Interrupted")  # sets their status too
        writer.flush()
    return len(rows)


async def run_campaign(
    campaign: Campaign,
    run_dir: RunDir,
    *,
    provider: Provider,
    run_id: str,
    transport: httpx.AsyncBaseTransport | None = None,
    resend_unknown: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.25,
    stop: anyio.Event | None = None,
    total_hint: int | None = None,
    rng: random.Random | None = None,
    force: bool = False,
) -> RunResult:
    """Run (or resume) ``campaign`` into ``run_dir``; returns when every row is settled,
    the source is exhausted, or the run was stopped.

    The run directory must have been created (``pipeline.api.start_run`` does it). A ledger
    shorter than recorded, or damaged before its last line, is refused unless ``force``.
    """
    if not run_dir.exists():
        raise RunDirError(f"{run_dir.path} has no run.json")
    started = time.monotonic()
    run_dir.check_ledger(run_dir.load(), force=force)
    try:
        state = replay(run_dir.ledger, repair=True)
    except OSError as exc:
        raise RunDirError(f"cannot repair {run_dir.ledger}: {exc.strerror}") from None
    if state.bad_lines and not force:
        raise RunDirError(
            f"{run_dir.ledger} has {state.bad_lines:,} damaged lines before its last one: the "
            "recipients they recorded cannot be told apart from those never sent. Restore the ledger; "
            "--force would go on, re-sending every recipient whose line was damaged"
        )
    durability = Durability(campaign.run.durability)
    try:
        writer = LedgerWriter(
            run_dir.ledger,
            durability=durability,
            fsync_interval=campaign.run.fsync_interval_ms / 1000,
            state=state,
            keyed=campaign.source.key is not None,
            checkpoint=run_dir.record_ledger_bytes,
            reserve_bytes=LEDGER_RESERVE,
        )
    except LedgerFault as exc:
        raise RunDirError(str(exc)) from None  # nothing sent yet: a bad run directory
    interrupted = _settle_interrupted(state, writer)
    writer.counts = dict.fromkeys(writer.counts, 0)  # count this session's outcomes only
    if interrupted or state.torn_tail:
        log.warning("resume_repaired", interrupted=interrupted, torn_bytes=state.torn_tail)
    replayed = state.counts()
    base_counts = {k: replayed[k] for k in writer.counts}
    run = _Run(campaign, state, writer, provider, run_id, resend_unknown=resend_unknown)

    def disk_fault(fault: LedgerFault | OSError, path: str = "") -> None:
        text = str(fault) if isinstance(fault, LedgerFault) else f"cannot write {path}: {fault.strerror}"
        run.stop(text, DISK_FAULT)

    writer.on_fault = disk_fault
    # Outcomes already in the ledger are not counted again; a row re-sent on
    # resume (deferred, or unknown with --resend-unknown) moves between counts.
    resent = {Status.DEFERRED} | ({Status.UNKNOWN} if resend_unknown else set())
    for st in resent:
        base_counts[st.name.lower()] = 0
    limits = campaign.limits
    governor = RateGovernor(limits.requests_per_second, recipients_rate=limits.recipients_per_second)
    policy = RetryPolicy(
        max_attempts=limits.max_attempts,
        backoff_base=limits.backoff_base_ms / 1000,
        backoff_max=limits.backoff_max_ms / 1000,
    )
    timeout = httpx.Timeout(campaign.provider.timeout, connect=campaign.provider.connect_timeout, pool=None)
    if transport is None:
        transport = HttpTransport(
            max_connections=limits.concurrency,
            verify=campaign.provider.verify_tls,
            proxy=Proxy.configured(campaign.provider.proxy),
            ca_file=campaign.provider.ca_file,
        )
    if not campaign.provider.verify_tls:
        log.warning("tls_not_verified", detail=TLS_NOT_VERIFIED)
    source = open_source(campaign, run_dir=run_dir.path, state=state, skip=bytes(run.skip), columnar=True)
    batcher = Batcher(limits.batch_size, provider.batch_key, first_id=state.next_batch)

    def counts() -> dict[str, int]:
        c = dict(base_counts)
        for k, v in writer.counts.items():
            c[k] = c.get(k, 0) + v
        return c

    earlier = sum(base_counts[k] for k in ("sent", "failed", "unknown", "deferred"))

    def snapshot(done: bool = False) -> Progress:
        return Progress(
            counts=counts(),
            rows_read=run.rows_read,
            total=state.eof_rows or total_hint,
            elapsed=time.monotonic() - started,
            requests=dispatcher.requests,
            throttles=governor.throttles,
            rate_limit=governor.current,
            done=done,
            paused=_pause_text(dispatcher.gate),
            earlier=earlier,
            stopped=run.stop_reason,
        )

    def on_fatal(result: BatchOutcome) -> None:
        if result.code == "CircuitBreaker":
            run.stop(result.message or "circuit breaker", result.code)
            return
        if result.code in ENDPOINT_STOP_CODES:  # the endpoint, not the provider's refusal
            run.stop(f"{result.code}: {result.message or ''}".strip(), result.code)
            return
        run.stop(
            f"the provider refused the whole request with {result.code}: {result.message or ''}".strip(),
            result.code,
        )

    structlog.contextvars.bind_contextvars(run_id=run_id, provider=provider.name)
    log.info(
        "run_started",
        resume=bool(state.status),
        rate=limits.requests_per_second,
        concurrency=limits.concurrency,
        batch_size=limits.batch_size,
    )
    try:
        with _run_gc(), on_log_fault(disk_fault):
            async with transport:
                offset = await server_clock(provider, transport, writer, limits.connect_failures, policy)
                if offset is not None:
                    log.info("server_clock", provider=provider.name, offset_s=round(offset, 3))
                dispatcher = Dispatcher(
                    provider=provider,
                    transport=transport,
                    timeout=timeout,
                    ledger=writer,
                    governor=governor,
                    policy=policy,
                    run_id=run_id,
                    on_fatal=on_fatal,
                    rng=rng,
                    breaker=CircuitBreaker(limits.breaker_window, limits.breaker_threshold),
                    gate=_send_gate(campaign, run_dir.ledger),
                    endpoint=EndpointGuard(limits.connect_failures),
                    batch_ids=batcher.new_id,
                    on_refusal=campaign.provider.on_refusal,
                )
                gate = dispatcher.gate
                if gate is not None and gate.daily_cap and total_hint:
                    left = max(0, total_hint - sum(base_counts.values()))
                    days = -(-(left + gate.sent_today) // gate.daily_cap)
                    if days > 1:
                        log.warning(
                            "daily_cap_spans_days", recipients_left=left, daily_cap=gate.daily_cap, days=days
                        )
                run.dispatcher = dispatcher
                rows_send, rows_recv = anyio.create_memory_object_stream[Chunk](2)
                batch_send, batch_recv = anyio.create_memory_object_stream[Batch](limits.concurrency)
                async with anyio.create_task_group() as tg:

                    async def source_task() -> None:
                        chunks = source.chunks()
                        sent = 0
                        async with rows_send:
                            try:
                                async for chunk in chunks:
                                    if run.stop_event.is_set():
                                        return
                                    if not sent:
                                        check_decoded(chunk, campaign)  # the wrong encoding: stop now
                                    await rows_send.send(chunk)
                                    sent += 1
                            except anyio.BrokenResourceError:
                                return
                            except SourceError as exc:
                                if not sent:
                                    raise  # nothing was read: an error like any before the run
                                # A source failing mid-run (a lost database connection) stops the
                                # run like a provider refusal; a resume continues.
                                run.stop(f"the source failed: {exc}", "SourceError")
                                return
                            finally:
                                await _aclose(chunks)
                        if not run.stop_event.is_set():
                            run_eof.set()

                    run_eof = anyio.Event()

                    async def prepare_and_eof() -> None:
                        await _prepare_task(run, rows_recv, batch_send, batcher, limits.linger_ms / 1000)
                        if run_eof.is_set() and not run.stop_event.is_set():
                            # A database source resumed past its settled rows did not read them again.
                            writer.eof(run.rows_read + getattr(source, "rows_before", 0))

                    async def workers() -> None:
                        async with batch_recv, anyio.create_task_group() as wg:
                            for _ in range(limits.concurrency):
                                wg.start_soon(_worker, run, dispatcher, batch_recv.clone())

                    async def watch_stop(scope: anyio.CancelScope) -> None:
                        if stop is not None:
                            async with anyio.create_task_group() as inner:

                                async def external() -> None:
                                    await stop.wait()
                                    run.stop("stop requested")

                                inner.start_soon(external)
                                await run.stop_event.wait()
                                inner.cancel_scope.cancel()
                        else:
                            await run.stop_event.wait()
                        # Let in-flight requests finish, up to the deadline.
                        await anyio.sleep(campaign.run.stop_deadline_s)
                        scope.cancel()

                    async def ticker() -> None:
                        while True:
                            await anyio.sleep(progress_interval)
                            writer.flush()
                            if on_progress is not None:
                                on_progress(snapshot())

                    async with anyio.create_task_group() as main:
                        main.start_soon(source_task)
                        main.start_soon(prepare_and_eof)
                        main.start_soon(workers)
                        tg.start_soon(watch_stop, main.cancel_scope)
                        tg.start_soon(ticker)
                    tg.cancel_scope.cancel()
    finally:
        structlog.contextvars.unbind_contextvars("run_id", "provider")
        writer.close()
    final = snapshot(done=True)
    if on_progress is not None:
        on_progress(final)
    result_counts = state.counts()
    complete = (
        run.stop_reason is None
        and result_counts["pending"] == 0
        and result_counts["deferred"] == 0
        and result_counts["inflight"] == 0
        and state.eof_rows is not None
    )
    log.info("run_finished", complete=complete, elapsed=round(final.elapsed, 3), **result_counts)
    run_dir.record_session(_session(writer.counts, final.elapsed, complete, run, dispatcher.requests))
    return RunResult(
        counts=result_counts,
        complete=complete,
        stopped=run.stop_reason,
        stop_code=run.stop_code,
        elapsed=final.elapsed,
        requests=dispatcher.requests,
        throttles=governor.throttles,
        settled_now=writer.counts["sent"] + writer.counts["failed"],
    )
