"""``sluice run CAMPAIGN --workers 2`` against ``--workers 1`` (and a plain ``sluice run``), whole
processes, on this machine's cores, against the fast responder::

    .venv/bin/python -m benchmarks.bench_workers [--recipients 1000000] [--rounds 2]
        [--max-wait-quiet 10] [--workdir DIR]

The list is bench_campaign's realistic one (``write_realistic_csv``: 1 % duplicate keys,
Chinese names, 26 real prefixes); the campaign is its Aliyun SendBatchSms one (batches of 100,
64 in flight, 100 000 requests/s allowed, so the limit never binds). Nothing is pinned: the
workers and the responder share the cores, as they would. Per run, timed from spawn to exit:
recipients/s, the CPU of the whole process tree (``wait4``'s rusage: the parent and the
workers it waited for), the responder's CPU and its share of all the CPU used, and the CPU
other processes on the machine used meanwhile (``ForeignLoad``). Every run must deliver:
the responder must count exactly the distinct recipients. The order of the clients rotates
each round; medians over rounds, and the per-round ratio of ``--workers 2`` to ``--workers 1``.
Figures to ``benchmarks/results/workers.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_campaign import ENV, campaign_toml, write_realistic_csv
from benchmarks.common import (
    REPO,
    BenchError,
    ForeignLoad,
    Responder,
    compile_bytecode,
    machine_info,
    markdown_table,
    median,
    responder,
    wait_quiet,
    write_json,
)

__all__ = ("main",)

CLIENTS: dict[str, list[str]] = {
    "run": [],
    "workers-1": ["--workers", "1"],
    "workers-2": ["--workers", "2"],
}


def measure(
    name: str, resp: Responder, *, toml: Path, run_dir: Path, distinct: int, max_wait_quiet: float
) -> dict[str, Any]:
    """One whole-process run; checks delivery; returns its figures."""
    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    shutil.rmtree(run_dir, ignore_errors=True)
    before = resp.reset()
    foreign = ForeignLoad()
    args = [sys.executable, "-m", "pipeline.app.cli", "run", str(toml), "--run-dir", str(run_dir)]
    out = run_dir.with_name(run_dir.name + ".out")
    with out.open("wb") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*args, *CLIENTS[name]], cwd=REPO, env={**os.environ, **ENV}, stdout=f, stderr=subprocess.STDOUT
        )
    deadline = t0 + 1800
    while True:  # bounded: wait4 without blocking forever
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"{name} ran past 1800 s")
        time.sleep(0.005)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{name} exited {code}:\n{out.read_text(errors='replace')[-3000:]}")
    after = resp.stats()
    if after["recipients"] != distinct:
        raise BenchError(
            f"{name}: {distinct} distinct recipients, the responder counted {after['recipients']}"
        )
    cpu = ru.ru_utime + ru.ru_stime  # the parent and every worker it waited for
    resp_cpu = after["cpu_s"] - before["cpu_s"]
    return {
        "client": name,
        "wall_s": round(wall, 3),
        "recipients_per_s": distinct / wall,
        "tree_cpu_s": round(cpu, 3),
        "tree_cores": round(cpu / wall, 3),
        "cpu_us_per_recipient": cpu / distinct * 1e6,
        "responder_cpu_s": round(resp_cpu, 3),
        "responder_cores": round(resp_cpu / wall, 3),
        "responder_share": round(resp_cpu / (cpu + resp_cpu), 4),
        "requests": after["posts"],
        "foreign_load_cores": round(foreign.cores(cpu + resp_cpu), 3),
        "quiet": quiet,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-wait-quiet", type=float, default=10.0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    bytecode = compile_bytecode()  # as pip install does: see benchmarks.common.compile_bytecode
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"recipients-{args.recipients}.csv"
    distinct = write_realistic_csv(csv_path, args.recipients)
    runs: list[dict[str, Any]] = []
    names = list(CLIENTS)
    with responder() as resp:
        toml = work / "campaign.toml"
        toml.write_text(campaign_toml("aliyun", csv_path, resp.url, work / "run"), encoding="utf-8")
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                r = measure(
                    name,
                    resp,
                    toml=toml,
                    run_dir=work / f"run-{name}",
                    distinct=distinct,
                    max_wait_quiet=args.max_wait_quiet,
                )
                r["round"] = round_no
                runs.append(r)
                print(
                    f"round {round_no} {name}: {r['recipients_per_s']:,.0f}/s, {r['tree_cores']:.2f} cores, "
                    f"responder {r['responder_cores']:.2f} cores ({r['responder_share']:.1%}), "
                    f"others {r['foreign_load_cores']:.2f} cores",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r["client"] == name]
        summary[name] = {
            k: median([r[k] for r in mine])
            for k in (
                "recipients_per_s",
                "tree_cores",
                "cpu_us_per_recipient",
                "responder_cores",
                "responder_share",
                "foreign_load_cores",
            )
        }
    by_round = {(r["round"], r["client"]): r["recipients_per_s"] for r in runs}
    ratios = [by_round[n, "workers-2"] / by_round[n, "workers-1"] for n in range(args.rounds)]
    ratio_vs_run = [by_round[n, "workers-2"] / by_round[n, "run"] for n in range(args.rounds)]
    result = {
        "benchmark": "workers",
        "command": "python -m benchmarks.bench_workers " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "bytecode": bytecode,
        "rows": args.recipients,
        "distinct_recipients": distinct,
        "summary": summary,
        "ratio_workers2_vs_workers1": {"rounds": ratios, "median": median(ratios)},
        "ratio_workers2_vs_run": {"rounds": ratio_vs_run, "median": median(ratio_vs_run)},
        "runs": runs,
    }
    path = write_json("workers.json", result)
    rows = [
        [
            name,
            f"{s['recipients_per_s']:,.0f}",
            f"{s['tree_cores']:.2f}",
            f"{s['cpu_us_per_recipient']:.1f}",
            f"{s['responder_cores']:.2f} ({s['responder_share']:.1%})",
            f"{s['foreign_load_cores']:.2f}",
        ]
        for name, s in summary.items()
    ]
    print(
        markdown_table(
            [
                "client",
                "recipients/s",
                "cores",
                "CPU µs/recipient",
                "responder cores (share)",
                "others' cores",
            ],
            rows,
        )
    )
    print(f"--workers 2 / --workers 1: {median(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"--workers 2 / sluice run: {median(ratio_vs_run):.2f}")
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
