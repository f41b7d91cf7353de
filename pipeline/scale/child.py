"""One shard of ``sluice run --workers N``, as the parent starts it::

    python -m pipeline.scale.child RUN/shards/2-of-4 --workers 4 --limiter unix:/tmp/…/lease.sock
        [--endpoint URL] [--resend-unknown] [--force]

A thin wrapper over the ordinary resume of a run directory (:func:`pipeline.app.api.resume_run`,
holding the shard's lock) pacing with leases from the run's shared limiter
(:func:`pipeline.scale.local.shard_governor`).
It writes JSON lines to stdout for the parent: ``{"progress": {...}}`` snapshots, then
``{"result": {...}, "exit": code}`` or ``{"error": text, "exit": code}``. It stops, as on SIGINT,
when its stdin closes (the parent is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson

from pipeline.app.exits import EXIT_ERROR, EXIT_STOPPED, EXIT_USAGE
from pipeline.errors import CampaignError, RunDirError, RunStopped, SluiceError, SourceError

__all__ = ("main",)

_EARLY: list[int] = []  # SIGINT/SIGTERM that came before the run could take them


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.buffer.flush()


async def _run_shard(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from pipeline.app.api import pinned_campaign, resume_run
    from pipeline.app.run_commands import _count_rows, _exit_code
    from pipeline.app.rundir import RunDir
    from pipeline.engine import Progress
    from pipeline.scale.local import shard_governor
    from pipeline.source import file_shard, shard_rows

    campaign, _ = pinned_campaign(RunDir(Path(args.shard_dir)))
    lines = _count_rows(campaign)
    total = shard_rows(lines, file_shard(campaign.source.kind, campaign.source.shard)) if lines else None
    stop = anyio.Event()
    signalled: list[int] = []

    def on_progress(p: Progress) -> None:
        _emit({"progress": dataclasses.asdict(p)})

    def parent_gone() -> None:
        if not os.read(sys.stdin.fileno(), 1 << 16):  # end of file: nobody to report to
            loop.remove_reader(sys.stdin.fileno())
            signalled.append(signal.SIGTERM)
            stop.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), parent_gone)
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                if _EARLY:
                    signalled.extend(_EARLY)
                    stop.set()
                async for signum in signals:
                    signalled.append(signum)
                    stop.set()

        tg.start_soon(watch)
        try:
            async with shard_governor(campaign, args.workers, args.limiter, args.endpoint) as governor:
                result = await resume_run(
                    Path(args.shard_dir),
                    resend_unknown=args.resend_unknown,
                    force=args.force,
                    endpoint=args.endpoint,
                    on_progress=on_progress,
                    stop=stop,
                    total_hint=total,
                    governor=governor,
                )
        finally:
            loop.remove_reader(sys.stdin.fileno())
            tg.cancel_scope.cancel()
    doc = {
        "counts": result.counts,
        "complete": result.complete,
        "stopped": result.stopped,
        "stop_code": result.stop_code,
        "elapsed": result.elapsed,
        "requests": result.requests,
        "throttles": result.throttles,
        "settled_now": result.settled_now,
    }
    return doc, _exit_code(result, signalled[0] if signalled else None)


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, CampaignError | RunDirError | SourceError):
        return EXIT_USAGE
    if isinstance(exc, RunStopped):
        return EXIT_STOPPED
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.scale.child")
    p.add_argument("shard_dir")
    p.add_argument("--workers", type=int, required=True, help="how many shards run side by side")
    p.add_argument(
        "--limiter", required=True, help="the lease limiter the shards share (unix:/path, redis://…)"
    )
    p.add_argument("--endpoint")
    p.add_argument("--resend-unknown", action="store_true")
    p.add_argument("--force", action="store_true")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda n, _frame: _EARLY.append(n))
    args = p.parse_args(argv)
    from pipeline.app.run_commands import backend_options, open_log
    from pipeline.app.rundir import RunDir

    shard = RunDir(Path(args.shard_dir))
    try:
        shard.load()
        with shard.lock(f"sluice run --workers {args.workers} (shard {shard.path.name})"):
            open_log(shard.path, echo=False)
            doc, code = anyio.run(_run_shard, args, backend="asyncio", backend_options=backend_options())
    except BaseException as exc:  # reported to the parent, which prints it and counts the exit code
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        inner = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        code = _error_code(inner)
        text = str(inner) if isinstance(inner, SluiceError) else f"{type(inner).__name__}: {inner}"
        if isinstance(inner, RunStopped):
            text = inner.reason
        _emit({"error": text, "exit": code})
        return code
    _emit({"result": doc, "exit": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
