"""Shard claims (``pipeline/scale/claims.py``) against a real redis-server on 127.0.0.1.

::

    .venv/bin/python -m benchmarks.bench_claims [--calls 5000] [--rounds 3] [--ttl 2]

1. **Script calls**: one asyncio client, one call at a time: ``beat`` (the heartbeat every
   holder sends each ttl / 4) and a ``claim`` + ``release`` cycle; calls/s and p50/p99 latency
   per call, medians over rounds.
2. **Takeover**: three ``sluice worker`` processes on an SQLite list of 4 000 recipients in 2
   shards against the simulator (50 requests/s per worker, batches of 10, 30 ms latency),
   ``--lease-ttl TTL``: two hold a shard each, the third waits. When the first worker's shard
   ledger has 100 lines it is SIGKILLed; reported: the time from the kill to the waiting
   worker's ``shard_claimed`` of that shard (a lease lapses at most ttl after the holder's last
   beat, a beat goes every ttl / 4, and a waiting worker asks again when the first lease left
   expires, at most ttl / 4 later), the whole run's time, the recipients accepted twice (must
   be 0) and the unknown ones (in flight at the kill).

JSON: ``benchmarks/results/claims.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.asyncio import Redis

from pipeline.scale.claims import Claim, ShardClaims

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def script_calls(url: str, calls: int) -> dict[str, Any]:
    client = Redis.from_url(url)
    try:
        claims = ShardClaims(client, f"bench-{time.monotonic_ns()}", "bench", ttl=30)
        await claims.register(4)
        claim = await claims.claim()
        assert isinstance(claim, Claim)
        beats = []
        t0 = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            assert await claims.beat(claim)
            beats.append(time.perf_counter() - t)
        beat_rate = calls / (time.perf_counter() - t0)
        cycles = []
        t0 = time.perf_counter()
        for _ in range(calls // 2):
            t = time.perf_counter()
            got = await claims.claim()
            assert isinstance(got, Claim)
            assert await claims.release(got)
            cycles.append(time.perf_counter() - t)
        cycle_rate = len(cycles) / (time.perf_counter() - t0)
    finally:
        await client.aclose()
    return {
        "beat_calls_per_s": round(beat_rate),
        "beat_p50_ms": round(pct(beats, 0.5) * 1000, 3),
        "beat_p99_ms": round(pct(beats, 0.99) * 1000, 3),
        "claim_release_cycles_per_s": round(cycle_rate),
        "claim_release_p50_ms": round(pct(cycles, 0.5) * 1000, 3),
        "claim_release_p99_ms": round(pct(cycles, 0.99) * 1000, 3),
    }


CAMPAIGN = """
[source]
kind = "sqlite"
path = "r.db"
table = "people"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{url}"
timeout = 2.0
[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ name = "{{first_name}}", code = "{{code}}" }}
[limits]
requests_per_second = 50
concurrency = 4
batch_size = 10
"""


def takeover(work: Path, url: str, ttl: float, rows: int = 4000) -> dict[str, Any]:
    work.mkdir()
    flush = redis.Redis.from_url(url)
    flush.flushdb()  # one run's claims at a time
    flush.close()
    conn = sqlite3.connect(work / "r.db")
    with conn:
        conn.execute("CREATE TABLE people (id INTEGER, phone TEXT, first_name TEXT, code TEXT)")
        conn.executemany(
            "INSERT INTO people VALUES (?, ?, ?, ?)",
            [(i, f"139{i:08d}", f"n{i}", f"{i:06d}") for i in range(1, rows + 1)],
        )
    conn.close()
    receipts = work / "receipts.jsonl"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "providers.simulator",
            "--port",
            "0",
            "--latency-ms",
            "30",
            "--receipts",
            str(receipts),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    assert sim.stdout is not None
    sim_url = sim.stdout.readline().decode().strip()
    (work / "c.toml").write_text(CAMPAIGN.format(url=sim_url))
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "pipeline.app.cli", "worker", str(work / "c.toml"), "--coordinator", url]
    cmd += ["--run-dir", str(run_dir), "--shards", "2", "--lease-ttl", str(ttl)]
    started = time.monotonic()
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(url, decode_responses=True)
    shard = None
    deadline = time.monotonic() + 60
    while shard is None and time.monotonic() < deadline:
        for key in client.scan_iter("sluice:claims:*:owners"):
            for s, owner in client.hgetall(key).items():
                if owner.split("/")[1] == str(victim.pid):
                    shard = int(s)
        time.sleep(0.01)
    client.close()
    assert shard is not None, "the victim never claimed a shard"
    others = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    ledger = run_dir / "shards" / f"{shard}-of-2" / "ledger.jsonl"
    while not ledger.exists() or ledger.read_bytes().count(b"\n") < 100:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    killed = time.time()
    victim.wait()
    for proc in others:
        proc.wait(timeout=300)
    elapsed = time.monotonic() - started
    sim.send_signal(signal.SIGTERM)
    sim.wait(timeout=30)
    sim.stdout.close()
    reclaimed = None
    for line in (ledger.parent / "log.jsonl").read_bytes().splitlines():
        event = orjson.loads(line)
        if event.get("event") == "shard_claimed" and str(event["owner"]).split("/")[1] != str(victim.pid):
            reclaimed = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    accepted = Counter(orjson.loads(line)["phone"] for line in receipts.read_bytes().splitlines())
    unknown = sum(
        line.count(b'"s":"unknown"')
        for p in run_dir.glob("shards/*/ledger.jsonl")
        for line in p.read_bytes().splitlines()
    )
    return {
        "survivors_exit": [proc.returncode for proc in others],
        "kill_to_reclaim_s": round(reclaimed - killed, 3) if reclaimed is not None else None,
        "run_s": round(elapsed, 2),
        "accepted": len(accepted),
        "accepted_twice": sum(1 for n in accepted.values() if n > 1),
        "unknown_lines": unknown,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "redis").mkdir()
        proc, url = start_redis(base / "redis")
        try:
            calls = [asyncio.run(script_calls(url, args.calls)) for _ in range(args.rounds)]
            takeovers = [takeover(base / f"t{i}", url, args.ttl) for i in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait()
    out = {
        "calls": calls,
        "calls_median": {k: statistics.median(c[k] for c in calls) for k in calls[0]},
        "ttl_s": args.ttl,
        "takeovers": takeovers,
        "cpus": os.cpu_count(),
    }
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    (REPO / "benchmarks" / "results" / "claims.json").write_bytes(
        orjson.dumps(out, option=orjson.OPT_INDENT_2)
    )


if __name__ == "__main__":
    main()
