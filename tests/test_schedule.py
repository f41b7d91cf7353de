"""Send windows and daily caps on virtual time (an injected clock; sleeping advances it)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from pipeline.schedule import SendGate, parse_window

SH = ZoneInfo("Asia/Shanghai")


class VirtualTime:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> dt.datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += dt.timedelta(seconds=seconds)


class TestWindow:
    def test_parse_errors_name_the_problem(self) -> None:
        for args, msg in [
            (("8-21", "Asia/Shanghai"), "must look like"),
            (("08:00-08:00", "Asia/Shanghai"), "must differ"),
            (("08:00-21:00", "Mars/Olympus"), "unknown time zone"),
            (("08:00-21:00", "UTC", ["funday"]), "days must be"),
        ]:
            with pytest.raises(ValueError, match=msg):
                parse_window(*args)  # type: ignore[arg-type]

    def test_open_and_next_open(self) -> None:
        w = parse_window("08:00-21:00", "Asia/Shanghai", ["mon", "tue", "wed", "thu", "fri"])
        fri_evening = dt.datetime(2026, 11, 20, 21, 30, tzinfo=SH)  # a Friday
        assert not w.is_open(fri_evening)
        assert w.next_open(fri_evening) == dt.datetime(2026, 11, 23, 8, 0, tzinfo=SH)  # Monday
        assert w.is_open(dt.datetime(2026, 11, 23, 8, 0, tzinfo=SH))
        assert not w.is_open(dt.datetime(2026, 11, 23, 7, 59, tzinfo=SH))

    def test_window_across_midnight(self) -> None:
        w = parse_window("22:00-06:00", "UTC")
        assert w.is_open(dt.datetime(2026, 1, 1, 23, 0, tzinfo=dt.UTC))
        assert w.is_open(dt.datetime(2026, 1, 2, 5, 59, tzinfo=dt.UTC))
        assert not w.is_open(dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC))


@pytest.mark.anyio
class TestGate:
    async def test_pauses_outside_the_window_until_it_opens(self) -> None:
        clock = VirtualTime(dt.datetime(2026, 11, 23, 6, 30, tzinfo=SH))
        gate = SendGate(window=parse_window("08:00-21:00", "Asia/Shanghai"), now=clock, sleep=clock.sleep)
        await gate.wait(100)
        assert clock.slept == [5400.0]  # exactly 1 h 30 min of virtual time
        assert clock.now == dt.datetime(2026, 11, 23, 8, 0, tzinfo=SH)
        await gate.wait(100)
        assert clock.slept == [5400.0]

    async def test_daily_cap_carries_to_the_next_days_window(self) -> None:
        clock = VirtualTime(dt.datetime(2026, 11, 23, 20, 0, tzinfo=SH))
        gate = SendGate(
            window=parse_window("08:00-21:00", "Asia/Shanghai"),
            daily_cap=250,
            sent_today=0,
            now=clock,
            sleep=clock.sleep,
        )
        await gate.wait(100)
        await gate.wait(100)
        assert clock.slept == []
        await gate.wait(100)  # 300 > 250: wait for tomorrow's window
        assert clock.now == dt.datetime(2026, 11, 24, 8, 0, tzinfo=SH)
        assert gate.sent_today == 100

    async def test_cap_counts_what_was_sent_earlier_today(self) -> None:
        clock = VirtualTime(dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC))
        gate = SendGate(daily_cap=1000, sent_today=950, now=clock, sleep=clock.sleep)
        await gate.wait(100)
        assert clock.now == dt.datetime(2026, 11, 24, 0, 0, tzinfo=dt.UTC)
