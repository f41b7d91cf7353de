"""Limit: requests per second per provider account, with aiolimiter.

aiolimiter's bucket holds a whole period's worth by default, so a full burst
followed by the steady rate would put up to twice the rate into one second.
A provider counting a strict one-second window throttles that. The governor
keeps the bucket to a small slice of the rate (``burst``, 1 % by default) and
sends at a hair under the configured rate (``headroom``), so any one-second
window sees at most ``rate`` requests.

On a throttle it pauses for the provider's ``Retry-After`` (when sent) and cuts
the rate by 30 %, at most once a second (the other requests in flight were sent
at the old rate); after two quiet seconds it climbs back 20 % a second toward
the configured rate. Throttles never count against recipients.
"""

from __future__ import annotations

import math

import anyio
from aiolimiter import AsyncLimiter

__all__ = ("RateGovernor",)


class RateGovernor:
    """Spreads requests under ``rate``/s and adapts to throttling."""

    def __init__(
        self,
        rate: float,
        *,
        headroom: float = 0.99,
        burst_fraction: float = 0.01,
        min_rate: float = 1.0,
        cut: float = 0.7,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.target = rate
        self._headroom = headroom
        self._burst_fraction = burst_fraction
        self._min_rate = min(min_rate, rate)
        self._cut = cut
        self._last_cut = -1e9
        self._last_raise = -1e9
        self._paused_until = 0.0
        self.throttles = 0
        self.current = rate
        self._limiter = self._make(rate)

    def _make(self, rate: float) -> AsyncLimiter:
        effective = rate * self._headroom
        burst = max(1, math.floor(effective * self._burst_fraction))
        return AsyncLimiter(burst, burst / effective)

    async def acquire(self) -> None:
        """Wait for a request slot."""
        delay = self._paused_until - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)
        await self._limiter.acquire()

    def throttled(self, retry_after: float | None) -> None:
        """The provider said slow down: honour its pause, cut the rate once per second."""
        now = anyio.current_time()
        self.throttles += 1
        pause = retry_after if retry_after is not None and retry_after > 0 else 0.0
        self._paused_until = max(self._paused_until, now + min(pause, 60.0))
        if now - self._last_cut < 1.0:
            return  # requests in flight during the last cut say nothing new
        self._last_cut = now
        new_rate = max(self._min_rate, self.current * self._cut)
        if new_rate < self.current:
            self.current = new_rate
            self._limiter = self._make(new_rate)

    def succeeded(self) -> None:
        """A clean response: after two quiet seconds, climb back 20 % a second."""
        if self.current >= self.target:
            return
        now = anyio.current_time()
        if now - self._last_cut >= 2.0 and now - self._last_raise >= 1.0:
            self._last_raise = now
            self.current = min(self.target, self.current * 1.2)
            self._limiter = self._make(self.current)
