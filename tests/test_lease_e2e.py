"""Two `sluice run` processes, two campaigns on one provider account, sharing its limit through
the lease limiter (Redis, or the Unix-socket host): checked at the simulator, in any sliding
second, with Redis SIGKILLed and restarted empty mid-run."""

from __future__ import annotations

import collections
import csv
import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from pipeline.scale.lease import DEFAULT_JITTER, DEFAULT_TTL, serve_leases
from tests.helpers import SimulatorProcess, simulator, sluice, write_campaign
from tests.redis_server import RedisServer, redis_fixture

__all__ = ("redis_fixture",)

pytestmark = pytest.mark.anyio

LIMIT = 200  # requests/s of the one account
PER_RUN = 5_000  # recipients of each campaign: 500 requests of 10, ~5 s at the limit for both
SPAN = 1 + DEFAULT_TTL + DEFAULT_JITTER


def _campaign(base: Path, name: str, endpoint: str, first_phone: int) -> Path:
    """A campaign of its own directory and recipients (numbers distinct across campaigns)."""
    home = base / name
    home.mkdir()
    with (home / "recipients.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "phone", "first_name", "code"])
        for i in range(PER_RUN):
            w.writerow([f"c{i}", f"139{first_phone + i:08d}", f"n{i}", f"{i:06d}"])
    return write_campaign(
        home / "campaign.toml", endpoint, requests_per_second=LIMIT, concurrency=16, batch_size=10
    )


def _stats(sim: SimulatorProcess) -> dict[str, object]:
    answer: dict[str, object] = httpx.get(sim.url + "/__stats", timeout=5).json()
    return answer


def _accept_times(sim: SimulatorProcess) -> list[float]:
    """When the simulator accepted each request (its receipts' time, one per request)."""
    times = set()
    with sim.receipts.open("rb") as f:
        for line in f:
            record = orjson.loads(line)
            times.add((record["t"], record["out_id"]))
    return sorted(t for t, _ in times)


def _check(sim: SimulatorProcess, runs: list[subprocess.Popen[bytes]]) -> tuple[int, float, list[float]]:
    """Both runs complete, every recipient accepted once; returns (the most requests accepted in
    any sliding second, the rate between the first and last accepted request, accept times)."""
    for p in runs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    stats = _stats(sim)
    peaks = stats["peak_1s"]
    assert isinstance(peaks, dict) and len(peaks) == 1  # one account: both campaigns' requests
    assert "" not in peaks  # known by its access key id
    (peak,) = peaks.values()
    times = _accept_times(sim)
    sim.stop()
    accepted = sim.accepted()
    assert len(accepted) == 2 * PER_RUN and set(accepted.values()) == {1}
    assert stats["accepted_requests"] == len(times) == 2 * PER_RUN // 10
    rate = (len(times) - 1) / (times[-1] - times[0])
    return int(peak["requests"]), rate, times


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimulatorProcess]:
    with simulator(tmp_path, "--qps", "0", "--latency-ms", "5") as running:
        yield running


def _start_pair(tmp_path: Path, sim: SimulatorProcess, limiter: str) -> list[subprocess.Popen[bytes]]:
    a = _campaign(tmp_path, "a", sim.url, 0)
    b = _campaign(tmp_path, "b", sim.url, PER_RUN)
    return [sluice("run", str(c), "--run-dir", str(c.parent / "run"), "--limiter", limiter) for c in (a, b)]


def test_two_runs_share_the_limit_through_redis(
    tmp_path: Path, sim: SimulatorProcess, redis: RedisServer
) -> None:
    peak, rate, _ = _check(sim, _start_pair(tmp_path, sim, redis.url))
    print(f"redis: peak {peak} in any sliding second, {rate:.1f} requests/s of {LIMIT}")
    assert peak <= LIMIT
    assert rate >= 0.9 * LIMIT


async def test_two_runs_share_the_limit_through_the_unix_host(tmp_path: Path, sim: SimulatorProcess) -> None:
    path = tmp_path / "lease.sock"
    async with serve_leases(path, limit=LIMIT) as server:
        runs = _start_pair(tmp_path, sim, f"unix:{path}")
        peak, rate, _ = await anyio.to_thread.run_sync(_check, sim, runs)
    print(f"unix: peak {peak} in any sliding second, {rate:.1f} requests/s of {LIMIT}, {server.calls} calls")
    assert peak <= LIMIT
    assert rate >= 0.9 * LIMIT


def test_redis_killed_and_restarted_empty_mid_run(
    tmp_path: Path, sim: SimulatorProcess, redis: RedisServer
) -> None:
    runs = _start_pair(tmp_path, sim, redis.url)
    deadline = time.monotonic() + 60
    while int(_stats(sim)["accepted_requests"]) < 200:  # both sending, 1 s in
        assert time.monotonic() < deadline and all(p.poll() is None for p in runs)
        time.sleep(0.02)  # polling the simulator's counter, bounded by the deadline
    redis.kill()
    killed = time.time()
    time.sleep(0.3)  # the outage: Redis down this long
    redis.start()  # empty, on the same port
    restarted = time.time()
    peak, _, times = _check(sim, runs)
    gaps = [(b - a, a) for a, b in itertools.pairwise(times)]
    gap, gap_start = max(gaps)
    print(f"restart: peak {peak}, sending paused {gap:.2f} s (Redis down {restarted - killed:.2f} s)")
    assert peak <= LIMIT
    assert gap_start <= killed + DEFAULT_TTL + 0.5  # the pause began at the kill
    # Nothing for the outage and then the quiet span (less the last leases' ttl) ...
    assert gap >= (restarted - killed) + SPAN - DEFAULT_TTL - 0.1
    # ... and not much longer: the senders' backoff is at most 0.5 s.
    assert gap <= (restarted - killed) + SPAN + 1.0
    for run in ("a", "b"):
        lines = (tmp_path / run / "run" / "log.jsonl").read_bytes().splitlines()
        events = collections.Counter(orjson.loads(x)["event"] for x in lines)
        assert events["limiter_unreachable"] == 1 and events["limiter_back"] == 1, run
        assert b"127.0.0.1:" in b"".join(x for x in lines if b"limiter_unreachable" in x)
