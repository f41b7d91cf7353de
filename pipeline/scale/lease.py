"""The lease limiter: processes (or machines) that share one provider account share its limit.

No one-second window at the provider, *sliding* or aligned, may hold more than ``limit``
requests of all of them together. A sender takes tokens in leases:

1. **Lease expiry at the sender.** It notes ``t_req`` on its own monotonic clock *before*
   asking, and uses the tokens only while its clock reads ``< t_req + ttl``; leftovers are
   dropped.
2. **A sliding log of grants at the limiter.** A grant at limiter time ``a`` is cut down (or
   refused) so that the grants in ``(a - S, a]`` never add up to more than ``limit``, with
   ``S = 1 s + ttl + jitter``. A send at ``s`` from a grant at ``g`` has ``g ≤ s < g + ttl``
   (+ the jitter until the provider sees it), so the sends of any window ``[t, t + 1)`` come
   from grants in an interval of length S, all counted when the latest of them was made.
   The most it sustains is ``limit / S`` (ttl 25 ms, jitter 10 ms: 96.6 %).
3. **Pacing** (smoothness, not safety): a GCRA at ``limit / S`` with a small tolerance; a lease
   is granted whole or not at all and is capped at one pacing burst (else it could never be).
4. **A quiet span on new state**: a limiter without state (first use, restart, keys expired or
   evicted) grants nothing for S, as tokens of the state it lost may still be in use.

Only the limiter's clock decides; senders' clocks need the same rate, not the same time.
Assumed: one linearizable state (one Redis primary: a failover to an asynchronous replica can
bring back stale state the quiet span does not catch), and a limiter clock that is slewed,
never stepped (Redis ``TIME`` is wall-clock time).

Hosts of the same algorithm: :class:`LeaseAlgorithm` (pure, integer microseconds), served to
the processes of one machine over a Unix socket by :func:`serve_leases`, and ``lease.lua`` on
Redis. :func:`connect_limiter` reaches either; :class:`LeasedGovernor` paces a run with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import anyio
import structlog
from aiolimiter import AsyncLimiter

__all__ = (
    "DEFAULT_JITTER",
    "DEFAULT_TTL",
    "LeaseAlgorithm",
    "LeaseConfig",
    "LeasedGovernor",
    "Limiter",
    "LimiterUnavailable",
    "LocalLeaseServer",
    "RedisLimiter",
    "UnixLimiter",
    "account_key",
    "connect_limiter",
    "serve_leases",
)

log = structlog.get_logger("sluice.lease")

DEFAULT_TTL = 0.025  # s a lease's tokens may be used after it was asked for
DEFAULT_JITTER = 0.010  # s between a token's use and the provider seeing the request
DEFAULT_TOLERANCE = 0.050  # s of pacing tolerance: the burst is limit / S × this
DEFAULT_IDLE_EXPIRY = 60.0  # s without a call before the limiter forgets an account
REPLY_TIMEOUT = 1.0  # s: a lease answered later than this is of no use (ttl is far shorter)
LINE_MAX = 256


class LimiterUnavailable(Exception):
    """The limiter cannot be reached or did not answer: send nothing."""


@dataclass(frozen=True)
class LeaseConfig:
    """One account's limit and the lease timings; every sharer of the account must agree."""

    limit: int  # requests in any sliding second
    ttl: float = DEFAULT_TTL
    jitter: float = DEFAULT_JITTER
    tolerance: float = DEFAULT_TOLERANCE
    idle_expiry: float = DEFAULT_IDLE_EXPIRY

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1 request a second, not {self.limit}")
        if not 0 < self.ttl <= 1 or self.jitter < 0 or self.tolerance < 0:
            raise ValueError("ttl must be in (0, 1] s, jitter and tolerance not negative")
        if self.idle_expiry <= self.span:
            raise ValueError("idle_expiry must be longer than the span 1 s + ttl + jitter")

    @property
    def span(self) -> float:
        """S: the log's span, in seconds."""
        return 1.0 + self.ttl + self.jitter

    @property
    def span_us(self) -> int:
        return round(self.span * 1e6)

    @property
    def burst(self) -> int:
        """The largest lease: one pacing burst, at least one token."""
        return max(1, int(self.limit / self.span * self.tolerance))

    @property
    def tolerance_us(self) -> int:
        """How far ahead of now the pacing may run, in µs: ``burst`` emission intervals."""
        return math.ceil(self.burst * self.span_us / self.limit)

    @property
    def ceiling(self) -> float:
        """The most it sustains, requests/s: limit / S."""
        return self.limit / self.span


class LeaseAlgorithm:
    """The limiter for one account, pure: every call brings the limiter's time, in integer µs.

    The arithmetic is lease.lua's, operation for operation, so both grant the same on the
    same times.
    """

    def __init__(self, config: LeaseConfig) -> None:
        self.config = config
        self._span = config.span_us
        self._idle = round(config.idle_expiry * 1e6)
        self._grants: deque[tuple[int, int]] = deque()  # (time, tokens), oldest first
        self._total = 0
        self._tat = 0
        self._quiet_until = 0
        self._last: int | None = None  # the last call: None, or long ago, is new state

    def lease(self, now: int, want: int) -> tuple[int, int]:
        """Ask for ``want`` tokens at ``now`` (µs); returns (granted, µs to wait when 0)."""
        if want < 1:
            raise ValueError("a lease is of one token or more")
        cfg, span = self.config, self._span
        if self._last is None or now - self._last > self._idle:
            self._grants.clear()
            self._tat, self._total, self._quiet_until = now, 0, now + span
        self._last = now
        if now < self._quiet_until:
            return 0, self._quiet_until - now
        grants = self._grants
        while grants and grants[0][0] <= now - span:
            self._total -= grants.popleft()[1]
        n = min(want, cfg.burst, cfg.limit - self._total)
        if n <= 0:
            return 0, grants[0][0] + span - now
        new_tat = math.ceil(max(self._tat, now) + n * span / cfg.limit)
        if new_tat - now > cfg.tolerance_us:
            return 0, new_tat - now - cfg.tolerance_us
        self._tat = new_tat
        self._total += n
        grants.append((now, n))
        return n, 0


def account_key(kind: str, endpoint: str, identities: Iterable[str]) -> str:
    """The account's name in the limiter: a hash of the provider kind, the endpoint and the
    non-secret identities (access key id, appid), so no credential ever reaches Redis."""
    text = "\n".join([kind, endpoint.rstrip("/"), *identities])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Limiter(Protocol):
    """A lease limiter as a sender sees it."""

    ttl: float  # how long the limiter lets a lease's tokens be used
    burst: int  # the largest lease it grants

    async def lease(self, want: int) -> tuple[int, float]:
        """(tokens granted, seconds to wait before asking again when none); raises
        :class:`LimiterUnavailable`."""
        ...

    async def aclose(self) -> None: ...


# -- Redis -------------------------------------------------------------------------------------
LUA = resources.files("pipeline.scale").joinpath("lua", "lease.lua").read_text(encoding="utf-8")


def _redacted(url: str) -> str:
    """``scheme://host:port/db``: the URL without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisLimiter:
    """:class:`LeaseAlgorithm` as one Lua script on a Redis primary, on Redis's clock."""

    def __init__(self, url: str, config: LeaseConfig, account: str) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.config = config
        self.ttl = config.ttl
        self.burst = config.burst
        self.where = _redacted(url)
        # One immediate retry: a pooled connection to a restarted server reconnects at once.
        self._redis = Redis.from_url(
            url,
            socket_timeout=REPLY_TIMEOUT,
            socket_connect_timeout=REPLY_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._script = self._redis.register_script(LUA)  # EVALSHA; loads it again after NOSCRIPT
        tag = "{" + account + "}"  # one hash slot per account: the script also runs on a cluster
        self.keys = [f"sluice:lease:{tag}:state", f"sluice:lease:{tag}:grants"]
        self._args = [config.limit, config.span_us, config.burst, config.tolerance_us]
        self._idle_ms = round(config.idle_expiry * 1000)

    async def lease_at(self, want: int) -> tuple[int, int, int]:
        """(granted, wait µs, the Redis time it decided at in µs)."""
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            reply: Any = await self._script(keys=self.keys, args=[want, *self._args, self._idle_ms])
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise LimiterUnavailable(f"{self.where}: {type(exc).__name__}") from None
        granted, wait_us, now_us = (int(x) for x in reply)
        return granted, wait_us, now_us

    async def lease(self, want: int) -> tuple[int, float]:
        granted, wait_us, _ = await self.lease_at(want)
        return granted, wait_us / 1e6

    async def aclose(self) -> None:
        await self._redis.aclose()


# -- one machine: the algorithm served over a Unix socket ---------------------------------------
class LocalLeaseServer:
    """:class:`LeaseAlgorithm` per account on this process's monotonic clock, for the processes
    of this machine. Wire, one line each way: ``"<account> <want>"`` → ``"<granted> <wait_us>"``,
    after a greeting ``"sluice-lease <ttl_us> <burst>"`` that tells clients the lease timings.

    Served by a plain asyncio protocol: each request is answered synchronously as its line
    arrives, nothing awaits, so a shutdown cannot interrupt a lease half-way.
    """

    def __init__(self, config: LeaseConfig, clock_us: Callable[[], int] | None = None) -> None:
        self.config = config
        self.calls = 0
        self._clock_us = clock_us or (lambda: time.monotonic_ns() // 1000)
        self._accounts: dict[str, LeaseAlgorithm] = {}
        self.greeting = f"sluice-lease {round(config.ttl * 1e6)} {config.burst}\n".encode()

    def lease(self, account: str, want: int) -> tuple[int, int]:
        algorithm = self._accounts.get(account)
        if algorithm is None:
            algorithm = self._accounts[account] = LeaseAlgorithm(self.config)
        self.calls += 1
        return algorithm.lease(self._clock_us(), want)

    def answer(self, line: bytes) -> bytes:
        """The reply to one request line; ValueError when it is not one."""
        account, want = line.decode("ascii").split(" ")
        granted, wait_us = self.lease(account, max(1, int(want)))
        return f"{granted} {wait_us}\n".encode()


class _LeaseConnection(asyncio.Protocol):
    def __init__(self, server: LocalLeaseServer, live: set[asyncio.Transport]) -> None:
        self._server = server
        self._live = live
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self._live.add(self._transport)
        self._transport.write(self._server.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._live.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        try:
            if len(self._buffer) > LINE_MAX:
                raise ValueError("line too long")
            self._transport.write(b"".join(self._server.answer(line) for line in lines))
        except ValueError:
            log.warning("lease_bad_request")
            self._transport.close()


@asynccontextmanager
async def serve_leases(
    path: Path | str,
    *,
    limit: int,
    ttl: float = DEFAULT_TTL,
    jitter: float = DEFAULT_JITTER,
    tolerance: float = DEFAULT_TOLERANCE,
) -> AsyncIterator[LocalLeaseServer]:
    """Serve leases on the Unix socket ``path`` (owner-only) until the block exits."""
    server = LocalLeaseServer(LeaseConfig(limit, ttl=ttl, jitter=jitter, tolerance=tolerance))
    path = Path(path)
    path.unlink(missing_ok=True)  # a socket left by a process that died
    live: set[asyncio.Transport] = set()
    loop = asyncio.get_running_loop()
    listener = await loop.create_unix_server(lambda: _LeaseConnection(server, live), str(path))
    try:
        path.chmod(0o600)
        yield server
    finally:
        listener.close()
        for transport in list(live):
            transport.close()
        with anyio.CancelScope(shield=True):
            await listener.wait_closed()
        path.unlink(missing_ok=True)


class UnixLimiter:
    """A client of :func:`serve_leases`; one connection, opened again after a failure."""

    def __init__(self, path: str, account: str, burst: int) -> None:
        self.where = f"unix:{path}"
        self.ttl = DEFAULT_TTL  # until the server's greeting says
        self.burst = burst
        self._path = path
        self._account = account
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = anyio.Lock()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(self._path, limit=LINE_MAX)
        self._conn = reader, writer
        magic, ttl_us, burst = (await reader.readuntil(b"\n")).decode().split(" ")
        if magic != "sluice-lease":
            raise ValueError(f"{self.where} is not a lease server")
        self.ttl, self.burst = int(ttl_us) / 1e6, min(self.burst, int(burst))
        return reader, writer

    async def lease(self, want: int) -> tuple[int, float]:
        async with self._lock:
            try:
                with anyio.fail_after(REPLY_TIMEOUT):
                    reader, writer = self._conn or await self._connect()
                    writer.write(f"{self._account} {want}\n".encode())
                    granted, wait_us = (await reader.readuntil(b"\n")).split(b" ")
                    return int(granted), int(wait_us) / 1e6
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:  # fmt: skip
                self._drop()
                raise LimiterUnavailable(f"{self.where}: {type(exc).__name__}") from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()

    async def aclose(self) -> None:
        self._drop()


@asynccontextmanager
async def connect_limiter(
    url: str,
    *,
    limit: int,
    account_key: str,
    ttl: float = DEFAULT_TTL,
    jitter: float = DEFAULT_JITTER,
    tolerance: float = DEFAULT_TOLERANCE,
) -> AsyncIterator[RedisLimiter | UnixLimiter]:
    """The limiter at ``redis://host:port/db`` (or ``rediss://``) or ``unix:/path`` (a
    :func:`serve_leases` host, whose own limit and ttl then apply). Connects lazily: an
    unreachable limiter shows as :class:`LimiterUnavailable` on the first lease."""
    config = LeaseConfig(limit, ttl=ttl, jitter=jitter, tolerance=tolerance)
    limiter: RedisLimiter | UnixLimiter
    if url.startswith(("redis://", "rediss://")):
        limiter = RedisLimiter(url, config, account_key)
    elif url.startswith("unix:"):
        limiter = UnixLimiter(url.removeprefix("unix:"), account_key, config.burst)
    else:
        raise ValueError(f"a limiter is redis://host:port/db or unix:/path, not {_redacted(url)!r}")
    try:
        yield limiter
    finally:
        with anyio.CancelScope(shield=True):
            await limiter.aclose()


# -- the sender's side --------------------------------------------------------------------------
class LeasedGovernor:
    """:class:`pipeline.limit.Governor` on a shared lease limiter.

    One lease request at a time, for as many tokens as there are requests waiting (at most the
    limiter's burst); a token is used only while this process's clock reads before
    ``t_req + ttl``, ``t_req`` taken before asking. An unreachable limiter means sending nothing
    (fail closed): it is asked again with a growing backoff, logged once per outage. A throttle
    pauses this process for the provider's Retry-After (1 s without one). Recipients per second
    (``recipients_rate``) are limited per process, not shared.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        target: float,
        recipients_rate: float | None = None,
        backoff: tuple[float, float] = (0.05, 0.5),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = self.current = target
        self.throttles = 0
        self.outages = 0
        self.counts = {"leases": 0, "refused": 0, "tokens": 0, "used": 0, "dropped": 0}
        self._limiter = limiter
        self._clock = clock
        self._backoff_first, self._backoff_max = backoff
        self._backoff = self._backoff_first
        self._down = False
        self._tokens = 0
        self._expires = 0.0
        self._paused_until = 0.0
        self._waiting = 0
        self._lock = anyio.Lock()
        self._recipients = AsyncLimiter(recipients_rate, 1.0) if recipients_rate else None

    async def acquire(self, recipients: int = 1) -> None:
        if self._recipients is not None:
            await self._recipients.acquire(min(recipients, self._recipients.max_rate))
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    now = self._clock()
                    if now < self._paused_until:
                        self.counts["dropped"] += self._tokens
                        self._tokens = 0
                        await anyio.sleep(self._paused_until - now)
                    elif self._tokens > 0 and now < self._expires:
                        self._tokens -= 1
                        self.counts["used"] += 1
                        return
                    else:
                        self.counts["dropped"] += self._tokens
                        self._tokens = 0  # expired leftovers are dropped, never used late
                        await self._lease()
        finally:
            self._waiting -= 1

    async def _lease(self) -> None:
        want = max(1, min(self._waiting, self._limiter.burst))
        t_req = self._clock()  # before asking: the lease runs from here
        try:
            granted, wait = await self._limiter.lease(want)
        except LimiterUnavailable as exc:
            if not self._down:
                self._down = True
                self.outages += 1
                log.warning("limiter_unreachable", limiter=str(exc), sending="paused")
            await anyio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, self._backoff_max)
            return
        if self._down:
            self._down = False
            log.info("limiter_back")
        self._backoff = self._backoff_first
        self.counts["leases"] += 1
        if granted:
            self.counts["tokens"] += granted
            self._tokens, self._expires = granted, t_req + self._limiter.ttl
        else:
            self.counts["refused"] += 1
            await anyio.sleep(min(max(wait, 0.0005), 1.0))

    def throttled(self, retry_after: float | None) -> None:
        self.throttles += 1
        pause = min(retry_after, 60.0) if retry_after is not None and retry_after > 0 else 1.0
        self._paused_until = max(self._paused_until, self._clock() + pause)
        self._tokens = 0

    def succeeded(self) -> None:
        """Nothing to adapt: the shared limit is the limit."""
