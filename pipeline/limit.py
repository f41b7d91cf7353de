"""Limit: requests per second per provider account, with aiolimiter.

aiolimiter's bucket holds a whole period's worth by default, so a full burst
followed by the steady rate would put up to twice the rate into one second.
A provider counting a strict one-second window throttles that. The governor
keeps the bucket to a small slice of the rate (``burst``, 1 % by default) and
sends at a hair under the configured rate (``headroom``), so any one-second
window sees at most ``rate`` requests.

On a throttle it halves the rate and pauses for the provider's ``Retry-After``
(when sent); after enough clean responses it climbs back toward the configured
rate. Throttles never count against recipients.
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
        recover_after: int = 50,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.target = rate
        self._headroom = headroom
        self._burst_fraction = burst_fraction
        self._min_rate = min(min_rate, rate)
        self._recover_after = recover_after
        self._clean = 0
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
        """The provider said slow down: halve the rate, honour its pause."""
        self.throttles += 1
        self._clean = 0
        pause = retry_after if retry_after is not None and retry_after > 0 else 0.0
        pause = min(pause, 60.0)
        self._paused_until = max(self._paused_until, anyio.current_time() + pause)
        new_rate = max(self._min_rate, self.current / 2)
        if new_rate < self.current:
            self.current = new_rate
            self._limiter = self._make(new_rate)

    def succeeded(self) -> None:
        """A clean response; climb back after ``recover_after`` of them."""
        if self.current >= self.target:
            return
        self._clean += 1
        if self._clean >= self._recover_after:
            self._clean = 0
            self.current = min(self.target, self.current * 1.25)
            self._limiter = self._make(self.current)
