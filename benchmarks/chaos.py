"""Crash harness: SIGKILL a run at random moments, resume until done, count from the provider's side.

    .venv/bin/python -m benchmarks.chaos --recipients 1000000 --kills 30 --fault-rate 0.02

Against the simulator (2 % faults by default), a campaign is started, killed with SIGKILL at
``--kills`` random moments (each after a random 0.3–3 s of sending) and resumed each time, then
resumed once more to the end. From the simulator's receipts against the source it reports:

* lost: recipients with no terminal ledger line, or ``sent`` without a receipt;
* duplicates outside unknown: numbers accepted more than once whose final status is not ``unknown``;
* unknown recipients, against what was in flight at the kills (the intents each kill left open)
  and what the injected faults made ambiguous.

Bounded: every process has a deadline, the simulator listens on 127.0.0.1 only.
Results go to benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from pipeline.ledger import Recipient, Status, events, replay

REPO = Path(__file__).resolve().parents[1]


def write_recipients(path: Path, n: int) -> dict[int, str]:
    phones = {}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "phone", "code"])
        for i in range(1, n + 1):
            phone = f"13{(i * 7919) % 10**9:09d}"
            w.writerow([f"c{i}", phone, f"{i % 1000000:06d}"])
            phones[i] = phone
    return phones


def campaign(path: Path, url: str, rps: int) -> None:
    path.write_text(
        f"""
[source]
kind = "csv"
path = "recipients.csv"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{url}"
timeout = 2.0
[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ code = "{{code}}" }}
[limits]
requests_per_second = {rps}
concurrency = 32
batch_size = 100
breaker_threshold = 0
[run]
dir = "run"
"""
    )


def sluice(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipients", type=int, default=1_000_000)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--fault-rate", type=float, default=0.02)
    ap.add_argument("--rps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chaos.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        phones = write_recipients(tmp / "recipients.csv", args.recipients)
        receipts = tmp / "receipts.jsonl"
        sim = subprocess.Popen(
            [sys.executable, "-m", "providers.simulator", "--port", "0", "--receipts", str(receipts),
             "--fault-rate", str(args.fault_rate), "--seed", str(args.seed), "--slow-ms", "3000"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert sim.stdout is not None
        url = sim.stdout.readline().decode().strip()
        campaign(tmp / "c.toml", url, args.rps)
        ledger = tmp / "run" / "ledger.jsonl"
        in_flight_at_kills: list[int] = []
        kills = 0
        try:
            for i in range(args.kills):
                p = sluice(*(("run", str(tmp / "c.toml")) if i == 0 else ("resume", str(tmp / "run"))))
                try:
                    p.wait(timeout=rng.uniform(0.3, 3.0) + (2.0 if i else 0.5))
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills += 1
                    in_flight_at_kills.append(replay(ledger).count(Status.INFLIGHT))
                    continue
                break  # finished before this kill
            final = sluice("resume", str(tmp / "run"))
            final_code = final.wait(timeout=3600)
        finally:
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=60)
            sim.stdout.close()
        statuses: dict[int, str] = {}
        interrupted = 0
        for event in events(ledger):
            if isinstance(event, Recipient):
                statuses[event.row] = event.status
                interrupted += event.code == "Interrupted"
        accepted: Counter[str] = Counter()
        with receipts.open("rb") as f:
            for line in f:
                accepted[orjson.loads(line)["phone"][-11:]] += 1
    final_status = Counter(statuses.get(r, "missing") for r in phones)
    lost = sum(
        1 for r, p in phones.items() if r not in statuses or (statuses[r] == "sent" and not accepted[p])
    )
    dup_outside = sum(1 for r, p in phones.items() if accepted[p] > 1 and statuses.get(r) != "unknown")
    result = {
        "recipients": args.recipients,
        "kills": kills,
        "fault_rate": args.fault_rate,
        "final_exit_code": final_code,
        "lost": lost,
        "duplicates_outside_unknown": dup_outside,
        "final_status": dict(final_status),
        "unknown_from_kills": interrupted,
        "in_flight_at_kills": sum(in_flight_at_kills),
        "max_in_flight_at_one_kill": max(in_flight_at_kills, default=0),
        "in_flight_bound": 32 * 100,  # concurrency × batch size
        "accepted_twice": sum(1 for v in accepted.values() if v > 1),
        "seconds": round(time.monotonic() - started, 1),
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = lost == 0 and dup_outside == 0 and interrupted <= sum(in_flight_at_kills)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
