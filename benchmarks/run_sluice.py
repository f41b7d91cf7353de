"""One sluice run (or resume) in this process, measured; the child the benchmarks spawn.

::

    python -m benchmarks.run_sluice run    --csv R.csv --url URL --run-dir DIR [--rate 100000]
                                           [--concurrency 64] [--batch 100] [--loop uvloop|asyncio]
                                           [--durability process|batch|interval]
                                           [--profile cprofile|sample|pyinstrument]
                                           [--profile-out FILE]
    python -m benchmarks.run_sluice resume --url URL --run-dir DIR

It goes through the Python API (``pipeline.app.api.start_run`` / ``resume_run``) with the
campaign of :func:`benchmarks.common.campaign_data`, logs to ``DIR/log.jsonl`` as the
CLI does, and prints one JSON line: counts, wall and CPU seconds of the call, peak RSS,
and ``t_main`` / ``t_call`` (``time.monotonic()`` when the process began its work and when
the API was called) for comparison with the responder's first-request timestamp.
Credentials: ``ALIYUN_ACCESS_KEY_ID`` / ``ALIYUN_ACCESS_KEY_SECRET`` (the benchmarks set
the test ones).
"""

from __future__ import annotations

import time

T_MAIN = time.monotonic()  # before the heavy imports: what a resume costs from process start

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import CodeType, FrameType  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402

from benchmarks.common import campaign_data, child_result  # noqa: E402
from pipeline.app._logging import configure_logging  # noqa: E402
from pipeline.app.api import resume_run, start_run  # noqa: E402
from pipeline.app.campaign import parse_campaign  # noqa: E402
from pipeline.engine import RunResult  # noqa: E402

__all__ = ("main", "top_self_cprofile", "top_self_pyinstrument")

TOP = 15


def _backend_options(loop: str = "uvloop") -> dict[str, Any]:
    if loop != "uvloop":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def top_self_cprofile(prof: cProfile.Profile, n: int = TOP) -> list[dict[str, Any]]:
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": func,
                "where": f"{_short(file)}:{line}",
                "self_s": round(tottime, 4),
                "self_pct": round(100 * tottime / total, 1) if total else 0.0,
                "cum_s": round(cumtime, 4),
                "calls": ncalls,
            }
        )
    rows.sort(key=lambda r: r["self_s"], reverse=True)
    return rows[:n]


def top_self_pyinstrument(profiler: Any, n: int = TOP) -> list[dict[str, Any]]:
    """Self time per function, summed over the sampled call tree."""
    session = profiler.last_session
    root = session.root_frame()
    acc: dict[tuple[str, str], float] = {}
    stack = [root] if root is not None else []
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        own = frame.total_self_time
        if own:
            key = (frame.function or "?", f"{_short(frame.file_path or '?')}:{frame.line_no}")
            acc[key] = acc.get(key, 0.0) + own
    total = sum(acc.values()) or 1.0
    rows: list[dict[str, Any]] = [
        {"function": f, "where": w, "self_s": round(t, 4), "self_pct": round(100 * t / total, 1)}
        for (f, w), t in acc.items()
    ]
    rows.sort(key=lambda r: r["self_s"], reverse=True)
    return rows[:n]


class Sampler:
    """A CPU-time sampling profiler: ``SIGPROF`` every ``interval`` seconds of process CPU time.

    The handler runs in the main thread at the next bytecode boundary and records its
    stack: self time goes to the innermost Python function, so time in a C function (a
    hash, ``str.translate``) counts for its Python caller, and the event loop's own C work
    for the loop's Python frame (``run_until_complete``) or the callback that follows it.
    ``cum`` counts every function on the stack once. Idle time is not sampled. It never
    reads a frame's locals (pyinstrument does, and its snapshot of ``f_locals`` can keep a
    ``memoryview`` alive, which makes ``LedgerWriter.flush`` raise BufferError).
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.self_counts: dict[tuple[str, str], int] = {}
        self.cum_counts: dict[tuple[str, str], int] = {}
        self.samples = 0
        self._names: dict[CodeType, tuple[str, str]] = {}

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        self.samples += 1
        names = self._names
        seen: set[tuple[str, str]] = set()
        leaf = True
        f: FrameType | None = frame
        while f is not None:
            code = f.f_code
            key = names.get(code)
            if key is None:
                key = names[code] = (code.co_qualname, f"{_short(code.co_filename)}:{code.co_firstlineno}")
            if leaf:
                self.self_counts[key] = self.self_counts.get(key, 0) + 1
                leaf = False
            if key not in seen:
                seen.add(key)
                self.cum_counts[key] = self.cum_counts.get(key, 0) + 1
            f = f.f_back

    def top(self, n: int = TOP) -> list[dict[str, Any]]:
        total = self.samples or 1
        rows: list[dict[str, Any]] = [
            {
                "function": func,
                "where": where,
                "self_pct": round(100 * c / total, 1),
                "cum_pct": round(100 * self.cum_counts.get((func, where), 0) / total, 1),
                "samples": c,
            }
            for (func, where), c in self.self_counts.items()
        ]
        rows.sort(key=lambda r: r["samples"], reverse=True)
        return rows[:n]

    def top_cumulative(self, n: int = 25) -> list[dict[str, Any]]:
        total = self.samples or 1
        rows: list[dict[str, Any]] = [
            {"function": func, "where": where, "cum_pct": round(100 * c / total, 1)}
            for (func, where), c in self.cum_counts.items()
        ]
        rows.sort(key=lambda r: r["cum_pct"], reverse=True)
        return rows[:n]


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        i = path.find(marker)
        if i >= 0:
            return path[i + len(marker) :] if marker != "lib/python3" else "stdlib/" + path.rsplit("/", 1)[-1]
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_sluice")
    p.add_argument("mode", choices=("run", "resume"))
    p.add_argument("--csv", type=Path, help="the recipients file (run)")
    p.add_argument("--url", required=True, help="the responder or simulator (loopback)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--rate", type=float, default=100_000.0, help="limits.requests_per_second")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--durability", choices=("process", "batch", "interval"), default="process")
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="as the CLI: uvloop if installed"
    )
    p.add_argument("--profile", choices=("cprofile", "sample", "pyinstrument"))
    p.add_argument("--profile-out", type=Path, help="also save the profile (pstats, JSON or text)")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        p.error("loopback URLs only")
    for var in ("ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET"):
        if not os.environ.get(var):
            p.error(f"{var} is not set")

    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_file = open(run_dir / "log.jsonl", "ab", buffering=0)
    configure_logging(log_file)

    if args.mode == "run":
        if args.csv is None:
            p.error("run needs --csv")
        data = campaign_data(
            args.csv.resolve(), args.url, rate=args.rate, concurrency=args.concurrency, batch=args.batch
        )
        data["run"] = {"durability": args.durability}
        campaign = parse_campaign(data, run_dir)

        async def go() -> RunResult:
            return await start_run(campaign, run_dir, endpoint=args.url)
    else:

        async def go() -> RunResult:
            return await resume_run(run_dir, endpoint=args.url)

    profile: list[dict[str, Any]] | None = None
    prof: cProfile.Profile | None = None
    pyi: Any = None
    sampler: Sampler | None = None
    if args.profile == "sample":
        sampler = Sampler()
    elif args.profile == "cprofile":
        prof = cProfile.Profile()
    elif args.profile == "pyinstrument":
        from pyinstrument import Profiler

        pyi = Profiler(interval=0.0005, async_mode="disabled")

    cpu0 = time.process_time()
    t_call = time.monotonic()
    if prof is not None:
        prof.enable()
    if pyi is not None:
        pyi.start()
    if sampler is not None:
        sampler.start()
    try:
        result = anyio.run(go, backend="asyncio", backend_options=_backend_options(args.loop))
    finally:
        if sampler is not None:
            sampler.stop()
        if pyi is not None:
            pyi.stop()
        if prof is not None:
            prof.disable()
        t_end = time.monotonic()
        cpu = time.process_time() - cpu0
        log_file.close()

    if prof is not None:
        profile = top_self_cprofile(prof)
        if args.profile_out:
            prof.dump_stats(str(args.profile_out))
    if pyi is not None:
        profile = top_self_pyinstrument(pyi)
        if args.profile_out:
            args.profile_out.write_text(pyi.output_text(unicode=True, show_all=False))

    cumulative = None
    if sampler is not None:
        profile = sampler.top()
        cumulative = sampler.top_cumulative()
        if args.profile_out:
            args.profile_out.write_text(json.dumps({"self": profile, "cumulative": cumulative}, indent=1))

    counts = result.counts
    child_result(
        mode=args.mode,
        counts=counts,
        complete=result.complete,
        stopped=result.stopped,
        requests=result.requests,
        throttles=result.throttles,
        wall_s=t_end - t_call,
        cpu_s=cpu,
        t_main=T_MAIN,
        t_call=t_call,
        t_end=t_end,
        profile=profile,
        profile_cumulative=cumulative,
        loop=args.loop if _backend_options(args.loop) else "asyncio",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
