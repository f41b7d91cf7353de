"""Provider-neutral gateway machinery: fault plan, rate windows, nonces, receipts, ids, stats."""

from __future__ import annotations

import bisect
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from providers.simulator.server import Connection

__all__ = (
    "FAULT_KINDS",
    "PRE_FAULTS",
    "FaultPlan",
    "FixedWindowLimiter",
    "IdSource",
    "NonceCache",
    "Pacer",
    "ReceiptLog",
    "Sent",
    "SlidingPeak",
    "Stats",
)

FAULT_KINDS = (
    "http500",  # 500 InternalError, nothing recorded
    "http503",  # 503 ServiceUnavailable, nothing recorded
    "throttle",  # 400 Throttling.User, nothing recorded
    "drop_before",  # connection closed after the head, nothing processed
    "drop_after",  # processed and recorded, then closed without a response
    "slow",  # processed and recorded, answered after slow_ms
    "reset",  # processed and recorded, then an RST instead of a response
    "garbage",  # processed and recorded, 200 with a truncated JSON body
    "business_error",  # 200 with a per-recipient business code, nothing recorded
)
PRE_FAULTS = frozenset({"http500", "http503", "throttle"})
"""Faults answered before the request is processed."""


class FaultPlan:
    """Draws at most one fault per request, reproducibly from a seed.

    ``rate`` is spread over ``mix`` (relative weights); ``rates`` adds absolute
    per-kind rates on top. One uniform draw per request picks the kind.
    """

    def __init__(
        self,
        rate: float,
        mix: Mapping[str, float],
        rates: Mapping[str, float],
        rng: random.Random,
    ) -> None:
        probs = dict.fromkeys(FAULT_KINDS, 0.0)
        weight = sum(mix.values())
        for kind in (*mix, *rates):
            if kind not in probs:
                raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        if rate and weight > 0:
            for kind, w in mix.items():
                probs[kind] += rate * w / weight
        for kind, r in rates.items():
            probs[kind] += r
        if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1 + 1e-9:
            raise ValueError("fault rates must be non-negative and add up to at most 1")
        self._edges: list[float] = []
        self._kinds: list[str] = []
        total = 0.0
        for kind, p in probs.items():
            if p > 0:
                total += p
                self._edges.append(total)
                self._kinds.append(kind)
        self.total = total
        self._rng = rng

    def draw(self) -> str | None:
        if not self._kinds:
            return None
        u = self._rng.random()
        if u >= self.total:
            return None
        return self._kinds[min(bisect.bisect_right(self._edges, u), len(self._kinds) - 1)]


class FixedWindowLimiter:
    """Requests per key in fixed one-second windows of a monotonic clock (``qps`` 0: unlimited)."""

    def __init__(self, qps: int, clock: Callable[[], float]) -> None:
        self.qps = qps
        self._clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> float | None:
        """Count a request; None if allowed, else seconds until the next window opens."""
        if self.qps <= 0:
            return None
        now = self._clock()
        window = int(now)
        if window != self._window:
            self._window = window
            self._counts.clear()
        n = self._counts.get(key, 0)
        if n >= self.qps:
            return window + 1 - now
        self._counts[key] = n + 1
        return None


class NonceCache:
    """Nonces seen within their validity window, bounded (the oldest are forgotten first)."""

    def __init__(self, max_size: int = 262_144) -> None:
        self._max = max_size
        self._expiry: dict[str, float] = {}  # insertion order is expiry order per window length

    def seen(self, nonce: str, now: float, ttl: float) -> bool:
        """True if ``nonce`` was used within its window; otherwise remember it."""
        expiry = self._expiry
        old = expiry.get(nonce)
        if old is not None and old > now:
            return True
        if old is not None:
            del expiry[nonce]
        if len(expiry) >= self._max:
            for key in list(expiry)[: max(1, self._max // 16)]:
                del expiry[key]
        else:
            while expiry:
                first = next(iter(expiry))
                if expiry[first] > now:
                    break
                del expiry[first]
        expiry[nonce] = now + ttl
        return False


class Sent:
    """One accepted request, shared by all its recipients in the index."""

    __slots__ = ("biz_id", "out_id", "t", "template")

    def __init__(self, out_id: str, biz_id: str, template: str, t: float) -> None:
        self.out_id = out_id
        self.biz_id = biz_id
        self.template = template
        self.t = t


class ReceiptLog:
    """Accepted recipients: a JSONL file written with one ``write()`` per request, and a count.

    With ``index`` on, also a phone → sends map for status queries. A file left by an earlier
    run is kept and appended to; :meth:`previous` reads it back so that the gateways' status
    queries answer for what was accepted before a restart (``accepted`` counts this run only).
    """

    def __init__(self, path: Path | None, *, index: bool) -> None:
        self.path = path
        self.accepted = 0
        self.on_write: Callable[[bytes], None] | None = None  # the receipt pusher, when pushing
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644) if path else -1
        self.index: dict[str, Sent | list[Sent]] | None = {} if index else None
        if self._fd >= 0:
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                os.write(self._fd, b"\n")  # a line torn by a crash: appends start on a fresh one

    def previous(self) -> Iterator[dict[str, Any]]:
        """The records already in the file when it was opened, in order (unreadable lines skipped)."""
        if self.path is None or self._fd < 0:
            return
        with self.path.open("rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("phone"), str):
                    yield record

    def write(self, data: bytes, count: int) -> None:
        """Append ``count`` recipients' lines; they reach the OS before this returns."""
        self.accepted += count
        if self.on_write is not None:
            self.on_write(data)
        if self._fd < 0:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def add(self, keys: list[str], sent: Sent) -> None:
        index = self.index
        if index is None:
            return
        new: dict[str, Sent | list[Sent]] = dict.fromkeys(keys, sent)
        if len(new) == len(keys):  # the usual case: set operations at C speed
            for key in index.keys() & new.keys():
                old = index[key]
                new[key] = [*old, sent] if isinstance(old, list) else [old, sent]
            index.update(new)
            return
        for key in keys:  # a number repeated within the request
            prev = index.get(key)
            if prev is None:
                index[key] = sent
            elif isinstance(prev, list):
                prev.append(sent)
            else:
                index[key] = [prev, sent]

    def lookup(self, key: str) -> list[Sent]:
        found = (self.index or {}).get(key)
        if found is None:
            return []
        return found if isinstance(found, list) else [found]

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


class IdSource:
    """Request ids shaped like Aliyun's (upper-case UUID) and numeric BizIds, cheap and unique."""

    def __init__(self, rng: random.Random) -> None:
        prefix = f"{rng.getrandbits(64):016X}"
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-4{prefix[13:16]}-A"
        self._n = rng.getrandbits(32)
        self._biz = 900_000_000_000_000_000 + rng.randrange(10**16)
        self._hex_prefix = f"{rng.getrandbits(64):016x}"  # drawn last: the ids above keep their seeds
        self._hex = rng.getrandbits(48)

    def advance(self, n: int) -> None:
        """Skip ``n`` ids of each kind: after a restart with the same seed, ids already given stay unique."""
        self._n += n
        self._biz += n
        self._hex += n

    def request_id(self) -> str:
        self._n += 1
        return f"{self._prefix}{(self._n >> 48) & 0xFFF:03X}-{self._n & 0xFFFFFFFFFFFF:012X}"

    def biz_id(self) -> str:
        self._biz += 1
        return f"{self._biz}^0"

    def hex_id(self) -> str:
        """32 lower-case hex digits (SUBMAIL send_id and batchlist, NXCloud messageId)."""
        self._hex += 1
        return f"{self._hex_prefix}{self._hex & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class Pacer:
    """When and how a gateway answers: latency plus jitter, and the faults drawn for processed requests."""

    def __init__(self, latency_ms: float, jitter_ms: float, slow_ms: float, rng: random.Random) -> None:
        self._latency = latency_ms / 1000
        self._jitter = jitter_ms / 1000
        self._slow = slow_ms / 1000
        self._rng = rng

    def delay(self) -> float:
        if self._jitter:
            return self._latency + self._rng.uniform(0, self._jitter)
        return self._latency

    def finish(
        self,
        conn: Connection,
        body: bytes,
        fault: object,
        stats: Stats,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Answer a processed request with 200 ``body``, or as the drawn post-processing fault says."""
        delay = self.delay()
        if fault is None:
            conn.respond(200, body, headers, delay=delay)
            return
        stats.fault(str(fault))
        if fault == "drop_after":
            conn.drop(delay=delay)
        elif fault == "reset":
            conn.reset(delay=delay)
        elif fault == "slow":
            conn.respond(200, body, headers, delay=delay + self._slow)
        elif fault == "garbage":
            conn.respond(200, body[: len(body) // 2], headers, delay=delay)
        else:
            raise AssertionError(f"unhandled fault {fault!r}")


class SlidingPeak:
    """The most requests, and recipients, accepted in any sliding window of ``span`` seconds.

    Exact: the busiest window ``[s, s + span)`` starts at an accepted request, and holds what
    the window ``(e - span, e]`` ending at its last request holds, which is counted as each
    request arrives. Only the last span's requests are kept, plus the running peaks.
    """

    def __init__(self, span: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._span = span
        self._clock = clock
        self._recent: deque[tuple[float, int]] = deque()  # (time, recipients), oldest first
        self._requests = self._recipients = 0  # in the current window
        self.peak_requests = self.peak_recipients = 0

    def add(self, recipients: int) -> None:
        now = self._clock()
        recent = self._recent
        while recent and recent[0][0] <= now - self._span:
            self._requests -= 1
            self._recipients -= recent.popleft()[1]
        recent.append((now, recipients))
        self._requests += 1
        self._recipients += recipients
        self.peak_requests = max(self.peak_requests, self._requests)
        self.peak_recipients = max(self.peak_recipients, self._recipients)


class Stats:
    """Counters, served by ``GET /__stats``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = 0
        self.accepted_requests = 0
        self.peaks: dict[str, SlidingPeak] = {}  # per account (access key id, appid): across connections
        self._clock = clock
        self.throttled = 0
        self.faults: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.actions: dict[str, int] = {}

    def accept(self, account: str, recipients: int) -> None:
        """A request of ``recipients`` accepted for ``account``."""
        self.accepted_requests += 1
        peak = self.peaks.get(account)
        if peak is None:
            peak = self.peaks[account] = SlidingPeak(clock=self._clock)
        peak.add(recipients)

    def peak_1s(self) -> dict[str, dict[str, int]]:
        """Per account: the most requests and recipients accepted in any sliding second."""
        return {
            account: {"requests": p.peak_requests, "recipients": p.peak_recipients}
            for account, p in self.peaks.items()
        }

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def action(self, name: str) -> None:
        self.actions[name] = self.actions.get(name, 0) + 1
