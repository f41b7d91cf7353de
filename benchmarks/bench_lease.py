"""Lease calls: how many per second, and how long each takes, against a real Redis and against
the Unix-socket host (pipeline/scale/lease.py).

::

    .venv/bin/python -m benchmarks.bench_lease [--seconds 3] [--in-flight 1,16] [--rounds 3]

Starts its own ``redis-server`` (127.0.0.1, a free port, no persistence) and its own
``serve_leases`` host (a child process, a socket in a temporary directory). The client is one
process on uvloop with N calls in flight (Redis: one client and its pool; Unix: one connection
per caller, as each worker process has one). Each call asks for one token of a limit no one
reaches (10⁹/s), so the script and the algorithm run in full but never refuse; the quiet span
of the new state is waited out before measuring. Each measurement lasts ``--seconds`` (at most
30) and makes at most 2 000 000 calls. Reported: calls/s and p50/p99 latency per round, and
their medians. JSON: ``benchmarks/results/lease.json``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from benchmarks.common import BenchError, machine_info, markdown_table, median, write_json
from pipeline.scale.lease import RedisLimiter, UnixLimiter, connect_limiter

__all__ = ("main",)

LIMIT = 10**9
MAX_CALLS = 2_000_000
MAX_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not start within {timeout:g} s")
        time.sleep(0.005)


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    args = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)

    def pong() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        _wait_for(pong, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


HOST_SCRIPT = """
import anyio, sys
from pipeline.scale.lease import serve_leases
async def main():
    async with serve_leases(sys.argv[1], limit=int(sys.argv[2])):
        print("ready", flush=True)
        await anyio.sleep_forever()
anyio.run(main, backend_options={"use_uvloop": True})
"""


@contextmanager
def unix_host(tmp: Path) -> Iterator[str]:
    path = tmp / "lease.sock"
    cmd = [sys.executable, "-c", HOST_SCRIPT, str(path), str(LIMIT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError(f"the lease host did not start (exit {proc.wait()})")
        yield f"unix:{path}"
    finally:
        proc.kill()
        proc.wait()


async def _measure(url: str, in_flight: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    async with connect_limiter(url, limit=LIMIT, account_key="bench") as first:
        limiters: list[RedisLimiter | UnixLimiter] = [first]
        _, wait = await first.lease(1)  # new state: wait out the quiet span
        await anyio.sleep(wait)
        if (await first.lease(1))[0] != 1:
            raise BenchError("the limiter refused a lease after its quiet span")
        try:
            if url.startswith("unix:"):  # one connection per caller
                for _ in range(in_flight - 1):
                    limiter = UnixLimiter(url.removeprefix("unix:"), "bench", first.burst)
                    limiters.append(limiter)
            deadline = time.perf_counter() + seconds

            async def caller(limiter: RedisLimiter | UnixLimiter) -> None:
                while time.perf_counter() < deadline and len(latencies) < MAX_CALLS:
                    t0 = time.perf_counter()
                    got, _ = await limiter.lease(1)
                    latencies.append(time.perf_counter() - t0)
                    if got != 1:
                        raise BenchError("a lease was refused under an unreachable limit")

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(in_flight):
                    tg.start_soon(caller, limiters[i % len(limiters)])
            elapsed = time.perf_counter() - started
        finally:
            for limiter in limiters[1:]:
                await limiter.aclose()
    latencies.sort()
    return {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--in-flight", default="1,16", help="concurrent callers, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    seconds = min(args.seconds, MAX_SECONDS)
    in_flight = [int(x) for x in args.in_flight.split(",")]
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lease-") as tmp:
        with redis_server(Path(tmp)) as redis_url, unix_host(Path(tmp)) as unix_url:
            for _ in range(args.rounds):
                for host, url in (("redis", redis_url), ("unix", unix_url)):
                    for n in in_flight:
                        run = anyio.run(_measure, url, n, seconds, backend_options={"use_uvloop": True})
                        results.setdefault(host, {}).setdefault(n, []).append(run)
    rows = []
    for host, by_n in results.items():
        for n, runs in by_n.items():
            rows.append(
                [
                    host,
                    n,
                    median([r["calls_per_s"] for r in runs]),
                    " / ".join(f"{r['calls_per_s']:,.0f}" for r in runs),
                    median([r["p50_ms"] for r in runs]),
                    median([r["p99_ms"] for r in runs]),
                ]
            )
    print(markdown_table(["host", "in flight", "calls/s (median)", "each round", "p50 ms", "p99 ms"], rows))
    path = write_json("lease.json", {"machine": machine_info(), "seconds": seconds, "results": results})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
