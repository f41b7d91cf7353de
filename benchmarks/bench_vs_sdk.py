"""sluice versus the official Aliyun SDK and two hand-written senders, same responder, same run.

::

    .venv/bin/python -m benchmarks.bench_vs_sdk [--recipients 200000] [--rounds 3]
        [--httpx-recipients N] [--peers sdk,sluice,httpx,aiohttp] [--profile cprofile,sample|none]
        [--no-pin]

Starts :mod:`benchmarks.responder` (its own process, pinned to the last core), writes a CSV
of N synthetic recipients once, then for K rounds runs each client in a fresh child process
(pinned to core 0) in a rotating order: the official SDK (32 threads), sluice
(``pipeline.app.api.start_run``, V3, batches of 100, 64 in flight, 100 000 requests/s allowed,
fresh run directory), a sequential httpx loop and aiohttp behind a semaphore of 64
(:mod:`benchmarks.peers`). Every run must deliver: the responder must count exactly N
recipients in ceil(N/100) requests and the client must report N accepted, or the
benchmark fails.

Per client, the median over rounds of: recipients/s (wall time of the sending, in the
child), CPU µs per recipient (user+sys of the child during the sending, every thread),
peak RSS (the child's ru_maxrss, whole process), and the ratios sluice/peer. The
responder's own CPU per request is reported too. The table goes to stdout, the figures to
``benchmarks/results/vs_sdk.json``. Then one extra sluice run per profiler (not in the
medians) gives the top functions by self time: ``cprofile`` (exact calls, but its per-call
overhead inflates small Python functions) and ``sample`` (a sampling thread; time in C is
charged to its Python caller). ``pyinstrument`` is accepted but currently makes
``LedgerWriter.flush`` raise BufferError (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    TEST_ENV,
    BenchError,
    ForeignLoad,
    Responder,
    machine_info,
    markdown_table,
    median,
    responder,
    run_child,
    wait_quiet,
    write_csv,
    write_json,
)

__all__ = ("main", "measure")

CLIENTS = ("sdk", "sluice", "httpx", "aiohttp")
LABELS = {
    "sdk": "official SDK (32 threads)",
    "sluice": "sluice (start_run)",
    "httpx": "httpx, sequential",
    "aiohttp": "aiohttp + Semaphore(64)",
}
GOAL_SPEEDUP_VS_SDK = 2.0
GOAL_CPU_US = 4.0
# The issue set 4 µs when the official SDK measured 10.6 µs CPU per recipient on its machine;
# CPU speed here varies by day (and hour), so the goal is also read as that ratio to the SDK
# measured in the same run.
ISSUE_SDK_CPU_US = 10.6


def _pin(core: int | None) -> Callable[[], None] | None:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def measure(
    client: str,
    resp: Responder,
    *,
    n: int,
    csv_path: Path,
    work: Path,
    round_no: int,
    core: int | None,
    profile: str | None = None,
    max_wait_quiet: float = 0.0,
) -> dict[str, Any]:
    """One run of ``client`` against ``resp``; checks delivery; returns its figures."""
    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    before = resp.reset()
    foreign = ForeignLoad()
    if client == "sluice":
        run_dir = work / f"run-{round_no}-{client}-{profile or 'bench'}"
        args = [
            "-m",
            "benchmarks.run_sluice",
            "run",
            "--csv",
            str(csv_path),
            "--url",
            resp.url,
            "--run-dir",
            str(run_dir),
            "--rate",
            "100000",
            "--concurrency",
            "64",
            "--batch",
            "100",
        ]
        if profile:
            args += ["--profile", profile, "--profile-out", str(work / f"profile-{profile}.out")]
        out = run_child(args, env=TEST_ENV, preexec=_pin(core))
        accepted = out["counts"]["sent"]
        if not out["complete"]:
            raise BenchError(f"sluice did not complete: {out}")
    else:
        out = run_child(["-m", "benchmarks.peers", client, resp.url, str(n)], preexec=_pin(core))
        accepted = out["accepted"]
    after = resp.stats()
    resp_cpu = after["cpu_s"] - before["cpu_s"]
    foreign_cores = foreign.cores(out["process_cpu_s"] + resp_cpu)
    posts = after["posts"]
    if accepted != n or after["recipients"] != n or posts != math.ceil(n / 100):
        raise BenchError(
            f"{client} round {round_no}: {n} recipients asked, client reports {accepted}, the responder "
            f"counted {after['recipients']} in {posts} requests"
        )
    wall = out["wall_s"]
    return {
        "client": client,
        "round": round_no,
        "recipients": n,
        "requests": posts,
        "wall_s": round(wall, 4),
        "recipients_per_s": n / wall,
        "cpu_s": round(out["cpu_s"], 4),
        "cpu_us_per_recipient": out["cpu_s"] * 1e6 / n,
        "process_cpu_us_per_recipient": out["process_cpu_s"] * 1e6 / n,
        "peak_rss_mib": out["peak_rss_mib"],
        "responder_cpu_us_per_request": resp_cpu * 1e6 / posts,
        "responder_cpu_share": resp_cpu / out["cpu_s"] if out["cpu_s"] else math.nan,
        "foreign_load_cores": round(foreign_cores, 3),
        "quiet_wait": quiet,
        "profile": out.get("profile"),
        "profile_cumulative": out.get("profile_cumulative"),
    }


def summarize(runs: list[dict[str, Any]], clients: Sequence[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for c in clients:
        mine = [r for r in runs if r["client"] == c and not r.get("profile")]
        if not mine:
            continue
        summary[c] = {
            "label": LABELS[c],
            "rounds": len(mine),
            "recipients": mine[0]["recipients"],
            "recipients_per_s": median([r["recipients_per_s"] for r in mine]),
            "cpu_us_per_recipient": median([r["cpu_us_per_recipient"] for r in mine]),
            "process_cpu_us_per_recipient": median([r["process_cpu_us_per_recipient"] for r in mine]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in mine]),
            "responder_cpu_us_per_request": median([r["responder_cpu_us_per_request"] for r in mine]),
            "responder_cpu_share": median([r["responder_cpu_share"] for r in mine]),
            "max_foreign_load_cores": max(r["foreign_load_cores"] for r in mine),
        }
    s = summary.get("sluice")
    if s is not None:
        for row in summary.values():
            row["sluice_over_peer"] = {
                "recipients_per_s": s["recipients_per_s"] / row["recipients_per_s"],
                "cpu_us_per_recipient": s["cpu_us_per_recipient"] / row["cpu_us_per_recipient"],
                "peak_rss_mib": s["peak_rss_mib"] / row["peak_rss_mib"],
            }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vs_sdk", description=__doc__.split("\n")[0])
    p.add_argument("--recipients", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--httpx-recipients", type=int, help="fewer for the sequential httpx loop (default: N)")
    p.add_argument(
        "--peers", default=",".join(CLIENTS), help="comma-separated subset of " + ",".join(CLIENTS)
    )
    p.add_argument(
        "--profile",
        default="cprofile,sample",
        help="comma-separated: cprofile, sample, pyinstrument; or none",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the responder and the clients to cores")
    p.add_argument(
        "--max-wait-quiet",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for other processes to go quiet (0: never)",
    )
    p.add_argument("--workdir", type=Path, help="keep the CSV and run directories here (default: a temp dir)")
    p.add_argument("--out", default="vs_sdk.json", help="file name under benchmarks/results/")
    args = p.parse_args(argv)
    n: int = args.recipients
    if not 100 <= n <= 10_000_000 or not 1 <= args.rounds <= 20:
        p.error("--recipients must be 100..10 000 000 and --rounds 1..20")
    clients = [c for c in args.peers.split(",") if c]
    for c in clients:
        if c not in CLIENTS:
            p.error(f"unknown client {c!r}")
    n_httpx = min(n, args.httpx_recipients or n)
    kinds = [k for k in args.profile.split(",") if k and k != "none"]
    for k in kinds:
        if k not in ("cprofile", "sample", "pyinstrument"):
            p.error(f"unknown profiler {k!r}")
    cores = os.sched_getaffinity(0)
    pin = not args.no_pin and len(cores) >= 2
    client_core = min(cores) if pin else None
    responder_core = max(cores) if pin else None

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        csv_path = write_csv(work / f"recipients-{n}.csv", n)
        runs: list[dict[str, Any]] = []
        with responder() as resp:
            if responder_core is not None:
                os.sched_setaffinity(resp.proc.pid, {responder_core})
            for rnd in range(args.rounds):
                order = clients[rnd % len(clients) :] + clients[: rnd % len(clients)]
                for c in order:
                    size = n_httpx if c == "httpx" else n
                    r = measure(
                        c, resp, n=size, csv_path=csv_path, work=work, round_no=rnd, core=client_core,
                        max_wait_quiet=args.max_wait_quiet,
                    )  # fmt: skip
                    runs.append(r)
                    print(
                        f"round {rnd} {c:8s} {r['recipients_per_s']:>10,.0f} recipients/s "
                        f"{r['cpu_us_per_recipient']:6.2f} µs CPU/recipient {r['peak_rss_mib']:6.1f} MiB "
                        f"(responder {r['responder_cpu_us_per_request']:.0f} µs/request; "
                        f"others used {r['foreign_load_cores']:.2f} cores)",
                        file=sys.stderr,
                    )
            profiles: dict[str, Any] = {}
            for kind in kinds if "sluice" in clients else []:
                profile_run = measure(
                    "sluice",
                    resp,
                    n=n,
                    csv_path=csv_path,
                    work=work,
                    round_no=args.rounds,
                    core=client_core,
                    profile=kind,
                    max_wait_quiet=args.max_wait_quiet,
                )
                runs.append(profile_run)
                profiles[kind] = {
                    "self": profile_run["profile"],
                    "cumulative": profile_run["profile_cumulative"],
                    "recipients_per_s": profile_run["recipients_per_s"],
                    "cpu_us_per_recipient": profile_run["cpu_us_per_recipient"],
                }
        final = resp.final

    summary = summarize(runs, clients)
    sl = summary.get("sluice")
    goals: dict[str, Any] = {}
    if sl is not None:
        goals["cpu_us_per_recipient"] = {
            "goal": f"<= {GOAL_CPU_US}",
            "measured": sl["cpu_us_per_recipient"],
            "met": sl["cpu_us_per_recipient"] <= GOAL_CPU_US,
        }
        if "sdk" in summary:
            cpu_ratio = sl["cpu_us_per_recipient"] / summary["sdk"]["cpu_us_per_recipient"]
            goals["cpu_vs_sdk"] = {
                "goal": f"<= {GOAL_CPU_US / ISSUE_SDK_CPU_US:.3f} (4 µs where the SDK took 10.6)",
                "measured": cpu_ratio,
                "at_issue_sdk_speed_us": cpu_ratio * ISSUE_SDK_CPU_US,
                "met": cpu_ratio <= GOAL_CPU_US / ISSUE_SDK_CPU_US,
            }
            # The machine's speed drifts between rounds; each round runs every client back
            # to back, so the per-round ratios (and their median) see less of the drift.
            rounds: dict[int, dict[str, dict[str, Any]]] = {}
            for r in runs:
                if "round" in r and r.get("profile") is None and r["round"] < args.rounds:
                    rounds.setdefault(r["round"], {})[r["client"]] = r
            pairs = [b for b in rounds.values() if "sluice" in b and "sdk" in b]
            goals["paired_by_round"] = {
                "rate_vs_sdk": [
                    b["sluice"]["recipients_per_s"] / b["sdk"]["recipients_per_s"] for b in pairs
                ],
                "cpu_vs_sdk": [
                    b["sluice"]["cpu_us_per_recipient"] / b["sdk"]["cpu_us_per_recipient"] for b in pairs
                ],
            }
            for k in ("rate_vs_sdk", "cpu_vs_sdk"):
                values = goals["paired_by_round"][k]
                goals["paired_by_round"][k + "_median"] = median(values) if values else None
            speedup = sl["recipients_per_s"] / summary["sdk"]["recipients_per_s"]
            goals["speedup_vs_sdk"] = {
                "goal": f">= {GOAL_SPEEDUP_VS_SDK}",
                "measured": speedup,
                "met": speedup >= GOAL_SPEEDUP_VS_SDK,
            }
    doc = {
        "benchmark": "vs_sdk",
        "command": "python -m benchmarks.bench_vs_sdk "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "pinned": {"client_core": client_core, "responder_core": responder_core},
        "recipients": n,
        "httpx_recipients": n_httpx,
        "rounds": args.rounds,
        "summary": summary,
        "goals": goals,
        "responder_final": final,
        "profiles": profiles,
        "runs": [{k: v for k, v in r.items() if not k.startswith("profile")} for r in runs],
    }
    path = write_json(args.out, doc)

    rows = []
    for s in summary.values():
        ratio = s.get("sluice_over_peer", {})
        rows.append(
            [
                s["label"],
                s["recipients"],
                s["recipients_per_s"],
                s["cpu_us_per_recipient"],
                s["peak_rss_mib"],
                f"{ratio.get('recipients_per_s', math.nan):.2f}×",
                f"{ratio.get('cpu_us_per_recipient', math.nan):.2f}×",
                f"{ratio.get('peak_rss_mib', math.nan):.2f}×",
                s["responder_cpu_us_per_request"],
                s["max_foreign_load_cores"],
            ]
        )
    print(
        markdown_table(
            [
                "client",
                "recipients",
                "recipients/s",
                "CPU µs/recipient",
                "peak RSS MiB",
                "sluice/peer rate",
                "sluice/peer CPU",
                "sluice/peer RSS",
                "responder CPU µs/request",
                "others' load (max, cores)",
            ],
            rows,
        )
    )
    for name, g in goals.items():
        if "goal" in g:
            print(
                f"goal {name}: {g['goal']}, measured {g['measured']:.2f}: {'met' if g['met'] else 'NOT met'}"
            )
    paired = goals.get("paired_by_round")
    if paired and paired["rate_vs_sdk"]:
        print(
            "per round, sluice/SDK: rate "
            + ", ".join(f"{x:.2f}×" for x in paired["rate_vs_sdk"])
            + f" (median {paired['rate_vs_sdk_median']:.2f}×); CPU "
            + ", ".join(f"{x:.3f}×" for x in paired["cpu_vs_sdk"])
            + f" (median {paired['cpu_vs_sdk_median']:.3f}×)"
        )
    for kind, prof in profiles.items():
        if not prof["self"]:
            continue
        print(f"\nsluice under {kind} (an extra run), top functions by self time:")
        print(
            markdown_table(
                ["function", "where", "self %", "cum %" if kind == "sample" else "self s"],
                [
                    [
                        r["function"],
                        r["where"],
                        r["self_pct"],
                        r["cum_pct"] if kind == "sample" else r["self_s"],
                    ]
                    for r in prof["self"]
                ],
            )
        )
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
