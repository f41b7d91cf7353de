"""``sluice worker CAMPAIGN --coordinator redis://… --run-dir RUN --shards N``: one of any number
of processes that share a run's shards through Redis (:mod:`pipeline.scale.worker`)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.app.exits import EXIT_DISK, EXIT_OK, EXIT_STOPPED, EXIT_UNSETTLED, EXIT_USAGE, SIGNAL_EXIT
from pipeline.errors import DISK_FAULT, REJECT_RATIO, CampaignError
from pipeline.scale import is_limiter_url

if TYPE_CHECKING:
    from pipeline.scale.worker import WorkerReport

__all__ = ("add_worker_parser", "cmd_worker")

DEFAULT_LEASE_TTL = 10.0


def add_worker_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("worker", help="claim a run's shards through Redis and send them")
    w.add_argument("campaign", help="campaign file (TOML)")
    w.add_argument("--coordinator", required=True, metavar="URL", help="Redis, e.g. redis://host:6379/0")
    w.add_argument("--run-dir", help="the run directory every worker shares (default: [run] dir)")
    w.add_argument("--shards", type=_shards, help="how many shards the run has (needed to start it)")
    w.add_argument(
        "--lease-ttl",
        type=_seconds,
        default=DEFAULT_LEASE_TTL,
        metavar="SECONDS",
        help=f"a shard claim lapses this long after the last heartbeat (default {DEFAULT_LEASE_TTL:g})",
    )
    w.add_argument(
        "--limiter",
        type=_limiter_or_none,
        metavar="URL",
        help="the lease limiter all workers pace with: redis://… or unix:/path (default: the "
        "coordinator; 'none' to let each worker pace by itself, which multiplies the rate)",
    )
    w.set_defaults(func=cmd_worker)


def _limiter_or_none(text: str) -> str:
    if text != "none" and not is_limiter_url(text):
        raise argparse.ArgumentTypeError("a limiter is redis://host:port/db, unix:/path or none")
    return text


def _shards(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError("must be 1 to 10000")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be 0.2 to 3600 seconds")
    return value


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    from redis.asyncio import Redis

    from pipeline.app.account import check_credentials
    from pipeline.app.campaign import load_campaign
    from pipeline.app.run_commands import backend_options, embedded_simulator, open_log
    from pipeline.scale.claims import COORDINATOR_ERRORS
    from pipeline.scale.worker import WorkerReport, prepare_run, work
    from providers import registry

    campaign = load_campaign(Path(args.campaign))
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif campaign.run.dir:
        run_dir = Path(campaign.run.dir)
    else:
        raise CampaignError("run.dir", "no run directory: set [run] dir or pass --run-dir")
    check_credentials(campaign)
    ttl: float = args.lease_ttl
    try:  # bounded Redis calls: a heartbeat must not outlive its turn
        client = Redis.from_url(args.coordinator, socket_timeout=ttl / 4, socket_connect_timeout=ttl / 4)
    except ValueError as exc:
        raise CampaignError("--coordinator", f"not a Redis URL: {exc}") from None
    limiter = args.coordinator if args.limiter is None else None if args.limiter == "none" else args.limiter
    doc, shards = prepare_run(campaign, run_dir, args.shards)
    open_log(run_dir, echo=not console.is_terminal)
    signalled: list[int] = []
    unreachable: list[BaseException] = []

    async def drive(endpoint: str | None) -> WorkerReport:
        stop = anyio.Event()
        async with client, anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        signalled.append(signum)
                        stop.set()
                        name = signal.Signals(signum).name
                        console.print(f"stopping on {name}: finishing in-flight requests…")

            tg.start_soon(watch)

            def say(line: str) -> None:
                console.print(escape(line), soft_wrap=True)

            report = WorkerReport()
            try:
                report = await work(
                    campaign,
                    run_dir,
                    doc,
                    shards=shards,
                    client=client,
                    ttl=ttl,
                    stop=stop,
                    endpoint=endpoint,
                    say=say,
                    limiter=limiter,
                )
            except COORDINATOR_ERRORS as exc:  # registering: the coordinator was never reached
                unreachable.append(exc)
            finally:
                tg.cancel_scope.cancel()
        return report

    def run(endpoint: str | None) -> WorkerReport:
        return anyio.run(drive, endpoint, backend="asyncio", backend_options=backend_options())

    if campaign.provider.kind == registry.SIMULATOR and campaign.provider.endpoint is None:
        with embedded_simulator() as url:
            report = run(url)
    else:
        report = run(None)
    if unreachable:
        console.print(f"[bold red]error:[/] cannot use the coordinator: {escape(repr(unreachable[0]))}")
        return EXIT_STOPPED
    _summary(console, report, run_dir)
    return _exit_code(report, signalled[0] if signalled else None)


def _exit_code(report: WorkerReport, signalled: int | None) -> int:
    if signalled is not None:
        return SIGNAL_EXIT.get(signal.Signals(signalled), 130)
    if report.stop_code == DISK_FAULT:
        return EXIT_DISK
    if report.stop_code == REJECT_RATIO:
        return EXIT_USAGE
    if report.stop_code is not None:
        return EXIT_STOPPED
    unsettled = any(
        r.outcome == "unfinished" or (r.outcome == "done" and (r.counts["unknown"] or r.counts["deferred"]))
        for r in report.runs
    )
    return EXIT_UNSETTLED if unsettled or not report.all_done else EXIT_OK


def _summary(console: Console, report: WorkerReport, run_dir: Path) -> None:
    table = Table(title=f"sluice worker {run_dir}: {report.shards_done} of {report.shards} shards done")
    for col in ("shard", "epoch", "outcome", "sent", "failed", "rejected", "unknown", "pending"):
        table.add_column(col)
    for r in report.runs:
        counts = [f"{r.counts.get(k, 0):,}" if r.counts else "" for k in ("sent", "failed", "rejected")]
        rest = [f"{r.counts.get(k, 0):,}" if r.counts else "" for k in ("unknown", "pending")]
        table.add_row(str(r.shard), str(r.epoch), r.outcome, *counts, *rest)
    console.print(table)
    for r in report.runs:
        if r.detail and r.outcome != "done":
            console.print(f"shard {r.shard}: {escape(r.detail)}", soft_wrap=True)
    if report.all_done:
        console.print(f"every shard of {run_dir} is done")
