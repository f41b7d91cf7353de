"""Scale: peak RSS by list size, resume of a long ledger, and the floor (no HTTP).

::

    .venv/bin/python -m benchmarks.bench_scale [--sizes 1000000,10000000] [--resume-size 10000000]
        [--floor-size 1000000] [--skip runs,resume,floor] [--no-pin] [--workdir DIR]

Time on the 2-core reference machine: about 6 minutes with the defaults (the 10M run
takes about 2.5 minutes at ~70 000 recipients/s; writing the 10M-row CSVs and the
10M-line ledger about 40 s; the rest is the 1M run, the resume and the floor). Disk: about
1.5 GB in the work directory (a temp dir, removed at the end, unless ``--workdir``).

1. **Runs**: for each size, a CSV of that many synthetic recipients and one sluice run
   (``pipeline.app.api.start_run``, V3, batches of 100, 64 in flight, 100 000 requests/s
   allowed) in a child process against :mod:`benchmarks.responder`; peak RSS (the child's
   ``ru_maxrss``), recipients/s, CPU µs per recipient; growth of the peak RSS from the
   smallest size to the largest. A 1 000-recipient run gives the fixed cost (imports).
2. **Resume**: a run directory for a CSV of N+1 rows whose ledger already holds N sent
   recipients (written directly, in the format of ``pipeline/ledger.py``: per batch of
   100 an intent line, an attempt line and 100 recipient lines, then ``{"eof":N+1}``), so
   exactly the last row is left. ``pipeline.app.api.resume_run`` runs in a child; reported:
   the time from spawning the child (and from the API call) to the first request reaching
   the responder, the whole resume's time, its peak RSS. It must send exactly one
   recipient and end complete.
3. **Floor**: :mod:`benchmarks.floor` over N rows: the CSV source alone, plus the ledger
   writes (the floor), plus rendering and batching, plus V3 signing: CPU µs per recipient
   of each, each in its own child.

JSON: ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    TEST_ENV,
    BenchError,
    ForeignLoad,
    Responder,
    campaign_data,
    machine_info,
    markdown_table,
    responder,
    run_child,
    wait_quiet,
    write_csv,
    write_json,
)

__all__ = ("main", "write_ledger")

GOAL_RSS_MIB = 120.0
GOAL_GROWTH = 0.10
GOAL_RESUME_S = 10.0
GOAL_RESUME_RSS_MIB = 250.0
BATCH = 100


def _pin(core: int | None) -> Callable[[], None] | None:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def write_ledger(path: Path, sent: int, eof: int, run_id: str, *, batch: int = BATCH) -> int:
    """A ledger in which rows ``1..sent`` were sent in batches of ``batch``; returns its lines."""
    t = time.time() - 3600
    lines = 0
    with path.open("wb", buffering=1 << 22) as f:
        for lo in range(1, sent + 1, batch):
            hi = min(sent, lo + batch - 1)
            bid = (lo - 1) // batch + 1
            rows = range(lo, hi + 1)
            f.write(
                b'{"i":%d,"a":1,"o":"%s-%d-1","r":[%s],"t":%.3f}\n'
                % (bid, run_id.encode(), bid, b",".join(b"%d" % r for r in rows), t)
            )
            f.write(b'{"b":%d,"a":1,"s":"sent","c":"OK","id":"1^0","ms":1.0,"t":%.3f}\n' % (bid, t))
            f.write(b"".join([b'{"r":%d,"s":"sent","b":%d}\n' % (r, bid) for r in rows]))
            lines += len(rows) + 2
        f.write(b'{"eof":%d}\n' % eof)
    os.chmod(path, 0o600)
    return lines + 1


def _sluice_run(
    resp: Responder, csv_path: Path, n: int, run_dir: Path, core: int | None, max_wait_quiet: float
) -> dict[str, Any]:
    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    before = resp.reset()
    foreign = ForeignLoad()
    out = run_child(
        [
            "-m", "benchmarks.run_sluice", "run", "--csv", str(csv_path), "--url", resp.url,
            "--run-dir", str(run_dir), "--rate", "100000", "--concurrency", "64", "--batch", str(BATCH),
        ],
        env=TEST_ENV,
        preexec=_pin(core),
    )  # fmt: skip
    st = resp.stats()
    foreign_cores = foreign.cores(out["process_cpu_s"] + st["cpu_s"] - before["cpu_s"])
    if out["counts"]["sent"] != n or not out["complete"] or st["recipients"] != n:
        raise BenchError(
            f"run of {n}: sluice reports {out['counts']}, the responder counted {st['recipients']}"
        )
    return {
        "recipients": n,
        "wall_s": out["wall_s"],
        "recipients_per_s": n / out["wall_s"],
        "cpu_us_per_recipient": out["cpu_s"] * 1e6 / n,
        "peak_rss_mib": out["peak_rss_mib"],
        "ledger_bytes": (run_dir / "ledger.jsonl").stat().st_size,
        "foreign_load_cores": round(foreign_cores, 3),
        "quiet_wait": quiet,
    }


def bench_runs(
    resp: Responder, sizes: list[int], work: Path, core: int | None, max_wait_quiet: float
) -> dict[str, Any]:
    runs = []
    for n in [1000, *sizes]:
        csv_path = write_csv(work / f"scale-{n}.csv", n)
        r = _sluice_run(resp, csv_path, n, work / f"run-scale-{n}", core, max_wait_quiet)
        runs.append(r)
        print(
            f"run {n:>10,}: peak RSS {r['peak_rss_mib']:.1f} MiB, {r['recipients_per_s']:,.0f} recipients/s, "
            f"{r['cpu_us_per_recipient']:.2f} µs CPU/recipient; "
            f"others used {r['foreign_load_cores']:.2f} cores",
            file=sys.stderr,
        )
        csv_path.unlink()
    baseline, measured = runs[0], runs[1:]
    out: dict[str, Any] = {"baseline_1000": baseline, "runs": measured}
    if measured:
        largest = measured[-1]
        out["largest_peak_rss_mib"] = largest["peak_rss_mib"]
        out["goal_rss"] = {"goal": f"<= {GOAL_RSS_MIB} MiB", "met": largest["peak_rss_mib"] <= GOAL_RSS_MIB}
    if len(measured) >= 2:
        growth = measured[-1]["peak_rss_mib"] / measured[0]["peak_rss_mib"] - 1
        out["rss_growth"] = growth
        out["goal_growth"] = {
            "goal": f"<= {GOAL_GROWTH:.0%}",
            "measured": growth,
            "met": growth <= GOAL_GROWTH,
        }
    return out


def bench_resume(
    resp: Responder, n: int, work: Path, core: int | None, max_wait_quiet: float
) -> dict[str, Any]:
    from pipeline.app.api import check_source
    from pipeline.app.campaign import parse_campaign
    from pipeline.app.rundir import RunDir

    t0 = time.monotonic()
    csv_path = write_csv(work / f"resume-{n + 1}.csv", n + 1)
    run_dir = work / "run-resume"
    campaign = parse_campaign(
        campaign_data(csv_path, resp.url, rate=100_000, concurrency=64, batch=BATCH), run_dir
    )
    doc = RunDir(run_dir).create(campaign.to_dict(), campaign.digest(), check_source(campaign))
    lines = write_ledger(RunDir(run_dir).ledger, n, n + 1, doc["run_id"])
    prepared = time.monotonic() - t0
    ledger_bytes = RunDir(run_dir).ledger.stat().st_size
    print(
        f"resume: ledger of {lines:,} lines ({ledger_bytes / 2**20:.0f} MiB) in {prepared:.1f} s",
        file=sys.stderr,
    )

    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    before = resp.reset()
    foreign = ForeignLoad()
    t_spawn = time.monotonic()
    out = run_child(
        ["-m", "benchmarks.run_sluice", "resume", "--url", resp.url, "--run-dir", str(run_dir)],
        env=TEST_ENV,
        preexec=_pin(core),
    )
    st = resp.stats()
    foreign_cores = foreign.cores(out["process_cpu_s"] + st["cpu_s"] - before["cpu_s"])
    if st["posts"] != 1 or st["recipients"] != 1:
        raise BenchError(f"resume sent {st['recipients']} recipients in {st['posts']} requests, not 1 in 1")
    if out["counts"]["sent"] != n + 1 or not out["complete"]:
        raise BenchError(f"resume did not complete: {out['counts']}")
    first = st["first_post"]
    result = {
        "ledger_lines": lines,
        "ledger_bytes": ledger_bytes,
        "source_rows": n + 1,
        "first_send_from_spawn_s": first - t_spawn,
        "first_send_from_api_call_s": first - out["t_call"],
        "startup_s": out["t_call"] - t_spawn,
        "resume_total_s": out["t_end"] - t_spawn,
        "cpu_s": out["cpu_s"],
        "peak_rss_mib": out["peak_rss_mib"],
        "foreign_load_cores": round(foreign_cores, 3),
        "quiet_wait": quiet,
    }
    result["goal"] = {
        "goal": f"<= {GOAL_RESUME_S} s and <= {GOAL_RESUME_RSS_MIB} MiB",
        "met": result["first_send_from_spawn_s"] <= GOAL_RESUME_S
        and out["peak_rss_mib"] <= GOAL_RESUME_RSS_MIB,
    }
    csv_path.unlink()
    return result


def bench_floor(n: int, work: Path, core: int | None, max_wait_quiet: float) -> dict[str, Any]:
    csv_path = write_csv(work / f"floor-{n}.csv", n)
    stages: dict[str, Any] = {}
    for stage in ("source", "ledger", "render", "sign"):
        quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
        foreign = ForeignLoad()
        out = run_child(
            ["-m", "benchmarks.floor", str(csv_path), str(work / f"floor-{stage}.jsonl"), "--stage", stage],
            preexec=_pin(core),
        )
        if out["rows"] != n:
            raise BenchError(f"floor {stage}: {out['rows']} rows read of {n}")
        stages[stage] = {
            "cpu_us_per_recipient": out["cpu_s"] * 1e6 / n,
            "cpu_s": out["cpu_s"],
            "peak_rss_mib": out["peak_rss_mib"],
            "ledger_bytes": out["ledger_bytes"],
            "foreign_load_cores": round(foreign.cores(out["process_cpu_s"]), 3),
            "quiet_wait": quiet,
        }
        (work / f"floor-{stage}.jsonl").unlink(missing_ok=True)
        print(
            f"floor {stage:7s}: {stages[stage]['cpu_us_per_recipient']:.2f} µs CPU/recipient", file=sys.stderr
        )
    csv_path.unlink()
    return {"recipients": n, "stages": stages}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated recipients per run")
    p.add_argument("--resume-size", type=int, default=10_000_000, help="sent rows in the resumed ledger")
    p.add_argument("--floor-size", type=int, default=1_000_000)
    p.add_argument("--skip", default="", help="comma-separated: runs, resume, floor")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--max-wait-quiet", type=float, default=30.0, help="wait up to N s for others to go quiet")
    p.add_argument("--workdir", type=Path, help="default: a temp dir, removed afterwards")
    p.add_argument("--out", default="scale.json", help="file name under benchmarks/results/")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    skip = {s for s in args.skip.split(",") if s}
    limit = 20_000_000
    if any(not 1000 <= s <= limit for s in sizes) or not 1000 <= args.resume_size <= limit:
        p.error(f"sizes must be 1000..{limit}")
    if not 1000 <= args.floor_size <= limit:
        p.error(f"--floor-size must be 1000..{limit}")
    cores = os.sched_getaffinity(0)
    pin = not args.no_pin and len(cores) >= 2
    client_core = min(cores) if pin else None

    doc: dict[str, Any] = {
        "benchmark": "scale",
        "command": "python -m benchmarks.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sluice-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with responder() as resp:
            if pin:
                os.sched_setaffinity(resp.proc.pid, {max(cores)})
            if "runs" not in skip:
                doc["runs"] = bench_runs(resp, sizes, work, client_core, args.max_wait_quiet)
            if "resume" not in skip:
                doc["resume"] = bench_resume(resp, args.resume_size, work, client_core, args.max_wait_quiet)
        if "floor" not in skip:
            doc["floor"] = bench_floor(args.floor_size, work, client_core, args.max_wait_quiet)
    doc["elapsed_s"] = time.monotonic() - started
    path = write_json(args.out, doc)

    if "runs" in doc:
        runs = doc["runs"]
        rows = [
            [
                r["recipients"],
                r["peak_rss_mib"],
                r["recipients_per_s"],
                r["cpu_us_per_recipient"],
                r["wall_s"],
            ]
            for r in [runs["baseline_1000"], *runs["runs"]]
        ]
        print(
            markdown_table(["recipients", "peak RSS MiB", "recipients/s", "CPU µs/recipient", "wall s"], rows)
        )
        if "rss_growth" in runs:
            print(f"peak RSS growth {sizes[0]:,} → {sizes[-1]:,}: {100 * runs['rss_growth']:+.1f} %")
        print()
    if "resume" in doc:
        r = doc["resume"]
        print(
            markdown_table(
                [
                    "ledger lines",
                    "to first send (from spawn)",
                    "(from API call)",
                    "whole resume",
                    "peak RSS MiB",
                ],
                [
                    [
                        r["ledger_lines"],
                        f"{r['first_send_from_spawn_s']:.2f} s",
                        f"{r['first_send_from_api_call_s']:.2f} s",
                        f"{r['resume_total_s']:.2f} s",
                        r["peak_rss_mib"],
                    ]
                ],
            )
        )
        print()
    if "floor" in doc:
        f = doc["floor"]
        print(
            markdown_table(
                ["stage (cumulative, no HTTP)", "CPU µs/recipient", "peak RSS MiB"],
                [[k, v["cpu_us_per_recipient"], v["peak_rss_mib"]] for k, v in f["stages"].items()],
            )
        )
    print(f"\nwritten {path} ({doc['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
