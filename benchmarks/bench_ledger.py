"""The ledger alone: its hot path, its replay, and what ``durability = "batch"`` costs a run.

::

    .venv/bin/python -m benchmarks.bench_ledger [--recipients 200000] [--run-recipients 100000]
        [--rounds 3] [--skip hot,runs] [--workdir DIR]

1. **Hot path** (in this process, no HTTP): per batch of 100 bare messages, the intent line
   (``LedgerWriter.intent``, one ``os.write``) and the outcome lines (``LedgerWriter.outcome``,
   ``SENT``), keys = row numbers (the benchmarks' campaign) and keyed; then ``replay`` of the
   ledger written. CPU µs per recipient (writes) and per line (replay); medians over rounds.
2. **Runs**: one sluice run per durability mode (``process``, ``batch``) in a child process
   against :mod:`benchmarks.responder` (``benchmarks.run_sluice``: V3, batches of 100, 64 in
   flight, 100 000 requests/s allowed); requests/s and recipients/s; medians over rounds,
   the modes alternating within each round.

JSON: ``benchmarks/results/ledger.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import TEST_ENV, BenchError, responder, run_child, write_csv, write_json
from pipeline.ledger import LedgerWriter, replay
from providers.base import Batch, BatchOutcome, Message, Outcome

__all__ = ("bench_hot_path", "bench_runs", "main")

BATCH = 100


def _hot_round(path: Path, n: int, *, keyed: bool) -> dict[str, float]:
    path.unlink(missing_ok=True)
    msgs = [Message(r, f"cust-{r}" if keyed else str(r), f"139{r:08d}", {}, "sign") for r in range(1, n + 1)]
    batches = [Batch(i // BATCH + 1, msgs[i : i + BATCH]) for i in range(0, n, BATCH)]
    for b in batches:
        b.out_id = f"bench-{b.id}-1"
    sent = BatchOutcome(Outcome.SENT, code="OK", provider_id="1^0")
    writer = LedgerWriter(path, keyed=keyed)
    cpu0 = time.process_time()
    for b in batches:
        writer.intent(b)
        writer.outcome(b, sent, 1.0)
    writer.close()
    write_cpu = time.process_time() - cpu0
    lines = sum(1 for _ in path.open("rb"))
    cpu0 = time.process_time()
    state = replay(path)
    replay_cpu = time.process_time() - cpu0
    if state.counts()["sent"] != n:
        raise BenchError(f"replay found {state.counts()} for {n} sent rows")
    return {"write_us_per_recipient": write_cpu * 1e6 / n, "replay_us_per_line": replay_cpu * 1e6 / lines}


def bench_hot_path(work: Path, n: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"recipients": n, "rounds": rounds}
    for keyed in (False, True):
        results = [_hot_round(work / "hot.jsonl", n, keyed=keyed) for _ in range(rounds)]
        name = "keyed" if keyed else "row_keys"
        out[name] = {k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}
        print(f"hot path ({name}): {out[name]}", file=sys.stderr)
    return out


def bench_runs(work: Path, n: int, rounds: int) -> dict[str, Any]:
    csv_path = write_csv(work / "ledger-bench.csv", n)
    figures: dict[str, list[dict[str, float]]] = {"process": [], "batch": []}
    with responder() as resp:
        for r in range(rounds):
            for mode in figures if r % 2 == 0 else reversed(figures):
                run_dir = work / f"run-{mode}-{r}"
                resp.reset()
                out = run_child(
                    [
                        "-m", "benchmarks.run_sluice", "run", "--csv", str(csv_path), "--url", resp.url,
                        "--run-dir", str(run_dir), "--durability", mode,
                    ],
                    env=TEST_ENV,
                )  # fmt: skip
                st = resp.stats()
                if out["counts"]["sent"] != n or not out["complete"] or st["recipients"] != n:
                    raise BenchError(f"{mode}: sluice reports {out['counts']}, responder {st['recipients']}")
                requests = st["posts"]
                figures[mode].append(
                    {
                        "requests_per_s": requests / out["wall_s"],
                        "recipients_per_s": n / out["wall_s"],
                        "cpu_us_per_recipient": out["cpu_s"] * 1e6 / n,
                    }
                )
                print(f"round {r + 1} {mode}: {figures[mode][-1]}", file=sys.stderr)
    csv_path.unlink()
    return {
        mode: {k: round(statistics.median(f[k] for f in runs), 1) for k in runs[0]}
        for mode, runs in figures.items()
    } | {"recipients": n, "rounds": rounds}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_ledger")
    p.add_argument("--recipients", type=int, default=200_000, help="hot path and replay")
    p.add_argument("--run-recipients", type=int, default=100_000, help="each run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated: hot, runs")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="sluice-bench-ledger-", dir=args.workdir) as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {}
        if "hot" not in skip:
            result["hot_path"] = bench_hot_path(work, args.recipients, args.rounds)
        if "runs" not in skip:
            result["runs"] = bench_runs(work, args.run_recipients, args.rounds)
    write_json("ledger.json", result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
