"""Schedule: send windows (quiet hours) and a daily cap per provider account.

The dispatcher asks :meth:`SendGate.wait` before every request. Outside the
window, or once today's cap is spent, it sleeps until the next moment sending is
allowed (the next window opening, or the next day's), and reports why it paused.
Time comes from an injected wall clock and sleep, so tests run on virtual time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import anyio

__all__ = ("DAYS", "SendGate", "Window", "parse_window")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Window:
    """Sending allowed on ``days`` between ``start`` and ``end`` local time (end exclusive).

    ``start > end`` spans midnight (``22:00-06:00``).
    """

    start: dt.time
    end: dt.time
    tz: ZoneInfo
    days: frozenset[int] = frozenset(range(7))

    def is_open(self, now: dt.datetime) -> bool:
        local = now.astimezone(self.tz)
        t = local.time()
        if self.start <= self.end:
            return local.weekday() in self.days and self.start <= t < self.end
        # Spanning midnight: the part after midnight belongs to the previous day's window.
        if t >= self.start:
            return local.weekday() in self.days
        return t < self.end and (local.weekday() - 1) % 7 in self.days

    def next_open(self, now: dt.datetime) -> dt.datetime:
        """The first moment at or after ``now`` when the window is open."""
        if self.is_open(now):
            return now
        local = now.astimezone(self.tz)
        for offset in range(8):
            day = local.date() + dt.timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            candidate = dt.datetime.combine(day, self.start, self.tz)
            if candidate >= local:
                return candidate
        raise ValueError("a window with no days never opens")


def parse_window(text: str, timezone: str, days: list[str] | None = None) -> Window:
    """``"08:00-21:00"``, an IANA zone, optional day names; raises ValueError naming the problem."""
    try:
        start_s, end_s = text.split("-")
        start, end = dt.time.fromisoformat(start_s.strip()), dt.time.fromisoformat(end_s.strip())
    except ValueError:
        raise ValueError(f"window {text!r} must look like 08:00-21:00") from None
    if start == end:
        raise ValueError("window start and end must differ")
    try:
        tz = ZoneInfo(timezone)
    except Exception:  # ZoneInfoNotFoundError, or a malformed key
        raise ValueError(f"unknown time zone {timezone!r}") from None
    chosen = frozenset(range(7))
    if days is not None:
        bad = [d for d in days if d.lower()[:3] not in DAYS]
        if bad or not days:
            raise ValueError(f"days must be names like {', '.join(DAYS)}")
        chosen = frozenset(DAYS.index(d.lower()[:3]) for d in days)
    return Window(start, end, tz, chosen)


class SendGate:
    """Holds requests before ``start_at``, outside the send window and past the daily cap."""

    def __init__(
        self,
        *,
        window: Window | None = None,
        daily_cap: int | None = None,
        cap_tz: ZoneInfo | None = None,
        sent_today: int = 0,
        start_at: dt.datetime | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.window = window
        self.daily_cap = daily_cap
        self._cap_tz = cap_tz or (window.tz if window else ZoneInfo("UTC"))
        self._now = now
        self._sleep = sleep
        self._day = self._today()
        self.sent_today = sent_today
        self.start_at = start_at
        self.paused_until: dt.datetime | None = None
        self.pause_reason: str | None = None
        self._aborted = False
        self._sleeping: set[anyio.CancelScope] = set()

    def abort(self) -> None:
        """The run is stopping: requests waiting here go on at once (to see the stop)."""
        self._aborted = True
        for scope in self._sleeping:
            scope.cancel()

    def _today(self) -> dt.date:
        return self._now().astimezone(self._cap_tz).date()

    def _next_day(self) -> dt.datetime:
        tomorrow = self._today() + dt.timedelta(days=1)
        return dt.datetime.combine(tomorrow, dt.time(0), self._cap_tz)

    async def wait(self, recipients: int) -> None:
        """Return when ``recipients`` more may be sent now."""
        while not self._aborted:
            now = self._now()
            if self._today() != self._day:
                self._day, self.sent_today = self._today(), 0
            until: dt.datetime | None = None
            if self.start_at is not None and now < self.start_at:
                until, self.pause_reason = self.start_at, "waiting for schedule.start_at"
            elif self.window is not None and not self.window.is_open(now):
                until, self.pause_reason = self.window.next_open(now), "outside the send window"
            elif self.daily_cap is not None and self.sent_today + recipients > self.daily_cap:
                nxt = self._next_day()
                until = self.window.next_open(nxt) if self.window else nxt
                self.pause_reason = f"daily cap of {self.daily_cap:,} reached"
            if until is None:
                self.paused_until = self.pause_reason = None
                self.sent_today += recipients
                return
            self.paused_until = until
            with anyio.CancelScope() as scope:
                self._sleeping.add(scope)
                try:
                    await self._sleep(max(0.0, (until - now).total_seconds()))
                finally:
                    self._sleeping.discard(scope)
