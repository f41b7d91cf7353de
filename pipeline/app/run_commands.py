"""``sluice run``, ``resume``, ``demo`` and the test send: a run driven from the terminal, with
its live display, the embedded simulator when the campaign asks for one, and the summary."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.app._logging import configure_logging
from pipeline.app.exits import (
    EXIT_DISK,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNSETTLED,
    EXIT_USAGE,
    SIGNAL_EXIT,
)
from pipeline.app.progress import ProgressReporter, format_duration
from pipeline.app.rundir import RunDir
from pipeline.errors import (
    DISK_FAULT,
    REJECT_RATIO,
    CampaignError,
    RunDirError,
    SluiceError,
)

if TYPE_CHECKING:  # imported by the commands that need them: `status` reads no campaign
    from pipeline.app.campaign import Campaign
    from pipeline.engine import RunResult

__all__ = (
    "backend_options",
    "cmd_demo",
    "cmd_dry_run",
    "cmd_resume",
    "cmd_run",
    "cmd_test_send",
    "embedded_simulator",
    "open_log",
)

log = structlog.get_logger("sluice")


# -- the embedded simulator ----------------------------------------------------
@contextmanager
def embedded_simulator(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``python -m providers.simulator`` on a free loopback port; yield its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "providers.simulator", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            raise SluiceError(f"the simulator did not start (exit {proc.wait()})")
        yield line
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _count_rows(campaign: Campaign) -> int | None:
    """A quick row count for the ETA (lines, for CSV and JSONL; a database counts its own)."""
    if campaign.source.kind not in ("csv", "jsonl"):
        return None
    try:
        with open(campaign.source.path, "rb") as f:
            n = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None
    return max(0, n - 1) if campaign.source.kind == "csv" else n


# -- running ------------------------------------------------------------------
def _exit_code(result: RunResult, signalled: int | None) -> int:
    if signalled is not None:
        return SIGNAL_EXIT.get(signal.Signals(signalled), 130)
    if result.stop_code == DISK_FAULT:
        return EXIT_DISK
    if result.stop_code == REJECT_RATIO:  # the wrong file, like a bad campaign file
        return EXIT_USAGE
    if result.stopped is not None:
        return EXIT_STOPPED
    c = result.counts
    if not result.complete or c["unknown"] or c["deferred"] or c.get("inflight"):
        return EXIT_UNSETTLED
    return EXIT_OK


def _summary(console: Console, result: RunResult, run_dir: Path) -> None:
    c = result.counts
    rate = result.settled_now / result.elapsed if result.elapsed > 0 else 0.0  # this session's own
    table = Table(title=f"run {run_dir}", show_header=False)
    for k in ("sent", "failed", "rejected", "unknown", "deferred", "pending"):
        table.add_row(k, f"{c[k]:,}")
    table.add_row("elapsed", f"{result.elapsed:.2f} s")
    table.add_row("recipients/s", f"{rate:,.0f}")
    table.add_row("requests", f"{result.requests:,}")
    table.add_row("throttled", f"{result.throttles:,}")
    console.print(table)
    if result.stopped:
        console.print(f"[bold red]stopped:[/] {escape(result.stopped)}", soft_wrap=True)
        if not c["unknown"] and result.stop_code != REJECT_RATIO:
            console.print(f"next: `sluice resume {run_dir}` sends the rest (once the cause is fixed)")
    if c["unknown"]:
        console.print(
            f"{c['unknown']:,} recipients are unknown (they may have reached the provider): "
            f"`sluice reconcile {run_dir}` asks the provider which were accepted; only then "
            "`sluice resume` sends the rest (`--resend-unknown` sends them blind, at the risk of twice)."
        )


async def _drive(fn: Any, kwargs: dict[str, Any], console: Console) -> tuple[RunResult, int | None]:
    """Run ``fn`` with a stop event wired to SIGINT/SIGTERM and a progress display."""
    stop = anyio.Event()
    signalled: list[int] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    signalled.append(signum)
                    stop.set()
                    console.print(f"stopping on {signal.Signals(signum).name}: finishing in-flight requests…")

        tg.start_soon(watch)
        failure: SluiceError | None = None
        try:
            title = f"sluice {'resume' if 'resend_unknown' in kwargs else 'run'} {kwargs['run_dir']}"
            with ProgressReporter(console, title=title) as reporter:
                result = await fn(**kwargs, stop=stop, on_progress=reporter)
        except SluiceError as exc:  # raised outside the task group, not as an ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result, (signalled[0] if signalled else None)


def _run_async(fn: Any, kwargs: dict[str, Any], console: Console) -> tuple[RunResult, int | None]:
    return anyio.run(_drive, fn, kwargs, console, backend="asyncio", backend_options=backend_options())


def backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def open_log(run_dir: Path, echo: bool) -> None:
    try:
        log_file = open(run_dir / "log.jsonl", "ab", buffering=0)
        os.chmod(run_dir / "log.jsonl", 0o600)
    except OSError as exc:
        raise RunDirError(f"cannot write {run_dir / 'log.jsonl'}: {exc.strerror}") from None
    from pipeline.proxy import proxy_secrets
    from providers import registry

    secrets = [os.environ.get(name, "") for name in registry.secret_names()]
    secrets += proxy_secrets()
    configure_logging(log_file, secrets=secrets, echo=echo)


def _execute(
    campaign: Campaign, run_dir: Path, resume: bool, args: argparse.Namespace, console: Console
) -> int:
    from pipeline.app.account import check_credentials
    from pipeline.app.api import resume_run, start_run
    from pipeline.transport import TLS_NOT_VERIFIED
    from providers import registry

    check_credentials(campaign)
    kwargs: dict[str, Any] = {"force": args.force, "total_hint": _count_rows(campaign)}
    if getattr(args, "limiter", None):
        kwargs["limiter"] = args.limiter
    if resume:
        fn: Any = resume_run
        kwargs.update(run_dir=run_dir, resend_unknown=args.resend_unknown)
    else:
        fn = start_run
        kwargs.update(campaign=campaign, run_dir=run_dir)
    with RunDir(run_dir).lock(f"sluice {'resume' if resume else 'run'}"):
        open_log(run_dir, echo=not console.is_terminal)
        from pipeline.app.campaign import campaign_warnings

        for warning in campaign_warnings(campaign):
            console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
        if not campaign.provider.verify_tls:
            console.print(f"[bold yellow]warning:[/] {TLS_NOT_VERIFIED}")
        if campaign.provider.kind == registry.SIMULATOR and campaign.provider.endpoint is None:
            with embedded_simulator() as url:
                result, signalled = _run_async(fn, {**kwargs, "endpoint": url}, console)
        else:
            result, signalled = _run_async(fn, kwargs, console)
    _summary(console, result, run_dir)
    return _exit_code(result, signalled)


def cmd_dry_run(campaign: Campaign, args: argparse.Namespace, console: Console) -> int:
    from pipeline.app.api import check_source
    from pipeline.ops.dryrun import dry_run

    check_source(campaign)
    report = anyio.run(dry_run, campaign)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.to_dict()) + b"\n")
        return EXIT_OK
    out = Console()
    table = Table(title=f"dry run of {args.campaign} (nothing sent)", show_header=False)
    table.add_row("rows", f"{report.rows:,}")
    table.add_row("would send", f"{report.sendable:,}")
    table.add_row("rejected", f"{report.rejected:,}")
    table.add_row("segments", f"{report.segments:,}")
    for n, count in sorted(report.by_segments.items()):
        table.add_row(f"  {n}-segment messages", f"{count:,}")
    table.add_row(
        "estimated cost", f"{report.estimated_cost:,.2f} (at {campaign.message.price_per_segment} a segment)"
    )
    table.add_row("requests", f"{report.requests:,} (batches of up to {campaign.limits.batch_size:,})")
    table.add_row("time at the configured rate", format_duration(report.seconds))
    out.print(table)
    for preview in report.previews:
        segs = preview["segments"]
        where = f"{escape(str(preview['template']))}, row {preview['row']}, to {preview['phone']}"
        out.print(f"first message ({where}, {segs} segment{'s' if segs != 1 else ''}):")
        out.print(f"  {escape(str(preview['text']))}", soft_wrap=True)
    from pipeline.app.campaign import campaign_warnings

    for warning in campaign_warnings(campaign):
        out.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    ratio = campaign.limits.max_reject_ratio
    if ratio < 1 and report.rejected > ratio * report.rows:
        out.print(
            f"[bold yellow]warning:[/] {report.rejected / report.rows:.0%} of the rows are rejected, "
            f"more than limits.max_reject_ratio = {ratio:g}: a run would stop (exit 2)"
        )
    if not report.counted_template:
        out.print(
            "segments count the signature and parameters only: set message.template_text for the full text"
        )
    if report.reasons:
        reasons = Table(title="rejected rows by reason")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, n in report.reasons.most_common(20):
            reasons.add_row(reason, f"{n:,}")
        out.print(reasons)
        examples = Table(title="first rejected rows")
        for col in ("row", "key", "reason"):
            examples.add_column(col)
        for row, key, reason in report.examples:
            examples.add_row(str(row), key, reason)
        out.print(examples)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from pipeline.app.campaign import load_campaign

    campaign = load_campaign(Path(args.campaign))
    if args.dry_run:
        return cmd_dry_run(campaign, args, console)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and campaign.run.dir:
        run_dir = Path(campaign.run.dir)
    if run_dir is None:
        raise CampaignError("run.dir", "no run directory: set [run] dir or pass --run-dir")
    if args.test_to is not None:
        return cmd_test_send(campaign, run_dir, args, console)
    if args.workers is not None:
        from pipeline.scale.local import run_sharded

        return run_sharded(
            campaign,
            run_dir,
            args.workers,
            force=args.force,
            resend_unknown=False,
            console=console,
            limiter=args.limiter,
        )
    if args.listen is not None:
        with _listening(run_dir, args.listen, console):
            return _execute(campaign, run_dir, False, args, console)
    return _execute(campaign, run_dir, False, args, console)


@contextlib.contextmanager
def _listening(run_dir: Path, port: int, console: Console) -> Iterator[None]:
    """``sluice listen RUN_DIR --port PORT`` beside the run, for as long as the run lasts."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "listen", str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode().strip()]  # the base URL, one line per push, receipts-to
        while lines[-1] and not lines[-1].startswith("receipts-to "):
            lines.append(proc.stdout.readline().decode().strip())
        if not lines[-1]:
            raise CampaignError("--listen", f"the receipts listener did not start (exit {proc.wait()})")
        console.print("receipts: " + "; ".join(lines[1:-1]))
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cmd_test_send(campaign: Campaign, base: Path, args: argparse.Namespace, console: Console) -> int:
    """The first rendered message to ``--test-to``'s numbers only, in a run directory of its own."""
    from pipeline.ops import testsend

    numbers = testsend.parse_numbers(args.test_to, campaign.source.default_country)
    row = anyio.run(testsend.first_sendable_row, campaign)
    run_dir = testsend.run_dir_for_test(base)
    code = _execute(
        testsend.campaign_for_numbers(campaign, row, numbers, run_dir), run_dir, False, args, console
    )
    table = Table(title=f"test send: the provider's answer ({run_dir})")
    for col in ("phone", "status", "code", "message", "provider id"):
        table.add_column(col)
    for answer in testsend.answers(run_dir, numbers):
        cells = [answer[k] for k in ("phone", "status", "code", "message", "provider_id")]
        table.add_row(*("" if v is None else escape(str(v)) for v in cells))
    Console().print(table)
    return code


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    from pipeline.app.api import pinned_campaign

    run_dir = Path(args.run_dir)
    from pipeline.scale.shards import is_sharded

    if is_sharded(run_dir):
        from pipeline.scale.local import run_sharded

        return run_sharded(
            None,
            run_dir,
            args.workers,
            force=args.force,
            resend_unknown=args.resend_unknown,
            console=console,
            limiter=args.limiter,
        )
    if args.workers is not None:
        raise RunDirError(f"{run_dir} is not a sharded run: resume it without --workers")
    campaign, _ = pinned_campaign(RunDir(run_dir))
    return _execute(campaign, run_dir, True, args, console)


def _write_demo_recipients(path: Path, n: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    first = ["Li", "Wang", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang", "Zhou", "Wu"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "phone", "first_name", "code"])
        for i in range(1, n + 1):
            # 7919 is coprime with 10**9: distinct rows get distinct numbers.
            phone = f"13{(i * 7919) % 10**9:09d}"
            w.writerow([f"c{i}", phone, first[i % 10], f"{rng.randrange(10**6):06d}"])


def _count_receipts(path: Path) -> tuple[int, int, int]:
    """(accepted, distinct numbers, numbers accepted more than once), 8 bytes a number."""
    import numpy as np

    with path.open("rb") as f:
        phones = np.fromiter((int(orjson.loads(line)["phone"].lstrip("+")) for line in f), dtype=np.int64)
    _, counts = np.unique(phones, return_counts=True)
    return len(phones), len(counts), int((counts > 1).sum())


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    base = Path(args.dir or f"sluice-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    base.mkdir(parents=True, exist_ok=True)
    recipients = base / "recipients.csv"
    console.print(f"writing {args.recipients:,} synthetic recipients to {recipients}")
    _write_demo_recipients(recipients, args.recipients)
    receipts = base / "simulator-receipts.jsonl"
    campaign_file = base / "campaign.toml"
    campaign_file.write_text(
        f"""# A demo campaign against the local simulator (no credentials needed).
[source]
kind = "csv"
path = "recipients.csv"
key = "id"
phone = "phone"

[provider]
kind = "simulator"     # no endpoint: sluice starts the simulator itself

[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ name = "{{first_name}}", code = "{{code}}" }}

[limits]
requests_per_second = {args.rps}
concurrency = {args.concurrency}
batch_size = 100

[run]
dir = "run"
""",
        encoding="utf-8",
    )
    from pipeline.app.campaign import load_campaign

    campaign = load_campaign(campaign_file)
    run_dir = Path(campaign.run.dir or base / "run")
    n = 1
    while RunDir(run_dir).exists():  # a rerun into the same --dir: a run of its own
        n += 1
        run_dir = base / f"run-{n}"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    open_log(run_dir, echo=not console.is_terminal)
    sim_args = [
        "--receipts",
        str(receipts),
        "--latency-ms",
        str(args.latency_ms),
        "--qps",
        str(args.rps),
    ]
    from pipeline.app.api import start_run

    with embedded_simulator(*sim_args) as url:
        console.print(f"simulator at {url}; sending…")
        result, signalled = _run_async(
            start_run,
            {
                "campaign": campaign,
                "run_dir": run_dir,
                "endpoint": url,
                "total_hint": args.recipients,
            },
            console,
        )
    _summary(console, result, run_dir)
    accepted, distinct, repeated = _count_receipts(receipts)
    console.print(
        f"simulator receipts: {accepted:,} recipients accepted, {distinct:,} distinct numbers, "
        f"{repeated:,} numbers accepted more than once"
    )
    console.print(f"run directory: {run_dir}  (try: sluice status {run_dir})")
    return _exit_code(result, signalled)
