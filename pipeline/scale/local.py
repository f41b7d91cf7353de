"""``sluice run CAMPAIGN --workers N`` and ``sluice resume RUN`` of a sharded run: N processes
on this machine, one per shard.

The parent holds ``RUN``'s lock, creates or checks the sharded run directory
(:func:`pipeline.scale.shards.prepare_sharded_run`), and starts one
``python -m pipeline.scale.child RUN/shards/i-of-N`` per shard, each in a session of its
own (a Ctrl-C reaches the parent, which forwards it: SIGINT and SIGTERM go to every worker).
Workers report progress snapshots as JSON lines on their stdout; the parent adds them up into
the one live display ``sluice run`` prints, then prints the merged summary and exits with
the worst of the workers' exit codes (:func:`worst_exit`).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from rich.console import Console
from rich.markup import escape

from pipeline.app.exits import EXIT_DISK, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, EXIT_UNSETTLED, EXIT_USAGE
from pipeline.app.progress import ProgressReporter
from pipeline.app.rundir import RunDir
from pipeline.errors import RunDirError
from pipeline.limit import Governor
from pipeline.scale.shards import ShardedRun, open_sharded_run, prepare_sharded_run

if TYPE_CHECKING:
    from pipeline.app.campaign import Campaign
    from pipeline.engine import Progress, RunResult

__all__ = ("run_sharded", "shard_governor", "worst_exit")

log = structlog.get_logger("sluice.scale")

# The CLI's exit codes from the best to the worst: a run's code is its worst worker's.
_ORDER = (EXIT_OK, EXIT_UNSETTLED, EXIT_STOPPED, 143, 130, EXIT_USAGE, EXIT_DISK, EXIT_ERROR)


def worst_exit(codes: list[int]) -> int:
    """The worst of the workers' exit codes (a worker killed by a signal counts as an error)."""
    rank = {code: i for i, code in enumerate(_ORDER)}
    worst = max(codes, key=lambda c: rank.get(c, len(_ORDER)), default=EXIT_OK)
    return worst if worst in rank else EXIT_ERROR


@asynccontextmanager
async def shard_governor(
    campaign: Campaign, workers: int, limiter: str, endpoint: str | None
) -> AsyncIterator[Governor]:
    """The governor one of ``workers`` shards running side by side paces with: a lease from the
    limiter at ``limiter`` (the parent's :func:`~pipeline.scale.lease.serve_leases`, or a Redis
    the user named) for every request, so the shards share the campaign's requests/s and no
    sliding second holds more; an idle shard's share goes to the others. Recipients per
    second are not leased: each shard keeps 1/``workers`` of them.
    """
    from pipeline.app.api import leased_governor

    async with leased_governor(campaign, limiter, endpoint, recipients_share=1 / workers) as governor:
        yield governor


@dataclass
class _Worker:
    name: str
    path: Path
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    exit: int | None = None
    process: Process | None = field(default=None, repr=False)


def _merged_progress(workers: list[_Worker], started: float, done: bool) -> Progress | None:
    """The workers' latest snapshots added up into one (None before any has reported)."""
    from pipeline.engine import Progress

    snaps = [w.progress for w in workers if w.progress is not None]
    if not snaps:
        return None
    counts: dict[str, int] = {}
    for s in snaps:
        for k, v in s["counts"].items():
            counts[k] = counts.get(k, 0) + v
    totals = [s["total"] for s in snaps]
    stopped = [f"{w.name}: {w.progress['stopped']}" for w in workers if w.progress and w.progress["stopped"]]
    paused = [s["paused"] for s in snaps if s["paused"]]

    def total(name: str) -> Any:
        return sum(s[name] for s in snaps)

    return Progress(
        counts=counts,
        rows_read=total("rows_read"),
        total=sum(totals) if len(snaps) == len(workers) and None not in totals else None,
        elapsed=time.monotonic() - started,
        requests=total("requests"),
        throttles=total("throttles"),
        rate_limit=total("rate_limit"),
        done=done,
        paused=paused[0] if paused else None,
        chunks_queued=total("chunks_queued"),
        chunks_capacity=total("chunks_capacity"),
        batches_queued=total("batches_queued"),
        batches_capacity=total("batches_capacity"),
        earlier=total("earlier"),
        stopped="; ".join(stopped) or None,
    )


async def _supervise(
    run: ShardedRun, command: list[str], console: Console, title: str
) -> tuple[list[_Worker], int | None, float]:
    """Start a worker per shard, show their progress as one, forward signals; return the
    workers (their last words and exit codes), the signal that stopped the run, and how long."""
    started = time.monotonic()
    workers = [_Worker(p.name, p) for p in run.shards()]
    signalled: list[int] = []
    all_done = anyio.Event()

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                signalled.append(signum)
                console.print(
                    f"stopping on {signal.Signals(signum).name}: the workers finish their in-flight requests…"
                )
                for w in workers:
                    if w.process is not None and w.process.returncode is None:
                        w.process.send_signal(signum)

    async def run_worker(w: _Worker) -> None:
        async with await anyio.open_process(
            [*command, str(w.path)],
            stdin=-1,
            stdout=-1,
            stderr=None,  # the worker's own errors, as they happen, on the parent's stderr
            start_new_session=True,
        ) as process:
            w.process = process
            if signalled:  # a signal came while it was being started
                process.send_signal(signal.Signals(signalled[-1]))
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            while True:
                try:
                    line = await lines.receive_until(b"\n", 1 << 24)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    break
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if "progress" in doc:
                    w.progress = doc["progress"]
                elif "result" in doc:
                    w.result = doc["result"]
                elif "error" in doc:
                    w.error = str(doc["error"])
            w.exit = await process.wait()  # stdin is closed on leaving: the worker is done by now

    async def show(reporter: ProgressReporter) -> None:
        while not all_done.is_set():
            with anyio.move_on_after(0.25):
                await all_done.wait()
            merged = _merged_progress(workers, started, done=all_done.is_set())
            if merged is not None:
                reporter(merged)

    with ProgressReporter(console, title=title) as reporter:
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch_signals)
            outer.start_soon(show, reporter)
            async with anyio.create_task_group() as tg:
                for w in workers:
                    tg.start_soon(run_worker, w)
            all_done.set()
            outer.cancel_scope.cancel()
        final = _merged_progress(workers, started, done=True)
        if final is not None:
            reporter(final)
    return workers, (signalled[0] if signalled else None), time.monotonic() - started


def _merged_result(run: ShardedRun, workers: list[_Worker], elapsed: float) -> RunResult:
    """The run's summary: counts from the shards' ledgers, the rest from the workers' results."""
    from pipeline.app.api import run_status
    from pipeline.engine import RunResult

    counts: dict[str, int] = {}
    for path in run.shards():
        status = run_status(path)
        for k in ("sent", "failed", "rejected", "unknown", "deferred", "pending"):
            counts[k] = counts.get(k, 0) + (status[k] or 0)
    results = [w.result for w in workers if w.result is not None]
    stops = [(w.name, w.result) for w in workers if w.result is not None and w.result["stopped"]]
    errors = [(w.name, w.error) for w in workers if w.error is not None]
    stopped = stops[0] if stops else None
    return RunResult(
        counts=counts,
        complete=len(results) == len(workers) and all(r["complete"] for r in results),
        stopped=f"shard {stopped[0]}: {stopped[1]['stopped']}"
        if stopped
        else (f"shard {errors[0][0]}: {errors[0][1]}" if errors else None),
        stop_code=stopped[1]["stop_code"] if stopped else None,
        elapsed=elapsed,
        requests=sum(r["requests"] for r in results),
        throttles=sum(r["throttles"] for r in results),
        settled_now=sum(r["settled_now"] for r in results),
    )


async def _supervise_sharing(
    run: ShardedRun, command: list[str], console: Console, title: str, limiter: str | None, limit: int
) -> tuple[list[_Worker], int | None, float]:
    """:func:`_supervise`, the workers pacing with one lease limiter: ``limiter`` when the user
    named one (shared with other runs), else one this process hosts on a Unix socket."""
    if limiter is not None:
        return await _supervise(run, [*command, "--limiter", limiter], console, title)
    from pipeline.scale.lease import serve_leases

    with tempfile.TemporaryDirectory(prefix="sluice-lease-") as tmp:  # a short path: sockets need one
        socket_path = Path(tmp) / "lease.sock"
        async with serve_leases(socket_path, limit=limit):
            return await _supervise(run, [*command, "--limiter", f"unix:{socket_path}"], console, title)


def run_sharded(
    campaign: Campaign | None,
    run_dir: Path,
    workers: int | None,
    *,
    force: bool,
    resend_unknown: bool,
    console: Console,
    limiter: str | None = None,
) -> int:
    """``sluice run CAMPAIGN --workers N`` (``campaign`` given: the run is created or checked)
    or ``sluice resume RUN [--workers N]`` of a sharded run (``campaign`` None); the exit code."""
    from pipeline.app.account import check_credentials
    from pipeline.app.api import check_source, pinned_campaign
    from pipeline.app.campaign import campaign_warnings
    from pipeline.app.run_commands import _summary, backend_options, embedded_simulator, open_log
    from providers import registry

    rd = RunDir(run_dir)
    verb = "resume" if campaign is None else "run"
    if campaign is None:
        campaign, _ = pinned_campaign(rd)
    check_credentials(campaign)
    with rd.lock(f"sluice {verb} --workers"):
        if verb == "run":
            assert workers is not None
            run = prepare_sharded_run(campaign, run_dir, workers, check_source(campaign), force=force)
        else:
            run = open_sharded_run(run_dir)
            if workers is not None and workers != run.count:
                raise RunDirError(
                    f"{run_dir} is a run in {run.count} shards: resume it with --workers {run.count}"
                )
        open_log(run_dir, echo=not console.is_terminal)
        for warning in campaign_warnings(campaign):
            console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
        command = [sys.executable, "-m", "pipeline.scale.child", "--workers", str(run.count)]
        command += ["--force"] if force else []
        command += ["--resend-unknown"] if resend_unknown else []
        title = f"sluice {verb} {run_dir} ({run.count} workers)"
        log.info("workers_starting", workers=run.count, run_dir=str(run_dir))
        options = backend_options()
        limit = max(1, int(campaign.limits.requests_per_second))
        if campaign.provider.kind == registry.SIMULATOR and campaign.provider.endpoint is None:
            with embedded_simulator() as url:
                command += ["--endpoint", url]
                done = anyio.run(
                    _supervise_sharing, run, command, console, title, limiter, limit, backend_options=options
                )
        else:
            done = anyio.run(
                _supervise_sharing, run, command, console, title, limiter, limit, backend_options=options
            )
    shard_workers, signalled, elapsed = done
    for w in shard_workers:
        if w.error is not None:
            console.print(f"[bold red]shard {w.name}:[/] {escape(w.error)}", soft_wrap=True)
        elif w.exit is not None and w.exit < 0:
            console.print(f"[bold red]shard {w.name}:[/] its worker was killed by signal {-w.exit}")
    result = _merged_result(run, shard_workers, elapsed)
    _summary(console, result, run_dir)
    codes = [w.exit if w.exit is not None else EXIT_ERROR for w in shard_workers]
    log.info("workers_finished", exits=codes, signal=signalled)
    return worst_exit(codes)
