"""``sluice receipts``: ask the provider what became of sent recipients that have no receipt yet.

For providers or setups without pushes. The queries are reconciliation's, read for delivery
(``ReconcileQuery.delivery`` / ``delivery_sweep`` of the provider's declaration, and its
default pace ``queries_per_second``). Only rows sent at least ``settle_after`` seconds ago
are asked about; a receipt found is appended to ``receipts.jsonl`` (fsynced every
``sync_every`` receipts), so a killed pull loses at most that many answers and the next pull
skips every row that has one. Queries go through a rate limiter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from pipeline.app.account import make_provider, protocol_of, provider_kind
from pipeline.app.api import pinned_campaign
from pipeline.app.rundir import RunDir
from pipeline.errors import CampaignError
from pipeline.ledger import Status, replay
from pipeline.ops.asking import ask_all, last_intents, unsettled_sends
from pipeline.ops.receipts import Journal
from providers.spec import Receipt, UnknownSend

__all__ = ("PullResult", "pull_receipts")

log = structlog.get_logger("sluice.receipts")


@dataclass
class PullResult:
    asked: int = 0
    delivered: int = 0
    undelivered: int = 0
    waiting: int = 0  # the provider has no final word yet (or no record, or the query failed)
    not_yet_settled: int = 0  # sent less than settle_after ago: not asked
    query_errors: dict[str, int] = field(default_factory=dict)


def _wanted(ledger: Path, skip: set[int], cutoff: float) -> tuple[dict[int, tuple[str, float]], int]:
    """Row → (OutId, time) of the last intent of every sent row without a receipt, sent before
    ``cutoff``; and how many such rows were sent after it."""
    out = last_intents(ledger, set(replay(ledger).status.rows_with(Status.SENT)) - skip)
    recent = {r for r, (_, t) in out.items() if t > cutoff}
    return {r: v for r, v in out.items() if r not in recent}, len(recent)


async def pull_receipts(
    run_dir: Path,
    *,
    endpoint: str | None = None,
    queries_per_second: float | None = None,
    concurrency: int = 8,
    settle_after: float = 600.0,
    sync_every: int = 200,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    progress: Callable[[PullResult, int], None] | None = None,
) -> PullResult:
    """Query the status API for every sent row of ``run_dir`` without a receipt; append what it says.

    ``queries_per_second`` defaults to the pace the provider's query declares.
    """
    rd = RunDir(run_dir)
    campaign, doc = pinned_campaign(rd, strict=False)
    provider = make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
    protocol = protocol_of(campaign)
    query = provider_kind(campaign).reconcile
    if query is None or (query.delivery is None and query.delivery_sweep is None):
        raise CampaignError("provider.kind", f"{protocol} has no delivery status query")
    journal = Journal(rd.path)
    result = PullResult()
    try:
        wanted, result.not_yet_settled = _wanted(rd.ledger, journal.seen, clock() - settle_after)
        todo = await unsettled_sends(campaign, wanted)
        rate = queries_per_second or query.queries_per_second
        pending = 0

        def settle(item: UnknownSend, verdict: str, code: str = "") -> None:
            """verdict: delivered | undelivered | waiting | error"""
            nonlocal pending
            result.asked += 1
            if verdict in ("delivered", "undelivered"):
                delivered = verdict == "delivered"
                setattr(result, verdict, getattr(result, verdict) + 1)
                receipt = Receipt(protocol, item.phone, delivered, code or verdict.upper(), None)
                journal.add(receipt, (item.row, item.sent_at), clock())
                pending += 1
                if pending >= sync_every:
                    journal.sync()
                    pending = 0
            else:
                result.waiting += 1
                if verdict == "error":
                    result.query_errors[code] = result.query_errors.get(code, 0) + 1
            if progress is not None and result.asked % 100 == 0:
                progress(result, len(todo))

        await ask_all(
            campaign,
            provider,
            todo,
            rate=rate,
            concurrency=concurrency,
            transport=transport,
            one=query.delivery,
            sweep=query.delivery_sweep,
            failed=lambda exc: ("error", type(exc).__name__),
            answer=lambda item, reply: settle(item, *reply),
        )
        journal.sync()
    finally:
        journal.close()
    if progress is not None:
        progress(result, result.asked)
    log.info("receipts pulled", **{k: v for k, v in vars(result).items() if k != "query_errors"})
    return result
