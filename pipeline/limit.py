"""Limit: requests per second per provider account (paced), recipients per second (aiolimiter).

Providers count requests in strict one-second windows, so a burst is a throttle.
Requests are therefore paced on fixed deadlines: slot ``n`` is at ``start + n / r``
with ``r`` a hair under the configured rate (``headroom``), whatever time the
previous waiter actually woke up. Any one-second window then holds at most
``floor(r) + 1 ≤ rate`` slots. A one-token leaky bucket (aiolimiter with
``max_rate=1``) gives the same spacing but loses every late wake-up: measured
here at 50 requests/s with 50 ms latency, 95 % of the rate against 99 % paced
(benchmarks/bench_rate.py). aiolimiter still limits recipients per second,
where a one-second bucket is the point.

On a throttle the governor pauses for the provider's ``Retry-After`` (when sent)
and cuts the rate by 30 %, at most once a second (the other requests in flight
were sent at the old rate); after two quiet seconds it climbs back 20 % a second
toward the configured rate. Throttles never count against recipients.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from aiolimiter import AsyncLimiter

__all__ = ("Governor", "RateGovernor")


class Governor(Protocol):
    """What the dispatcher asks of a limiter: this process's :class:`RateGovernor`, or a
    client of a limiter shared by several processes (:mod:`pipeline.scale`)."""

    target: float  # the configured requests/s
    current: float  # the rate in force now (below target after throttles)
    throttles: int

    async def acquire(self, recipients: int = 1) -> None:
        """Wait until one request of ``recipients`` recipients may be sent."""

    def throttled(self, retry_after: float | None) -> None:
        """The provider throttled a request."""

    def succeeded(self) -> None:
        """A request went through cleanly."""


class RateGovernor:
    """Paces requests under ``rate``/s, optionally recipients under ``recipients_rate``/s."""

    def __init__(
        self,
        rate: float,
        *,
        recipients_rate: float | None = None,
        headroom: float = 0.99,
        min_rate: float = 1.0,
        cut: float = 0.7,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.target = rate
        self._headroom = headroom
        self._min_rate = min(min_rate, rate)
        self._cut = cut
        self._last_cut = -1e9
        self._last_raise = -1e9
        self._next_slot = 0.0
        self.throttles = 0
        self.current = rate
        self._interval = 1 / (rate * headroom)
        self._recipients = AsyncLimiter(recipients_rate, 1.0) if recipients_rate else None

    def _set_rate(self, rate: float) -> None:
        self.current = rate
        self._interval = 1 / (rate * self._headroom)

    async def acquire(self, recipients: int = 1) -> None:
        """Wait for a request slot (and, when limited, ``recipients`` recipient tokens)."""
        if self._recipients is not None:
            await self._recipients.acquire(min(recipients, self._recipients.max_rate))
        now = anyio.current_time()
        slot = max(self._next_slot, now)  # never before now: no burst after idling
        self._next_slot = slot + self._interval
        if slot > now:
            await anyio.sleep(slot - now)

    def throttled(self, retry_after: float | None) -> None:
        """The provider said slow down: honour its pause, cut the rate once per second."""
        now = anyio.current_time()
        self.throttles += 1
        pause = min(retry_after, 60.0) if retry_after is not None and retry_after > 0 else 0.0
        self._next_slot = max(self._next_slot, now + pause)
        if now - self._last_cut < 1.0:
            return  # requests in flight during the last cut say nothing new
        self._last_cut = now
        new_rate = max(self._min_rate, self.current * self._cut)
        if new_rate < self.current:
            self._set_rate(new_rate)

    def succeeded(self) -> None:
        """A clean response: after two quiet seconds, climb back 20 % a second."""
        if self.current >= self.target:
            return
        now = anyio.current_time()
        if now - self._last_cut >= 2.0 and now - self._last_raise >= 1.0:
            self._last_raise = now
            self._set_rate(min(self.target, self.current * 1.2))
