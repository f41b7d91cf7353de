"""``sluice worker``: claim a run's shards through Redis and run them, one at a time, until every
shard is done.

The run directory (on storage every worker sees) holds the parent run.json, created by the first
worker under the parent's run lock, and one run directory per shard (:func:`shard_dir`), created
or resumed by whichever worker claims that shard. A claim (:mod:`pipeline.scale.claims`) carries
an epoch; the shard's run lock is taken with it (:meth:`RunDir.lock`), so a worker whose lease
lapsed while it was frozen cannot keep the shard from its next holder, and its fence keeps it
from sending. The epoch of each claim is in the shard's ``log.jsonl`` (``shard_claimed``, and on
every line the worker logs while it holds the shard) and in its ``run.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from redis.asyncio import Redis

from pipeline.app.api import check_source, start_run
from pipeline.app.campaign import Campaign
from pipeline.app.rundir import RunDir
from pipeline.errors import LEASE_LOST, CampaignError, RunDirError
from pipeline.scale import shard_dir
from pipeline.scale.claims import (
    ALL_DONE,
    COORDINATOR_ERRORS,
    Claim,
    Lease,
    ShardClaims,
    Unregistered,
    Waiting,
    new_owner,
    run_key,
)

__all__ = ("ShardRun", "WorkerReport", "prepare_run", "shard_campaign", "work")

log = structlog.get_logger("sluice.worker")

PARENT_LOCK_WAIT = 10.0  # seconds a worker waits for another creating the parent run directory


def shard_campaign(campaign: Campaign, index: int, count: int) -> Campaign:
    """The campaign of shard ``index`` of ``count``: the same, with ``source.shard = "i/n"``."""
    source = dataclasses.replace(campaign.source, shard=f"{index}/{count}")
    return dataclasses.replace(campaign, source=source)


def prepare_run(campaign: Campaign, run_dir: Path, shards: int | None) -> tuple[dict[str, Any], int]:
    """The parent run.json (created when missing) and the number of shards.

    Workers started together all find no run.json: the parent's run lock, waited for up to
    :data:`PARENT_LOCK_WAIT`, lets one of them create it and the others read it.
    """
    if campaign.source.shard is not None:
        raise CampaignError("source.shard", "sluice worker shards the source itself: remove source.shard")
    rd = RunDir(run_dir)
    deadline = time.monotonic() + PARENT_LOCK_WAIT
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(rd.lock("sluice worker: preparing the run"))
                break
            except RunDirError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if rd.exists():
            doc = rd.load()
            if doc["campaign_hash"] != campaign.digest():
                raise RunDirError(f"{run_dir} holds a run of a different campaign; use another --run-dir")
            pinned = doc.get("shards")
            if not isinstance(pinned, int):
                raise RunDirError(f"{run_dir} is not a run in shards (its run.json has no shards)")
            if shards is not None and shards != pinned:
                raise CampaignError("--shards", f"{run_dir} is a run in {pinned} shards, not {shards}")
            return doc, pinned
        if shards is None:
            raise CampaignError("--shards", f"{run_dir} is a new run: say how many shards it has")
        doc = rd.create(campaign.to_dict(), campaign.digest(), check_source(campaign))
        doc["shards"] = shards
        rd.save(doc)
        return doc, shards


@dataclass
class ShardRun:
    """One claim this worker ran."""

    shard: int
    epoch: int
    outcome: str  # done | lease lost | busy | stopped | unfinished | interrupted
    counts: dict[str, int] = field(default_factory=dict)
    detail: str | None = None


@dataclass
class WorkerReport:
    runs: list[ShardRun] = field(default_factory=list)
    all_done: bool = False
    shards_done: int = 0
    shards: int = 0
    stop_code: str | None = None  # the provider's or the disk's, when a shard stopped the worker


@dataclass
class _Worker:
    campaign: Campaign
    run_dir: Path
    shards: int
    claims: ShardClaims
    stop: anyio.Event
    endpoint: str | None
    say: Callable[[str], None]  # a line for the operator
    margin: float
    limiter: str | None = None  # the lease limiter every shard paces with (the coordinator's Redis)
    report: WorkerReport = field(default_factory=WorkerReport)

    async def loop(self) -> None:
        ttl = self.claims.ttl
        backoff = 0.1
        while not self.stop.is_set():
            t_req = time.monotonic()
            try:
                with anyio.fail_after(ttl):
                    try:
                        got = await self.claims.claim()
                    except Unregistered:
                        log.warning("claims_lost", detail="Redis has no shards of the run: registering again")
                        await self.claims.register(self.shards)
                        continue
            except COORDINATOR_ERRORS as exc:
                log.warning("coordinator_unreachable", error=type(exc).__name__)
                self.say(f"coordinator unreachable ({type(exc).__name__}): retrying in {backoff:.1f} s")
                await self._pause(backoff)
                backoff = min(ttl, backoff * 2)
                continue
            backoff = 0.1
            if got == ALL_DONE:
                self.report.all_done = True
                return
            if isinstance(got, Waiting):
                await self._pause(min(max(got.seconds, 0.05), ttl / 4))
                continue
            assert isinstance(got, Claim)
            run = await self._hold(got, t_req)
            self.report.runs.append(run)
            self.say(f"shard {run.shard}/{self.shards} (epoch {run.epoch}): {run.outcome}")
            if run.outcome in ("stopped", "unfinished", "interrupted"):
                return

    async def _pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self.stop.wait()

    async def _hold(self, claim: Claim, t_req: float) -> ShardRun:
        lease = Lease(self.claims, claim, t_req, margin=self.margin)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lease.keep)
            try:
                run = await self._run_shard(claim, lease)
            finally:
                tg.cancel_scope.cancel()
        # Tell Redis how it went; a failure here leaves the lease to expire (the ledger has it all).
        try:
            with anyio.fail_after(self.claims.ttl):
                if run.outcome == "done":
                    if not await self.claims.done(claim):
                        run.outcome, run.detail = "lease lost", "finished, but the lease had lapsed"
                elif run.outcome in ("stopped", "unfinished", "interrupted"):
                    await self.claims.release(claim)
        except COORDINATOR_ERRORS as exc:
            log.warning("coordinator_unreachable", error=type(exc).__name__)
            if run.outcome == "done":
                run.outcome, run.detail = "lease lost", "finished, but Redis was unreachable"
        return run

    async def _run_shard(self, claim: Claim, lease: Lease) -> ShardRun:
        path = shard_dir(self.run_dir, claim.shard, self.shards)
        rd = RunDir(path)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(rd.lock("sluice worker", epoch=claim.epoch))
            except RunDirError as exc:  # `sluice resume` by hand, or a newer claim: let the lease lapse
                log.warning("shard_busy", shard=claim.shard, detail=str(exc))
                return ShardRun(claim.shard, claim.epoch, "busy", detail=str(exc))
            with _shard_log(path, shard=claim.shard, epoch=claim.epoch):
                log.info(
                    "shard_claimed",
                    of=self.shards,
                    owner=claim.owner,
                    lease_expires_ms=claim.expires_ms,
                    ttl_s=self.claims.ttl,
                )
                result = await start_run(
                    shard_campaign(self.campaign, claim.shard, self.shards),
                    path,
                    endpoint=self.endpoint,
                    stop=self.stop,
                    fence=lease.fence,
                    limiter=self.limiter,
                )
        counts = result.counts
        if result.stop_code == LEASE_LOST:
            return ShardRun(claim.shard, claim.epoch, "lease lost", counts, lease.lost or result.stopped)
        if self.stop.is_set() and not result.complete:
            return ShardRun(claim.shard, claim.epoch, "interrupted", counts, result.stopped)
        if result.stopped is not None:
            self.report.stop_code = result.stop_code
            return ShardRun(claim.shard, claim.epoch, "stopped", counts, result.stopped)
        if not result.complete:
            what = "deferred" if counts.get("deferred") else "pending"
            return ShardRun(claim.shard, claim.epoch, "unfinished", counts, f"recipients {what}")
        return ShardRun(claim.shard, claim.epoch, "done", counts)


@contextlib.contextmanager
def _shard_log(path: Path, **context: Any) -> Iterator[None]:
    """The shard's own log.jsonl, every line carrying the claim's shard and epoch."""
    from pipeline.app.run_commands import open_log

    open_log(path, echo=False)
    structlog.contextvars.bind_contextvars(**context)
    try:
        yield
    finally:
        structlog.contextvars.unbind_contextvars(*context)


async def work(
    campaign: Campaign,
    run_dir: Path,
    doc: dict[str, Any],
    *,
    shards: int,
    client: Redis,
    ttl: float,
    stop: anyio.Event,
    endpoint: str | None = None,
    say: Callable[[str], None],
    limiter: str | None = None,
) -> WorkerReport:
    """Register the run's shards (once), then claim and run shards until every one is done, the
    worker is stopped, or a shard stops it (the provider refused the account, the disk...).

    ``limiter``: the lease limiter URL the shards pace with, so that every worker of every
    machine shares the provider account's limit (None: each shard paces by itself)."""
    claims = ShardClaims(client, run_key(doc), new_owner(), ttl)
    try:
        with anyio.fail_after(max(ttl, 5.0)):
            await claims.register(shards)
    except ValueError as exc:
        raise CampaignError("--shards", str(exc)) from None
    worker = _Worker(campaign, run_dir, shards, claims, stop, endpoint, say, margin=ttl / 5, limiter=limiter)
    await worker.loop()
    report = worker.report
    report.shards = shards
    with contextlib.suppress(*COORDINATOR_ERRORS):
        with anyio.fail_after(ttl):
            report.shards_done, _ = await claims.progress()
    return report
