"""The rate governor on a fake clock: strict per-second windows, pauses, cuts and recovery."""

from __future__ import annotations

from collections import Counter

import pytest

import pipeline.limit as limit
from pipeline.limit import RateGovernor


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.late = 0.0  # every sleep overshoots by this much, like a busy event loop

    def current_time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds + self.late


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(limit.anyio, "current_time", fake.current_time)
    monkeypatch.setattr(limit.anyio, "sleep", fake.sleep)
    return fake


@pytest.mark.anyio
class TestPacing:
    @pytest.mark.parametrize("rate", [1, 10, 50, 200, 1000])
    async def test_no_window_exceeds_the_rate_and_late_wakeups_cost_nothing(
        self, clock: FakeTime, rate: int
    ) -> None:
        clock.late = 0.3 / rate  # each wake-up 30 % of a slot late
        g = RateGovernor(rate)
        sends = []
        for _ in range(rate * 10):
            await g.acquire()
            sends.append(clock.now)
        per_window = Counter(int(t) for t in sends)
        assert max(per_window.values()) <= rate
        achieved = (len(sends) - 2) / (sends[-1] - sends[1])  # the first send never sleeps
        assert achieved >= 0.98 * rate

    async def test_retry_after_pauses_and_throttles_cut_once_a_second(self, clock: FakeTime) -> None:
        g = RateGovernor(100)
        await g.acquire()
        start = clock.now
        g.throttled(2.5)
        g.throttled(None)  # same second: no second cut
        assert g.current == pytest.approx(70) and g.throttles == 2
        await g.acquire()
        assert clock.now - start >= 2.5
        clock.now += 1.0
        g.throttled(None)
        assert g.current == pytest.approx(49)

    async def test_recovers_after_quiet_seconds(self, clock: FakeTime) -> None:
        g = RateGovernor(100)
        g.throttled(None)
        assert g.current == pytest.approx(70)
        g.succeeded()
        assert g.current == pytest.approx(70)  # too soon
        clock.now += 2.0
        g.succeeded()
        assert g.current == pytest.approx(84)
        for _ in range(5):
            clock.now += 1.0
            g.succeeded()
        assert g.current == 100
