"""Receipts pushed at scale: the simulator pushes every accepted recipient's receipt to
`sluice listen` while `sluice run` sends; reports what the listener takes (receipts/s from its
first to its last stored receipt, CPU µs per receipt, peak RSS) and checks that every accepted
recipient got exactly one receipt.

    .venv/bin/python -m benchmarks.bench_receipts [--recipients 1000000] [--protocol aliyun]

Three processes on 127.0.0.1 (simulator, listener, sender) share the machine's cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BATCH = {"aliyun": 100, "nxcloud": 200}
MESSAGE = {
    "aliyun": 'template_code = "SMS_1"\nparams = { code = "{code}" }',
    "nxcloud": 'content = "Hi, your code is {code}"',
}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:  # loopback only
        return json.loads(r.read())


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--protocol", choices=sorted(BATCH), default="aliyun")
    p.add_argument("--rps", type=int, default=2000)
    p.add_argument("--delay-ms", type=float, default=200.0, help="mean receipt delay")
    p.add_argument(
        "--min-delay-ms", type=float, default=0.0, help="hold every receipt this long (a burst after the run)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    args = p.parse_args()
    n = args.recipients
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with (tmp / "recipients.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "phone", "code"])
            w.writerows([f"c{i}", f"139{i:08d}", f"{i % 1000000:06d}"] for i in range(1, n + 1))
        run_dir = tmp / "run"
        listener = subprocess.Popen(
            [sys.executable, "-m", "pipeline.app.cli", "listen", str(run_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert listener.stdout is not None
        lines = [listener.stdout.readline().decode().split() for _ in range(5)]
        to = lines[4][1]
        sim = subprocess.Popen(
            [sys.executable, "-m", "providers.simulator", "--port", "0", "--minimal", "--receipts-to", to,
             "--receipt-delay-ms", str(args.delay_ms),
             "--receipt-min-delay-ms", str(args.min_delay_ms), "--undelivered-rate", "0.02",
             "--duplicate-rate", "0.01", "--seed", "1"],
            cwd=REPO, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert sim.stdout is not None
        sim_url = sim.stdout.readline().decode().strip()
        try:
            (tmp / "c.toml").write_text(
                f'[source]\nkind = "csv"\npath = "recipients.csv"\nkey = "id"\nphone = "phone"\n'
                f'[provider]\nkind = "simulator"\nendpoint = "{sim_url}"\nprotocol = "{args.protocol}"\n'
                f'[message]\nsign_name = "Acme"\n{MESSAGE[args.protocol]}\n'
                f"[limits]\nrequests_per_second = {args.rps}\nconcurrency = 64\n"
                f'batch_size = {BATCH[args.protocol]}\n[run]\ndir = "run"\n'
            )
            started = time.monotonic()
            run = subprocess.run(
                [sys.executable, "-m", "pipeline.app.cli", "run", str(tmp / "c.toml")],
                cwd=REPO, capture_output=True, timeout=args.timeout,
            )  # fmt: skip
            if run.returncode != 0:
                raise SystemExit(f"sluice run failed: {run.stderr.decode()[-2000:]}")
            send_s = time.monotonic() - started
            deadline = started + args.timeout
            while True:
                push = _get(sim_url + "/__stats")["receipts_push"]
                if push["pending"] == 0 and push["scheduled"] >= n:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"receipts still pending: {push}")
                time.sleep(0.5)  # polling a condition, bounded by the deadline
            stats = _get(to + "/__stats")
            rss = _peak_rss_mib(listener.pid)
        finally:
            for proc in (listener, sim):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        stored = sum(1 for _ in (run_dir / "receipts.jsonl").open("rb"))
        if stored != n or push["acked_unique"] != n or stats.get("matched") != n:
            raise SystemExit(f"not every recipient got one receipt: stored {stored}, {stats}, {push}")
        window = stats["last_at"] - stats["first_at"]
        result = {
            "recipients": n,
            "protocol": args.protocol,
            "send_s": round(send_s, 1),
            "listener_requests": stats["requests"],
            "receipts_stored": stored,
            "duplicates_answered": stats.get("duplicate", 0),
            "fsyncs": stats["fsyncs"],
            "receipt_window_s": round(window, 1),
            "receipts_per_s": round(stored / window) if window > 0 else None,
            "listener_cpu_s": stats["cpu_s"],
            "index_build_s": stats["index_s"],
            "index_build_cpu_s": stats["index_cpu_s"],
            "cpu_us_per_receipt": round(stats["cpu_s"] / stored * 1e6, 1),
            "cpu_us_per_receipt_after_index": round((stats["cpu_s"] - stats["index_cpu_s"]) / stored * 1e6),
            "listener_peak_rss_mib": round(rss, 1),
            "simulator_pushes": push["pushes"],
            "simulator_failed_pushes": push["failed_pushes"],
            "load_avg_1m": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
