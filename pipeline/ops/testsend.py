"""``sluice run CAMPAIGN --test-to PHONE[,PHONE…]``: the campaign's first message, rendered from
its first sendable row, sent to the given numbers only, through the real provider, in a run
directory of its own (so the campaign's run is untouched and a test is never counted in it).

The test is an ordinary run of a derived campaign: its source is a small JSONL file in the test
run directory holding the first row once per number, with the phone column replaced.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import orjson

from pipeline.admit import make_renderer, open_source
from pipeline.app.campaign import Campaign
from pipeline.errors import CampaignError, SourceError
from pipeline.ledger import final_states
from pipeline.render import Rejection, normalize_phone

__all__ = ("answers", "campaign_for_numbers", "first_sendable_row", "parse_numbers", "run_dir_for_test")


def parse_numbers(text: str, default_country: str) -> list[str]:
    """``--test-to``'s comma-separated numbers, each checked as the run checks a phone."""
    numbers = [n.strip() for n in text.split(",") if n.strip()]
    if not numbers:
        raise CampaignError("--test-to", "give one or more phone numbers, comma-separated")
    for n in numbers:
        if normalize_phone(n, default_country) is None:
            raise CampaignError("--test-to", f"{n!r} is not a phone number")
    if len(numbers) > 100:
        raise CampaignError("--test-to", "is for a few numbers (at most 100)")
    return numbers


async def first_sendable_row(campaign: Campaign) -> dict[str, object]:
    """The first row of the source that renders to a message (as the run renders it)."""
    renderer = make_renderer(campaign)
    chunks = open_source(campaign).chunks()
    try:
        async for chunk in chunks:
            for row, rec in chunk:
                if not isinstance(rec, str) and not isinstance(
                    renderer.render(row, str(row), rec), Rejection
                ):
                    return dict(rec)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    raise SourceError("no row of the source renders to a message: see `sluice run CAMPAIGN --dry-run`")


def campaign_for_numbers(
    campaign: Campaign, row: dict[str, object], numbers: list[str], run_dir: Path
) -> Campaign:
    """The campaign sending ``row``'s message to ``numbers``, its source written into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir / "test-recipients.jsonl"
    spec = campaign.source
    with path.open("wb") as f:
        for i, number in enumerate(numbers, 1):
            rec = {k: "" if v is None else str(v) for k, v in row.items()}
            rec[spec.phone] = number
            if spec.key:
                rec[spec.key] = f"test-{i}"
            f.write(orjson.dumps(rec) + b"\n")
    source = dataclasses.replace(
        spec,
        kind="jsonl",
        path=str(path),
        encoding="utf-8",
        table=None,
        query=None,
        dsn_env=None,
        snapshot=False,
        row_number="rank",
        shard=None,
        key_from=None,
        key_to=None,
        suppress=None,  # the operator asked for these numbers
        dedupe_phone=False,
    )
    run = dataclasses.replace(campaign.run, dir=str(run_dir))
    limits = dataclasses.replace(campaign.limits, max_reject_ratio=1.0)  # the answer is shown per number
    return dataclasses.replace(campaign, source=source, run=run, limits=limits)


def run_dir_for_test(base: Path) -> Path:
    """``<run dir>-test-<time>`` beside the campaign's own run directory."""
    return base.with_name(f"{base.name}-test-{time.strftime('%Y%m%d-%H%M%S')}")


def answers(run_dir: Path, numbers: list[str]) -> list[dict[str, object]]:
    """Each number with its outcome: status, the provider's code and message, its id for the send."""
    by_row = {f.row: f for f in final_states(run_dir / "ledger.jsonl")}
    out: list[dict[str, object]] = []
    for row, number in enumerate(numbers, 1):
        final = by_row.get(row)
        out.append(
            {
                "phone": number,
                "status": final.status if final else "not sent",
                "code": final.code if final else None,
                "message": final.reason if final else None,
                "provider_id": final.provider_id if final else None,
            }
        )
    return out
