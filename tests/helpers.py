"""Test helpers: a simulator in a subprocess, recipients files, ledger and receipts readers."""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from tests.conftest import REPO


@dataclass
class SimulatorProcess:
    url: str
    receipts: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def accepted(self) -> collections.Counter[str]:
        """Phone → how many times the simulator accepted it (read after stop())."""
        counts: collections.Counter[str] = collections.Counter()
        if self.receipts.exists():
            with self.receipts.open("rb") as f:
                for line in f:
                    counts[orjson.loads(line)["phone"]] += 1
        return counts


@contextmanager
def simulator(tmp: Path, *args: str) -> Iterator[SimulatorProcess]:
    receipts = tmp / "receipts.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "providers.simulator", "--port", "0", "--receipts", str(receipts), *args],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    assert url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), url
    sim = SimulatorProcess(url, receipts, proc)
    try:
        yield sim
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def write_recipients(path: Path, n: int) -> dict[int, str]:
    """n recipients with distinct mainland numbers; returns row → phone as the simulator sees it."""
    phones = {}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "phone", "first_name", "code"])
        for i in range(1, n + 1):
            phone = f"139{i:08d}"
            w.writerow([f"c{i}", phone, f"n{i}", f"{i % 1000000:06d}"])
            phones[i] = phone
    return phones


def write_campaign(path: Path, endpoint: str, **limits: object) -> Path:
    lim = {
        "requests_per_second": 500,
        "concurrency": 8,
        "batch_size": 50,
        "max_attempts": 5,
        "backoff_base_ms": 10,
        "backoff_max_ms": 100,
        **limits,
    }
    limits_toml = "\n".join(f"{k} = {v}" for k, v in lim.items())
    path.write_text(
        f"""
[source]
kind = "csv"
path = "recipients.csv"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{endpoint}"
timeout = 2.0
[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ name = "{{first_name}}", code = "{{code}}" }}
[limits]
{limits_toml}
[run]
dir = "run"
"""
    )
    return path


def sluice(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "400", **(env or {})},  # messages unfolded
    )


def final_statuses(ledger: Path) -> dict[int, str]:
    """Row → its last recipient status in the ledger."""
    out: dict[int, str] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"r":'):
                obj = orjson.loads(line)
                out[obj["r"]] = obj["s"]
    return out


def cut_ledger(run_dir: Path, data: bytes) -> None:
    """Leave ``run_dir``'s ledger as a process killed at that point would: ``data``, with the
    checkpoint no further than its last whole line (a kill never records more than it wrote)."""
    (run_dir / "ledger.jsonl").write_bytes(data)
    checkpoint = run_dir / "checkpoint.json"
    whole = data.rfind(b"\n") + 1
    recorded = orjson.loads(checkpoint.read_bytes())["ledger_bytes"] if checkpoint.exists() else 0
    checkpoint.write_bytes(orjson.dumps({"ledger_bytes": min(recorded, whole)}))
