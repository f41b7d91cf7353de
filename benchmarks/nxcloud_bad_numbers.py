"""NXCloud with bad numbers: what the ledger says against what the simulator accepted.

::

    python -m benchmarks.nxcloud_bad_numbers [--recipients 100000] [--bad-rate 0.01] [--refuse]
                                             [--batch 200] [--concurrency 8] [--dir DIR]

Runs ``sluice run`` against ``sluice simulate --bad-number-rate R`` (``--refuse``: the simulator
refuses a whole call holding a bad number with 13005 instead of answering its item ``Failure``)
and prints one JSON line: good recipients wrongly failed, failures recorded as sent, numbers
accepted twice, requests sent, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from providers.simulator.config import SimulatorConfig
from tests.helpers import simulator, sluice, write_recipients
from tests.test_nxcloud_e2e import campaign, recipient_lines


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.nxcloud_bad_numbers")
    ap.add_argument("--recipients", type=int, default=100_000)
    ap.add_argument("--bad-rate", type=float, default=0.01)
    ap.add_argument("--refuse", action="store_true", help="13005 for the whole call, not a Failure item")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="nxcloud-bad-"))
    work.mkdir(parents=True, exist_ok=True)
    phones = write_recipients(work / "recipients.csv", args.recipients)
    predict = SimulatorConfig(bad_number_rate=args.bad_rate)
    bad = {row for row, phone in phones.items() if predict.is_bad_number(phone)}
    sim_args = ["--bad-number-rate", str(args.bad_rate)] + (
        ["--nxcloud-refuse-bad-numbers"] if args.refuse else []
    )
    with simulator(work, *sim_args) as sim:
        c = campaign(work / "c.toml", sim.url, batch_size=args.batch, concurrency=args.concurrency)
        started = time.monotonic()
        run = sluice("run", str(c))
        run.communicate(timeout=3600)
        wall = time.monotonic() - started
        sim.stop()
        accepted = sim.accepted()
    lines = recipient_lines(work / "run" / "ledger.jsonl")
    ledger = (work / "run" / "ledger.jsonl").read_bytes()
    result = {
        "mode": "refuse 13005" if args.refuse else "Failure item",
        "recipients": args.recipients,
        "bad": len(bad),
        "exit": run.returncode,
        "statuses": dict(Counter(str(line["s"]) for line in lines.values())),
        "good_wrongly_failed": sum(lines[r]["s"] == "failed" for r in phones if r not in bad),
        "failures_recorded_sent": sum(lines[r]["s"] == "sent" for r in bad),
        "bad_accepted": sum(accepted["86" + phones[r]] > 0 for r in bad),
        "accepted_twice": sum(n > 1 for n in accepted.values()),
        "requests": ledger.count(b'{"i":'),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
