"""The engine's CPU per recipient, this checkout against another revision, in alternating pairs.

::

    .venv/bin/python -m benchmarks.ab_engine REV [--recipients 100000] [--rounds 8]

What a refactor is held to (issue 13: "within 5 %"): ``REV`` is extracted with ``git archive``
into a temporary directory; each round runs :mod:`benchmarks.run_sluice` (``start_run`` in a
fresh child process, the same campaign, CSV and responder for both) once from each tree, the
order alternating, and reads the child's CPU seconds of the run (imports excluded). Prints each
round and the medians of CPU µs per recipient, and their ratio. Every run must send every
recipient, or the benchmark fails. Both trees run with this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, TEST_ENV, BenchError, median, responder, write_csv

__all__ = ("main",)


def _extract(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_engine", description=__doc__.split("\n")[0])
    p.add_argument("rev", help="the revision to compare with (e.g. a commit before a refactor)")
    p.add_argument("--recipients", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    if not 1000 <= args.recipients <= 2_000_000 or not 1 <= args.rounds <= 30:
        p.error("--recipients 1000..2 000 000, --rounds 1..30")
    cpu: dict[str, list[float]] = {"HEAD": [], args.rev: []}
    with tempfile.TemporaryDirectory(prefix="sluice-ab-") as tmp, responder() as resp:
        other = Path(tmp) / "other"
        other.mkdir()
        _extract(args.rev, other)
        trees = {"HEAD": REPO, args.rev: other}
        csv_path = write_csv(Path(tmp) / "r.csv", args.recipients)
        for rnd in range(args.rounds):
            order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
            for name in order:
                run_dir = Path(tmp) / f"run-{rnd}-{len(cpu[name])}-{name.replace('/', '_')}"
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.run_sluice", "run", "--csv", str(csv_path),
                     "--url", resp.url, "--run-dir", str(run_dir)],
                    cwd=trees[name], env={**os.environ, **TEST_ENV, "PYTHONPATH": str(trees[name])},
                    capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if out.returncode != 0:
                    raise BenchError(f"{name}: {out.stderr[-2000:]}")
                doc = json.loads(out.stdout.strip().splitlines()[-1])
                if doc["counts"]["sent"] != args.recipients:
                    raise BenchError(f"{name} sent {doc['counts']['sent']} of {args.recipients}")
                cpu[name].append(doc["cpu_s"] * 1e6 / args.recipients)
                print(f"round {rnd} {name:>12s} {cpu[name][-1]:6.2f} µs CPU/recipient", file=sys.stderr)
    head, base = median(cpu["HEAD"]), median(cpu[args.rev])
    print(f"median CPU µs/recipient: HEAD {head:.2f}, {args.rev} {base:.2f}, ratio {head / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
