"""The lease limiter (pipeline/scale/lease.py): the algorithm on a fake clock, the Lua script
against it on a real Redis, the Unix-socket host, the sender's governor, the simulator's
sliding-window peaks."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import structlog

from pipeline.scale.lease import (
    LeaseAlgorithm,
    LeaseConfig,
    LeasedGovernor,
    LimiterUnavailable,
    RedisLimiter,
    connect_limiter,
    serve_leases,
)
from providers.simulator.core import SlidingPeak
from tests.redis_server import RedisServer, redis_fixture

__all__ = ("max_in_window", "redis_fixture")

pytestmark = pytest.mark.anyio

SECOND = 1_000_000  # µs


def max_in_window(times: Sequence[int], span: int = SECOND) -> int:
    """The most events in any sliding window [t, t + span) (µs), checked at every event."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - span:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_window_checker_finds_the_busiest_unaligned_window() -> None:
    # 3 at the end of second 0, 3 at the start of second 1: no aligned second holds 6.
    times = [900_000, 950_000, 990_000, 1_010_000, 1_100_000, 1_850_000, 1_950_000]
    assert max_in_window(times) == 6
    assert max_in_window([0, SECOND]) == 1  # [t, t + 1 s) is half-open


def _simulate(
    config: LeaseConfig, clients: int, seconds: float, seed: int, *, saturate: bool
) -> tuple[list[int], int]:
    """Clients on the fake clock: ask (the limiter sees it 0–2 ms later, the reply takes as long
    again), send each granted token at a random time before ``t_req + ttl``, reaching the
    provider up to ``jitter`` later. Without ``saturate`` each client idles at random.
    Returns the provider's arrival times and the end of the quiet span."""
    rng = random.Random(seed)
    algo = LeaseAlgorithm(config)
    ttl, jitter = round(config.ttl * SECOND), round(config.jitter * SECOND)
    end = round(seconds * SECOND)
    events = [(rng.randrange(0, 50_000), i) for i in range(clients)]  # (t_req, client)
    heapq.heapify(events)
    arrivals: list[int] = []
    first_grant = 0
    while events:
        t_req, client = heapq.heappop(events)
        if t_req > end:
            continue
        seen = t_req + rng.randrange(0, 2_000)
        want = rng.choice((1, 2, 5, 20, 500)) if saturate else rng.randrange(1, 8)
        granted, wait = algo.lease(seen, want)
        reply = seen + rng.randrange(0, 2_000)
        if granted:
            first_grant = first_grant or seen
            deadline = t_req + ttl
            if reply < deadline:  # a lease answered after its ttl is dropped whole
                arrivals.extend(
                    rng.randrange(reply, deadline) + rng.randrange(0, jitter + 1) for _ in range(granted)
                )
            nxt = reply if saturate else reply + rng.choice((0, 0, 5_000, 300_000))
        else:
            nxt = reply + wait
        heapq.heappush(events, (nxt, client))
    return arrivals, first_grant


@pytest.mark.parametrize("seed", range(6))
def test_no_sliding_second_over_the_limit_under_random_demand(seed: int) -> None:
    rng = random.Random(seed)
    config = LeaseConfig(
        rng.choice((10, 50, 200, 1000)),
        ttl=rng.choice((0.005, 0.025, 0.1)),
        jitter=rng.choice((0.0, 0.01)),
        tolerance=rng.choice((0.0, 0.05, 0.5)),
    )
    arrivals, _ = _simulate(config, clients=rng.randrange(2, 9), seconds=8, seed=seed, saturate=seed % 2 == 0)
    assert arrivals
    assert max_in_window(arrivals) <= config.limit


def test_saturating_demand_uses_at_least_95_percent_of_the_limit() -> None:
    config = LeaseConfig(1000)  # ttl 25 ms, jitter 10 ms: a ceiling of 96.6 %
    assert config.ceiling / config.limit >= 0.96
    arrivals, first = _simulate(config, clients=4, seconds=12, seed=3, saturate=True)
    assert max_in_window(arrivals) <= config.limit
    inside = [t for t in arrivals if first + SECOND <= t < first + 11 * SECOND]
    assert len(inside) / 10 >= 0.95 * config.limit


def test_quiet_span_on_new_state_and_after_idle_expiry() -> None:
    config = LeaseConfig(100, idle_expiry=5.0)
    algo = LeaseAlgorithm(config)
    t0 = 7_000_000
    assert algo.lease(t0, 1) == (0, config.span_us)  # first use: nothing for S
    assert algo.lease(t0 + config.span_us - 1, 1) == (0, 1)
    assert algo.lease(t0 + config.span_us, 1)[0] == 1
    later = t0 + config.span_us + 5 * SECOND + 1  # idle past the expiry: state forgotten
    assert algo.lease(later, 1) == (0, config.span_us)
    fresh = LeaseAlgorithm(config)  # a restarted host knows nothing either
    assert fresh.lease(t0 + 2 * SECOND, 1) == (0, config.span_us)


def test_a_lease_above_the_burst_is_granted_capped() -> None:
    config = LeaseConfig(1000, tolerance=0.05)
    algo = LeaseAlgorithm(config)
    now = algo.lease(0, 1)[1]
    assert config.burst == 48
    assert algo.lease(now, 10_000) == (48, 0)  # never more than one burst, but granted
    granted, wait = algo.lease(now, 10_000)  # the pacing is spent: wait about one burst
    assert granted == 0 and 0 < wait <= config.tolerance_us + 2
    assert algo.lease(now + wait, 10_000)[0] >= 1


def test_the_log_refuses_past_the_limit_whatever_the_pacing() -> None:
    # Tolerance of a whole span: pacing alone would let 2 × limit through in one span.
    config = LeaseConfig(10, tolerance=1.035, jitter=0.01)
    algo = LeaseAlgorithm(config)
    now = algo.lease(0, 1)[1]
    total = 0
    for step in range(200):
        total += algo.lease(now + step * 5_000, 10)[0]
    assert total == 10  # grants in 1 s span S ≤ limit
    granted, wait = algo.lease(now + 1_000_000, 10)
    assert granted == 0 and wait == config.span_us - 1_000_000  # until the first grant leaves


# -- Redis: the Lua script grants what the Python algorithm grants -------------------------------
async def test_lua_script_grants_as_the_python_algorithm_does(redis: RedisServer) -> None:
    rng = random.Random(11)
    config = LeaseConfig(20, tolerance=0.5, idle_expiry=60.0)  # burst 9: both pacing and log bind
    limiter = RedisLimiter(redis.url, config, account="differential")
    twin = LeaseAlgorithm(config)
    calls = granted_total = 0
    refused = {"quiet": 0, "other": 0}
    try:
        with anyio.fail_after(20):
            deadline = anyio.current_time() + 3.0
            while anyio.current_time() < deadline:
                want = rng.choice((1, 3, 9, 50))
                granted, wait_us, now_us = await limiter.lease_at(want)
                assert twin.lease(now_us, want) == (granted, wait_us), f"call {calls} at {now_us}"
                calls += 1
                granted_total += granted
                if not granted:
                    refused["quiet" if calls <= 1 or granted_total == 0 else "other"] += 1
                await anyio.sleep(rng.choice((0.0, 0.002, 0.03)))
    finally:
        await limiter.aclose()
    assert calls > 50 and granted_total > 20 and refused["quiet"] and refused["other"]


async def test_redis_restart_empty_brings_the_quiet_span_and_outage_is_unavailable(
    redis: RedisServer,
) -> None:
    config = LeaseConfig(50)
    limiter = RedisLimiter(redis.url, config, account="restart")
    try:
        granted, wait_us, _ = await limiter.lease_at(1)
        assert granted == 0 and wait_us == config.span_us
        await anyio.sleep(wait_us / 1e6)  # the quiet span the limiter asked for
        assert (await limiter.lease_at(1))[0] == 1
        redis.kill()
        with pytest.raises(LimiterUnavailable) as caught:
            await limiter.lease_at(1)
        assert "127.0.0.1" in str(caught.value)
        redis.start()  # empty, on the same port: NOSCRIPT, then new state
        granted, wait_us, _ = await limiter.lease_at(1)
        assert granted == 0 and wait_us == config.span_us
    finally:
        await limiter.aclose()


async def test_redis_keys_carry_a_hash_tag_and_no_secret(redis: RedisServer) -> None:
    from redis.asyncio import Redis

    from pipeline.scale.lease import account_key

    key = account_key("aliyun", "https://dysmsapi.aliyuncs.com/", ["LTAI-id"])
    assert key == account_key("aliyun", "https://dysmsapi.aliyuncs.com", ["LTAI-id"])
    assert key != account_key("aliyun", "https://dysmsapi.aliyuncs.com", ["LTAI-other"])
    async with connect_limiter(redis.url, limit=10, account_key=key) as limiter:
        await limiter.lease(1)
    client = Redis.from_url(redis.url)
    try:
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys == [f"sluice:lease:{{{key}}}:state"]  # no grant yet: the list is empty
        assert 59_000 < await client.pttl(keys[0]) <= 60_000  # forgotten when idle
    finally:
        await client.aclose()


# -- the Unix-socket host ------------------------------------------------------------------------
@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=str)
async def test_unix_host_serves_the_algorithm_and_its_ttl(tmp_path: Path) -> None:
    path = tmp_path / "lease.sock"
    async with serve_leases(path, limit=100, ttl=0.05) as server:
        assert path.stat().st_mode & 0o777 == 0o600
        async with connect_limiter(f"unix:{path}", limit=999, ttl=0.5, account_key="a") as limiter:
            granted, wait = await limiter.lease(5)
            assert granted == 0 and wait == pytest.approx(server.config.span, abs=1e-6)
            assert limiter.ttl == 0.05  # the host's ttl, not the client's
            await anyio.sleep(wait)
            assert (await limiter.lease(3))[0] == 3
            async with connect_limiter(f"unix:{path}", limit=100, account_key="b") as other:
                assert (await other.lease(5))[0] == 0  # another account: its own new state
        assert server.calls == 3
    assert not path.exists()
    async with connect_limiter(f"unix:{path}", limit=100, account_key="a") as gone:
        with pytest.raises(LimiterUnavailable):
            await gone.lease(1)


# -- the sender's governor, on a fake clock ------------------------------------------------------
class FakeLimiter:
    def __init__(self, clock: list[float], *, ttl: float = 0.025, burst: int = 8) -> None:
        self.ttl, self.burst = ttl, burst
        self.clock = clock
        self.asked: list[int] = []
        self.grant = 5
        self.latency = 0.0
        self.down = False
        self.gate: anyio.Event | None = None  # the first call waits for it
        self.fixed: int | None = None  # grant this many whatever was asked

    async def lease(self, want: int) -> tuple[int, float]:
        self.asked.append(want)
        if self.gate is not None:
            await self.gate.wait()
            self.gate = None
            return 1, 0.0
        self.clock[0] += self.latency
        if self.down:
            raise LimiterUnavailable("unix:/nowhere: ConnectionRefusedError")
        return (self.fixed if self.fixed is not None else min(want, self.grant)), 0.001

    async def aclose(self) -> None:
        pass


async def test_governor_uses_tokens_only_within_ttl_of_the_request() -> None:
    clock = [100.0]
    limiter = FakeLimiter(clock)
    governor = LeasedGovernor(limiter, target=50, clock=lambda: clock[0])
    limiter.latency = 0.02  # the reply arrives 20 ms after t_req
    await governor.acquire()
    assert limiter.asked == [1]  # one waiter: a lease of one token
    limiter.fixed = 5
    clock[0] = 100.03  # past 100.02 + 25 ms: a new lease
    await governor.acquire()
    assert len(limiter.asked) == 2
    clock[0] = 100.054  # 4 left, t_req was 100.03: valid until 100.055
    await governor.acquire()
    assert len(limiter.asked) == 2
    clock[0] = 100.0551  # 3 left but expired: dropped, asked again
    await governor.acquire()
    assert len(limiter.asked) == 3
    assert governor.counts == {"leases": 3, "refused": 0, "tokens": 11, "used": 4, "dropped": 3}


async def test_governor_asks_for_the_waiters_up_to_the_burst() -> None:
    clock = [0.0]
    limiter = FakeLimiter(clock, burst=4)
    limiter.grant = 100
    limiter.gate = anyio.Event()
    governor = LeasedGovernor(limiter, target=50, clock=lambda: clock[0])
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(governor.acquire)
        await anyio.wait_all_tasks_blocked()  # one asking (granted 1 once let go), five waiting
        limiter.gate.set()
    assert limiter.asked[1:] == [4, 1]  # five waiting: a burst of 4, then the last one


async def test_governor_fails_closed_and_logs_one_line_per_outage() -> None:
    clock = [0.0]
    limiter = FakeLimiter(clock)
    limiter.down = True
    governor = LeasedGovernor(limiter, target=50, backoff=(0.001, 0.004), clock=lambda: clock[0])
    with structlog.testing.capture_logs() as logs:
        with anyio.move_on_after(0.2) as scope:
            await governor.acquire()
        assert scope.cancelled_caught  # nothing was let through while the limiter was down
        assert len(limiter.asked) > 5  # it kept trying, backing off
        limiter.down = False
        await governor.acquire()
    events = [e["event"] for e in logs]
    assert events == ["limiter_unreachable", "limiter_back"]
    assert governor.outages == 1


async def test_governor_pauses_for_retry_after_on_a_throttle() -> None:
    clock = [0.0]
    limiter = FakeLimiter(clock)
    governor = LeasedGovernor(limiter, target=50, clock=lambda: clock[0])
    await governor.acquire()
    governor.throttled(0.05)
    asked = len(limiter.asked)
    with anyio.move_on_after(0.02):
        await governor.acquire()  # tokens left, but the pause drops them
    assert len(limiter.asked) == asked and governor.throttles == 1
    clock[0] = 0.06
    await governor.acquire()
    assert len(limiter.asked) == asked + 1


# -- the simulator's sliding peak -----------------------------------------------------------------
def test_simulator_sliding_peak_is_exact_with_bounded_memory() -> None:
    rng = random.Random(5)
    now = [0]  # µs, so that the checker and the peak see the same boundaries
    peak = SlidingPeak(span=SECOND, clock=lambda: now[0])
    times: list[int] = []
    for _ in range(5000):
        now[0] += rng.choice((0, 100, 1_000, 10_000, 300_000))
        times.append(now[0])
        peak.add(3)
        assert len(peak._recent) <= 10_001  # the last second only
    assert peak.peak_requests == max_in_window(times)
    assert peak.peak_recipients == 3 * peak.peak_requests


def test_cli_takes_a_limiter_url_on_run_and_resume() -> None:
    from pipeline.app.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "c.toml", "--limiter", "redis://h:6379/0"]).limiter == "redis://h:6379/0"
    assert (
        parser.parse_args(["resume", "runs/x", "--limiter", "unix:/run/l.sock"]).limiter == "unix:/run/l.sock"
    )
    assert parser.parse_args(["run", "c.toml"]).limiter is None
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["run", "c.toml", "--limiter", "http://h:6379"])
    assert exited.value.code == 2
