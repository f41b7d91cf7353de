"""Shard claims through Redis: leases, heartbeats and fencing epochs for ``sluice worker``.

State per run, every key carrying the run's hash tag (one slot on a Redis Cluster):

* ``…:leases``  ZSET shard → lease expiry in Redis-clock ms (0 = free); done shards leave it;
* ``…:owners``  HASH shard → ``owner:epoch`` of its latest claim;
* ``…:done``    SET of the shards finished;
* ``…:epoch``   the counter that issues epochs;
* ``…:meta``    HASH holding the number of shards the run was registered with.

Three scripts (``lua/claims_*.lua``) change it: *register* (once per run, idempotent), *claim*
(a free or expired shard, under a new epoch higher than every earlier one) and *holder* (beat,
done and release, which succeed only for the current ``owner:epoch`` while its lease is live).
Only Redis's clock (``TIME``) decides expiry.

A worker fences itself with its own clock (:class:`Lease`): it sends only while its monotonic
clock reads less than ``t_req + ttl - margin``, where ``t_req`` was taken *before* the request of
its last successful claim or heartbeat. Redis set the expiry to its own "now + ttl" after that
request arrived, so the worker stops sending before Redis would let anyone else claim the shard,
even when it cannot reach Redis at all (clocks are assumed to run at the same rate, not to
agree). A heartbeat refused (the lease moved on) fences at once. What is left: a process frozen
between its last fence check and the socket write for longer than ``margin`` can still send once.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

__all__ = (
    "ALL_DONE",
    "COORDINATOR_ERRORS",
    "Claim",
    "Lease",
    "ShardClaims",
    "Unregistered",
    "Waiting",
    "new_owner",
    "run_key",
)

log = structlog.get_logger("sluice.claims")

# What a lost or failing Redis raises through redis-py (its timeouts and connection errors are
# RedisError; a socket error can surface as OSError).
COORDINATOR_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


@cache
def _lua(name: str) -> str:
    return files("pipeline.scale").joinpath("lua", f"claims_{name}.lua").read_text(encoding="utf-8")


def run_key(doc: dict[str, Any]) -> str:
    """The Redis name of a run: its random run id and its campaign hash, from the parent run
    directory's run.json (two run directories, even of one campaign, never share keys)."""
    return f"{doc['run_id']}-{str(doc['campaign_hash'])[:16]}"


def new_owner() -> str:
    """A name for this worker process: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Claim:
    shard: int  # 1-based, as in source.shard = "i/n"
    epoch: int
    owner: str
    expires_ms: int  # Redis clock

    @property
    def token(self) -> str:
        return f"{self.owner}:{self.epoch}"


class Unregistered(Exception):
    """Redis holds no shards of the run: its state was lost (restarted without persistence,
    flushed, evicted). Registering again is safe: the shards' ledgers say what was sent, a shard
    done before is finished again at once, and new epochs stay above the old ones."""


@dataclass(frozen=True)
class Waiting:
    """Every shard left is held by a live lease; the first of them expires in ``seconds``."""

    seconds: float


ALL_DONE = "all done"


class ShardClaims:
    """The claims of one run's shards in one Redis (a single primary)."""

    def __init__(self, client: Redis, run: str, owner: str, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("the lease ttl must be positive")
        self.client = client
        self.owner = owner
        self.ttl = ttl
        prefix = f"sluice:claims:{{{run}}}:"
        self.meta, self.leases, self.owners = prefix + "meta", prefix + "leases", prefix + "owners"
        self.done_set, self.epoch_key = prefix + "done", prefix + "epoch"
        self._register = client.register_script(_lua("register"))
        self._claim = client.register_script(_lua("claim"))
        self._holder = client.register_script(_lua("holder"))

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    async def register(self, shards: int) -> bool:
        """Put shards 1..``shards`` in Redis unless the run is there already (True: put now).
        Raises ValueError when the run was registered with another number of shards."""
        try:
            return bool(await self._register(keys=[self.meta, self.leases], args=[shards]))
        except RedisError as exc:
            if str(exc).startswith("SHARDS"):
                raise ValueError(str(exc).removeprefix("SHARDS ")) from None
            raise

    async def claim(self) -> Claim | Waiting | str:
        """A shard under a new epoch, or :class:`Waiting`, or :data:`ALL_DONE`; raises
        :class:`Unregistered` when Redis has no shards of the run (a Redis restarted empty)."""
        try:
            shard, epoch, value = await self._claim(
                keys=[self.meta, self.leases, self.owners, self.epoch_key], args=[self.owner, self.ttl_ms]
            )
        except ResponseError as exc:
            if str(exc).startswith("UNREGISTERED"):
                raise Unregistered(str(exc)) from None
            raise
        if shard == 0:
            return ALL_DONE
        if shard < 0:
            return Waiting(max(0, int(value)) / 1000)
        return Claim(int(shard), int(epoch), self.owner, int(value))

    async def _act(self, action: str, claim: Claim) -> int:
        reply = await self._holder(
            keys=[self.leases, self.owners, self.done_set],
            args=[action, claim.shard, claim.token, self.ttl_ms],
        )
        return int(reply)

    async def beat(self, claim: Claim) -> bool:
        """Extend the lease by ttl from now; False: it is no longer this claim's."""
        return await self._act("beat", claim) > 0

    async def done(self, claim: Claim) -> bool:
        """Mark the shard done for good; False: the claim had lapsed (the shard stays claimable)."""
        return await self._act("done", claim) > 0

    async def release(self, claim: Claim) -> bool:
        """Give the shard back, claimable at once."""
        return await self._act("release", claim) > 0

    async def progress(self) -> tuple[int, int]:
        """(shards done, shards registered)."""
        done = await self.client.scard(self.done_set)
        total = await self.client.hget(self.meta, "shards")
        return int(done), int(total or 0)


class Lease:
    """A worker's hold on its claim: :meth:`fence` says whether it may still send, and
    :meth:`keep` beats every ``ttl / 4`` until cancelled.

    ``t_req`` is this process's monotonic clock read before the claim was asked for.
    """

    def __init__(self, claims: ShardClaims, claim: Claim, t_req: float, *, margin: float) -> None:
        if not 0 <= margin < claims.ttl:
            raise ValueError("the fence margin must be less than the lease ttl")
        self.claims = claims
        self.claim = claim
        self.margin = margin
        self.valid_until = t_req + claims.ttl - margin
        self.lost: str | None = None  # why the lease was lost, once it was refused
        self.beats = 0

    def fence(self) -> bool:
        """True while this process may send for the shard (asked next to every write)."""
        return self.lost is None and time.monotonic() < self.valid_until

    async def keep(self) -> None:
        interval = self.claims.ttl / 4
        while self.lost is None:
            await anyio.sleep(interval)
            t_req = time.monotonic()
            try:
                with anyio.fail_after(interval):
                    ok = await self.claims.beat(self.claim)
            except COORDINATOR_ERRORS as exc:
                # Not extended: the fence closes by itself at valid_until unless a beat gets through.
                log.warning("heartbeat_failed", shard=self.claim.shard, error=type(exc).__name__)
                continue
            if ok:
                self.valid_until = t_req + self.claims.ttl - self.margin
                self.beats += 1
            else:
                self.lost = "the shard's lease was taken over or expired"
                log.warning("lease_lost", shard=self.claim.shard, epoch=self.claim.epoch)
