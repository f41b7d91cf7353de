"""The operator's commands around a run: ``status``, ``reconcile``, ``listen``, ``receipts``,
``report``, ``export`` and ``simulate``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.app.exits import (
    EXIT_OK,
    EXIT_UNSETTLED,
)
from pipeline.app.progress import ReconcileProgress
from pipeline.app.rundir import RunDir
from pipeline.errors import (
    CampaignError,
)
from pipeline.ops.summary import export_rows, summarize
from pipeline.scale.shards import refuse_sharded

if TYPE_CHECKING:  # imported by the commands that need them: `status` reads no campaign
    pass

from pipeline.app.run_commands import backend_options, open_log

__all__ = (
    "cmd_export",
    "cmd_listen",
    "cmd_receipts",
    "cmd_reconcile",
    "cmd_report",
    "cmd_simulate",
    "cmd_status",
)


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    status = summarize(Path(args.run_dir))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(status) + b"\n")
        return EXIT_OK
    out = Console()
    table = Table(title=f"run {args.run_dir}", show_header=False)
    delivery = ("delivered", "undelivered", "awaiting_receipt", "unmatched_receipts")
    for k in (
        "sent",
        "failed",
        "rejected",
        "unknown",
        "in_flight",
        "deferred",
        "pending",
        "source_rows",
        "complete",
        *(delivery if status["delivered"] or status["undelivered"] else ()),
    ):
        v = status.get(k)
        if k == "in_flight" and v is None:
            continue
        if k == "pending" and v is None:
            text = "not yet read"
        elif k == "source_rows" and v is None:
            text = "not yet known"
        else:
            text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        if k == "source_rows" and status["source_rows_estimated"]:
            text += " (lines in the file)"
        table.add_row(k.replace("_", " "), text)
    for k in ("first_send", "last_send"):
        if status[k] is not None:
            table.add_row(k.replace("_", " "), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status[k])))
    rates = status["rates"]
    if rates["last_session"] is not None:
        table.add_row("recipients/s, last session", f"{rates['last_session']:,.0f}")
    if rates["all_sessions"] is not None and rates["sessions"] > 1:
        table.add_row(f"recipients/s, all {rates['sessions']} sessions", f"{rates['all_sessions']:,.0f}")
    table.add_row("requests", f"{status['requests']:,}")
    if status["splits"]:
        table.add_row(
            "refused calls split", f"{status['splits']:,} ({status['split_requests']:,} requests for parts)"
        )
    out.print(table)
    if "shards" in status:  # a sharded run: the counts above are its shards' added up
        shards = Table(title="shards")
        for col in ("shard", "state", "sent", "failed", "rejected", "unknown", "deferred", "pending"):
            shards.add_column(col, justify="left" if col in ("shard", "state") else "right")
        for s in status["shards"]:
            counts = (s[k] for k in ("sent", "failed", "rejected", "unknown", "deferred", "pending"))
            shards.add_row(s["name"], s["state"], *("?" if v is None else f"{v:,}" for v in counts))
        out.print(shards)
    running = status["running"]
    if running is not None:
        out.print(f"[bold]running[/] ({running['describe']}): these counts are still moving")
    if status["ledger_damaged_lines"]:
        out.print(f"[bold red]the ledger has {status['ledger_damaged_lines']:,} damaged lines[/]")
    if status["ledger_problem"]:
        out.print(f"[bold red]{status['ledger_problem']}[/]")
    if status["stopped"] is not None:
        stop = status["stopped"]
        text = f"{stop['code']}: {stop['message'] or ''}" if stop["code"] else str(stop["message"] or "")
        out.print(f"[bold red]stopped:[/] {escape(text)}", soft_wrap=True)
    if status["codes"]:
        codes = Table(title="recipients by status and provider code")
        codes.add_column("status:code")
        codes.add_column("recipients", justify="right")
        for code, n in status["codes"].items():
            codes.add_row(code, f"{n:,}")
        out.print(codes)
    if status["attempts"]:
        attempts = Table(title="request attempts by outcome")
        attempts.add_column("outcome:code")
        attempts.add_column("attempts", justify="right")
        for code, n in status["attempts"].items():
            # "mixed": a request answered recipient by recipient (their codes are in the table above)
            attempts.add_row("answered per recipient" if code == "mixed" else code, f"{n:,}")
        out.print(attempts)
    if status["next"] is not None:
        out.print(f"next: [bold]{escape(status['next'])}[/]", soft_wrap=True)
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace, console: Console) -> int:
    from pipeline.ops.reconcile import reconcile_run

    rd = RunDir(Path(args.run_dir))
    rd.load()
    refuse_sharded(rd.path, "reconcile")
    with rd.lock("sluice reconcile"):
        open_log(rd.path, echo=not console.is_terminal)
        with ReconcileProgress(console) as progress:
            result = anyio.run(
                lambda: reconcile_run(
                    rd.path, queries_per_second=args.qps, settle_after=args.settle_after, on_progress=progress
                ),
                backend_options=backend_options(),
            )
    table = Table(title=f"reconciled {args.run_dir}", show_header=False)
    for k, v in vars(result).items():
        table.add_row(k, str(v))
    console.print(table)
    if result.resendable:
        console.print(
            f"{result.resendable:,} recipients were not found at the provider: `sluice resume` sends them."
        )
    return EXIT_OK if not result.still_unknown else EXIT_UNSETTLED


def cmd_listen(args: argparse.Namespace, console: Console) -> int:
    import asyncio

    from pipeline.ops.listen import print_ready, serve_listener

    refuse_sharded(Path(args.run_dir), "listen")
    if not args.allow_remote and args.host not in ("127.0.0.1", "::1", "localhost"):
        raise CampaignError("--host", "listening beyond loopback needs --allow-remote")
    stats = asyncio.run(
        serve_listener(
            Path(args.run_dir),
            host=args.host,
            port=args.port,
            max_body=args.max_body,
            key_env=args.subhook_key_env,
            on_ready=print_ready,
        )
    )
    sys.stderr.write(orjson.dumps(stats).decode() + "\n")
    return EXIT_OK


def cmd_receipts(args: argparse.Namespace, console: Console) -> int:
    from pipeline.ops.receipts_pull import PullResult, pull_receipts

    refuse_sharded(Path(args.run_dir), "receipts")

    def progress(r: PullResult, total: int) -> None:
        sys.stderr.write(f"asked {r.asked:,}/{total:,}: {r.delivered:,} delivered, {r.undelivered:,} not\n")

    result = anyio.run(
        lambda: pull_receipts(
            Path(args.run_dir),
            queries_per_second=args.qps,
            settle_after=args.settle_after,
            progress=progress,
        ),
        backend_options=backend_options(),
    )
    table = Table(title=f"receipts pulled for {args.run_dir}", show_header=False)
    for k, v in vars(result).items():
        table.add_row(k, str(v))
    console.print(table)
    return EXIT_OK if not result.waiting and not result.not_yet_settled else EXIT_UNSETTLED


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from pipeline.ops.report import build_report

    path = build_report(Path(args.run_dir), Path(args.output) if args.output else None)
    console.print(f"report: {path} (charts and report.json beside it)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    if args.output == "-":
        n = export_rows(Path(args.run_dir), args.format, sys.stdout.buffer)
    else:
        with open(args.output, "wb") as f:
            n = export_rows(Path(args.run_dir), args.format, f)
    console.print(f"exported {n:,} recipients")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from providers.simulator.__main__ import main as simulator_main

    return simulator_main(args.simulator_args, prog="sluice simulate")
