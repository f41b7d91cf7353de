"""The Python API: start, resume and inspect runs from your own code.

::

    import anyio
    from pipeline import load_campaign, start_run

    async def main() -> None:
        campaign = load_campaign(Path("campaign.toml"))
        result = await start_run(campaign, Path("runs/spring-sale"))
        print(result.counts)

    anyio.run(main, backend_options={"use_uvloop": True})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from pipeline.admit import columns_needed, open_source
from pipeline.app.account import make_provider
from pipeline.app.campaign import DB_KINDS, Campaign, parse_campaign
from pipeline.app.rundir import RunDir
from pipeline.engine import Progress, RunResult, run_campaign
from pipeline.errors import CampaignError, RunDirError
from pipeline.ledger import replay
from pipeline.limit import Governor
from pipeline.scale.shards import shard_count
from pipeline.source import compare_file_fingerprints
from providers.base import Provider

log = structlog.get_logger("sluice.api")

__all__ = (
    "check_source",
    "leased_governor",
    "make_provider",
    "pinned_campaign",
    "resume_run",
    "run_status",
    "start_run",
)


def check_source(campaign: Campaign) -> dict[str, Any]:
    """Open the source and check the columns the campaign reads; return its fingerprint.

    Raises CampaignError naming a column a CSV header lacks, SourceError when
    the source cannot be read. Nothing is sent.
    """
    source = open_source(campaign)
    fingerprint = source.fingerprint()
    header = source.columns()
    where = "CSV header" if campaign.source.kind == "csv" else "columns of the source"
    if header is not None:
        for col, field_name in columns_needed(campaign).items():
            if col not in header:
                raise CampaignError(field_name, f"column {col!r} is not in the {where} {header}")
    return fingerprint


async def _checked_source(campaign: Campaign, *, full: bool) -> dict[str, Any]:
    """The source's fingerprint (``full``: after checking its columns); a database is
    queried in a worker thread, off the event loop."""
    if campaign.source.kind not in DB_KINDS:
        return check_source(campaign) if full else open_source(campaign).fingerprint()
    if full:
        return await anyio.to_thread.run_sync(check_source, campaign)
    return await anyio.to_thread.run_sync(lambda: open_source(campaign).fingerprint())


def _check_same_source(
    campaign: Campaign, pinned: dict[str, Any], current: dict[str, Any], *, force: bool, run_dir: Path
) -> bool:
    """Refuse (unless ``force``) or warn about a source that changed since the run started;
    True when the run goes on with a changed source (run.json is then pinned to it anew)."""
    if campaign.source.kind in DB_KINDS:
        from pipeline.db import compare_fingerprints

        refusal, warning = compare_fingerprints(pinned, current)
        if refusal is not None and not force:
            raise RunDirError(f"{refusal} (run directory {run_dir})")
        if refusal is not None or warning is not None:
            log.warning("source_changed", detail=refusal or warning, forced=refusal is not None)
        return False
    verdict = compare_file_fingerprints(pinned, current)
    path = campaign.source.path
    if verdict == "changed":
        # The ledger knows recipients by row number: rows edited, inserted, removed or moved
        # would be taken for others. No option makes that safe.
        raise RunDirError(
            f"the source {path} changed since {run_dir} was started: rows it had when the run began "
            "were edited, inserted, removed or reordered, so the ledger's row numbers no longer name "
            "the same recipients. Put the original file back to resume, or start a new run "
            "directory for the new file"
        )
    if verdict == "appended":
        added = int(current["size"]) - int(pinned["size"])
        if not force:
            raise RunDirError(
                f"the source {path} grew by {added:,} bytes since {run_dir} was started (the rows it "
                "had are unchanged); --force sends the appended rows too"
            )
        log.warning("source_appended", bytes=added)
        return True
    return False


def pinned_campaign(run_dir: RunDir, *, strict: bool = True) -> tuple[Campaign, dict[str, Any]]:
    """The campaign a run directory was created with; ``strict``: refuse a run.json whose
    campaign no longer matches the hash recorded when the run started."""
    doc = run_dir.load(strict=strict)
    data = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in doc["campaign"].items()
    }
    try:
        campaign = parse_campaign(data, run_dir.path)
    except CampaignError as exc:
        raise RunDirError(f"{run_dir.run_json} holds an invalid campaign: {exc}") from None
    if strict and campaign.digest() != doc.get("campaign_hash"):
        raise RunDirError(
            f"the campaign in {run_dir.run_json} was edited after the run started (it no longer "
            "matches its recorded hash): a run goes on with the campaign it was started with; "
            "put the file back, or start a new run directory"
        )
    return campaign, doc


async def start_run(
    campaign: Campaign,
    run_dir: Path,
    *,
    force: bool = False,
    endpoint: str | None = None,
    provider: Provider | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: anyio.Event | None = None,
    total_hint: int | None = None,
    limiter: str | None = None,
    fence: Callable[[], bool] | None = None,
) -> RunResult:
    """Start ``campaign`` in ``run_dir``, or continue it there if it was started already.

    A run directory holding a different campaign or source is refused unless
    ``force``. ``limiter`` (``redis://…`` or ``unix:/path``): the provider account's limit is
    shared, through that lease limiter, with every other run using it. ``fence``: see
    :func:`pipeline.engine.run_campaign` (a shard worker's claim).
    """
    rd = RunDir(run_dir)
    with rd.lock("sluice run"):
        fingerprint = await _checked_source(campaign, full=True)
        if campaign.source.kind in DB_KINDS:
            total_hint = _rows(fingerprint, total_hint)
        if rd.exists():
            doc = _not_sharded(rd)
            if not force and doc["campaign_hash"] != campaign.digest():
                raise RunDirError(
                    f"{run_dir} holds a run of a different campaign; use another --run-dir "
                    "(or --force to continue it with this one)"
                )
            _pin_source(campaign, rd, doc, fingerprint, force=force)
        else:
            doc = rd.create(campaign.to_dict(), campaign.digest(), fingerprint)
        provider = provider or make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
        async with _governor(campaign, limiter, endpoint) as governor:
            return await run_campaign(
                campaign,
                rd,
                provider=provider,
                run_id=doc["run_id"],
                transport=transport,
                on_progress=on_progress,
                stop=stop,
                total_hint=total_hint,
                force=force,
                governor=governor,
                fence=fence,
            )


async def resume_run(
    run_dir: Path,
    *,
    resend_unknown: bool = False,
    force: bool = False,
    endpoint: str | None = None,
    provider: Provider | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: anyio.Event | None = None,
    total_hint: int | None = None,
    limiter: str | None = None,
    governor: Governor | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` with its pinned campaign.

    Skips every settled recipient, retries deferred ones, and re-sends unknown
    ones only with ``resend_unknown``. Refuses a changed source unless ``force``.
    ``limiter``: as for :func:`start_run`; ``governor``: the limiter a shard of a run shares
    (see ``run_campaign``), used instead.
    """
    rd = RunDir(run_dir)
    _not_sharded(rd)  # a missing or foreign directory: refused before a lock file is put in it
    with rd.lock("sluice resume"):
        campaign, doc = pinned_campaign(rd)
        fingerprint = await _checked_source(campaign, full=False)
        if campaign.source.kind in DB_KINDS:
            total_hint = _rows(fingerprint, total_hint)
        _pin_source(campaign, rd, doc, fingerprint, force=force)
        provider = provider or make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
        async with _governor(campaign, None if governor else limiter, endpoint) as shared:
            return await run_campaign(
                campaign,
                rd,
                provider=provider,
                run_id=doc["run_id"],
                transport=transport,
                resend_unknown=resend_unknown,
                on_progress=on_progress,
                stop=stop,
                total_hint=total_hint,
                force=force,
                governor=governor or shared,
            )


@asynccontextmanager
async def _governor(
    campaign: Campaign, limiter: str | None, endpoint: str | None
) -> AsyncIterator[Governor | None]:
    """A governor on the shared lease limiter at ``limiter``; None: the run's own."""
    if limiter is None:
        yield None
        return
    async with leased_governor(campaign, limiter, endpoint) as governor:
        yield governor


@asynccontextmanager
async def leased_governor(
    campaign: Campaign, limiter: str, endpoint: str | None, *, recipients_share: float = 1.0
) -> AsyncIterator[Governor]:
    """A governor taking a lease from the limiter at ``limiter`` for every request, so that every
    run (or shard) using it shares the account's requests/s. Recipients per second are not
    leased: this process keeps ``recipients_share`` of them."""
    from pipeline.app.account import limiter_account
    from pipeline.scale.lease import LeasedGovernor, connect_limiter

    limits = campaign.limits
    rps = limits.recipients_per_second
    account = limiter_account(campaign, endpoint=endpoint)
    async with connect_limiter(
        limiter, limit=max(1, int(limits.requests_per_second)), account_key=account
    ) as lim:
        governor = LeasedGovernor(
            lim,
            target=limits.requests_per_second,
            recipients_rate=rps * recipients_share if rps is not None else None,
        )
        try:
            yield governor
        finally:
            log.info("lease_counts", **governor.counts)  # tokens leased, used, dropped unused


def _not_sharded(rd: RunDir) -> dict[str, Any]:
    """run.json of a run that is not sharded (a sharded one's parent has no ledger of its own)."""
    doc = rd.load()
    count = shard_count(doc)
    if count is not None:
        raise RunDirError(
            f"{rd.path} is a run in {count} shards: `sluice resume {rd.path}` resumes them all, "
            f"`sluice resume {rd.path}/shards/I-of-{count}` one of them"
        )
    return doc


def _pin_source(
    campaign: Campaign, rd: RunDir, doc: dict[str, Any], fingerprint: dict[str, Any], *, force: bool
) -> None:
    """Check the source against the one pinned in run.json; a run going on with a grown source
    (``force``) is pinned to it anew."""
    if _check_same_source(campaign, doc["source"], fingerprint, force=force, run_dir=rd.path):
        doc["source"] = fingerprint
        rd.save(doc)


def _rows(fingerprint: dict[str, Any], default: int | None) -> int | None:
    rows = fingerprint.get("rows")
    return rows if isinstance(rows, int) else default


def run_status(run_dir: Path) -> dict[str, Any]:
    """Counts by status for a run directory, read from its ledger (see ``sluice status``)."""
    from pipeline.ops.summary import status_counts

    rd = RunDir(run_dir)
    rd.load(strict=False)
    return status_counts(replay(rd.ledger))
