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

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline.campaign import Campaign, parse_campaign
from pipeline.engine import Progress, RunResult, open_source, run_campaign
from pipeline.errors import CampaignError, RunDirError, SourceError
from pipeline.ledger import replay
from pipeline.rundir import RunDir
from providers.base import Provider

__all__ = (
    "check_source",
    "make_provider",
    "pinned_campaign",
    "resume_run",
    "run_status",
    "start_run",
)


def make_provider(
    campaign: Campaign,
    *,
    endpoint: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Provider:
    """Build the campaign's provider; credentials come from ``environ`` only."""
    from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials, AliyunSms, CredentialsError

    spec = campaign.provider
    url = endpoint or spec.endpoint
    if spec.kind == "simulator":
        has_env = environ.get("ALIYUN_ACCESS_KEY_ID") and environ.get("ALIYUN_ACCESS_KEY_SECRET")
        creds = AliyunCredentials.from_env(environ) if has_env else TEST_CREDENTIALS
        if url is None:
            raise CampaignError(
                "provider.endpoint", "a simulator campaign run from the API needs an endpoint"
            )
    else:
        try:
            creds = AliyunCredentials.from_env(environ)
        except CredentialsError as exc:
            raise CampaignError("provider.kind", f"{spec.kind} needs credentials: {exc}") from None
        url = url or "https://dysmsapi.aliyuncs.com"
    return AliyunSms(
        credentials=creds,
        template_code=campaign.message.template_code,
        endpoint=url,
        signature="v2" if spec.signature == "v2" else "v3",
        region_id=spec.region_id,
    )


def check_source(campaign: Campaign) -> dict[str, Any]:
    """Open the source and check the columns the campaign reads; return its fingerprint.

    Raises CampaignError naming a column a CSV header lacks, SourceError when
    the source cannot be read. Nothing is sent.
    """
    source = open_source(campaign)
    fingerprint = source.fingerprint()
    header = source.columns()
    if header is not None:
        sign, params = campaign.templates()
        needed = {"source.phone": [campaign.source.phone], "message.sign_name": list(sign.columns)}
        if campaign.source.key:
            needed["source.key"] = [campaign.source.key]
        for name, t in params.items():
            needed[f"message.params.{name}"] = list(t.columns)
        for field_name, cols in needed.items():
            for col in cols:
                if col not in header:
                    raise CampaignError(field_name, f"column {col!r} is not in the CSV header {header}")
    return fingerprint


def pinned_campaign(run_dir: RunDir) -> tuple[Campaign, dict[str, Any]]:
    """The campaign a run directory was created with."""
    doc = run_dir.load()
    data = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in doc["campaign"].items()
    }
    try:
        campaign = parse_campaign(data, run_dir.path)
    except CampaignError as exc:
        raise RunDirError(f"{run_dir.run_json} holds an invalid campaign: {exc}") from None
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
) -> RunResult:
    """Start ``campaign`` in ``run_dir``, or continue it there if it was started already.

    A run directory holding a different campaign or source is refused unless
    ``force``.
    """
    fingerprint = check_source(campaign)
    rd = RunDir(run_dir)
    if rd.exists():
        doc = rd.load()
        if not force and doc["campaign_hash"] != campaign.digest():
            raise RunDirError(
                f"{run_dir} holds a run of a different campaign; use another --run-dir "
                "(or --force to continue it with this one)"
            )
        if not force and doc["source"] != fingerprint:
            raise RunDirError(f"the source changed since {run_dir} was started (--force to accept)")
    else:
        doc = rd.create(campaign.to_dict(), campaign.digest(), fingerprint)
    return await run_campaign(
        campaign,
        rd,
        provider=provider or make_provider(campaign, endpoint=endpoint),
        run_id=doc["run_id"],
        transport=transport,
        on_progress=on_progress,
        stop=stop,
        total_hint=total_hint,
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
) -> RunResult:
    """Continue the run in ``run_dir`` with its pinned campaign.

    Skips every settled recipient, retries deferred ones, and re-sends unknown
    ones only with ``resend_unknown``. Refuses a changed source unless ``force``.
    """
    rd = RunDir(run_dir)
    campaign, doc = pinned_campaign(rd)
    try:
        fingerprint = open_source(campaign).fingerprint()
    except SourceError:
        raise
    if not force and fingerprint != doc["source"]:
        raise RunDirError(
            f"the source {campaign.source.path} changed since the run started "
            "(size or content); --force resumes anyway"
        )
    return await run_campaign(
        campaign,
        rd,
        provider=provider or make_provider(campaign, endpoint=endpoint),
        run_id=doc["run_id"],
        transport=transport,
        resend_unknown=resend_unknown,
        on_progress=on_progress,
        stop=stop,
        total_hint=total_hint,
    )


def run_status(run_dir: Path) -> dict[str, Any]:
    """Counts by status for a run directory, read from its ledger."""
    rd = RunDir(run_dir)
    rd.load()
    state = replay(rd.ledger)
    counts = state.counts()
    inflight = counts.pop("inflight")
    out: dict[str, Any] = {
        "sent": counts["sent"],
        "failed": counts["failed"],
        "rejected": counts["rejected"],
        # A row in flight in a stopped run is unknown (resume writes it so).
        "unknown": counts["unknown"] + inflight,
        "deferred": counts["deferred"],
        "pending": counts["pending"],
        "source_rows": state.eof_rows,
    }
    out["complete"] = state.eof_rows is not None and out["pending"] == 0 and out["deferred"] == 0
    return out
