"""Reconcile: settle ``unknown`` recipients through the provider's status API.

For each unknown row: the ``OutId`` and time of its last intent come from the
ledger, its number from re-reading the source. Then the provider's declared status
query (``SPEC.reconcile``, see providers/registry.py):

* Aliyun: ``QuerySendDetails`` (number + Beijing date) for a record with the batch's ``OutId``;
* Aliyun card: ``GetCardSmsDetails`` the same way (``SendStatus`` 2 or 4 is a failure);
* NXCloud: the record query for the recipient's ``sysMessageId`` (derived from its key);
* SUBMAIL: ``sms/log`` pages over the time window of the unknown sends (SUBMAIL answers
  it once a minute, so the default pace is one page a minute), matched by number.

What the provider says:

* found, and failed (Aliyun ``SendStatus`` 2) → ``failed`` with the provider's code;
* found otherwise → ``sent`` (the provider accepted it; the receipt may still come);
* not found and older than ``settle_after`` (the provider's reporting delay) →
  ``deferred``: provably not accepted, so the next ``sluice resume`` sends it;
* not found but recent, or the query failed → still ``unknown``.

Queries go through the same rate limiter as sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from pipeline.app.account import make_provider, provider_kind
from pipeline.app.api import pinned_campaign
from pipeline.app.rundir import RunDir
from pipeline.errors import CampaignError
from pipeline.ledger import LedgerWriter, Status, replay
from pipeline.ops.asking import ask_all, last_intents, unsettled_sends
from providers.base import CredentialsError
from providers.spec import UnknownSend

__all__ = ("ReconcileResult", "reconcile_run")

log = structlog.get_logger("sluice.reconcile")


@dataclass
class ReconcileResult:
    checked: int = 0
    sent: int = 0
    failed: int = 0
    resendable: int = 0
    still_unknown: int = 0
    query_errors: dict[str, int] = field(default_factory=dict)


def _unknown_rows(ledger: Path) -> dict[int, tuple[str, float]]:
    """Row → (OutId, time) of the last intent of every row now unknown or in flight."""
    return last_intents(ledger, set(replay(ledger).status.rows_with(Status.UNKNOWN, Status.INFLIGHT)))


async def reconcile_run(
    run_dir: Path,
    *,
    endpoint: str | None = None,
    queries_per_second: float | None = None,
    concurrency: int = 8,
    settle_after: float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> ReconcileResult:
    """Query the provider for every unknown recipient of ``run_dir`` and settle what it can.

    ``queries_per_second`` defaults to 50, and to one a minute for SUBMAIL's ``sms/log``.
    ``on_progress(checked, to_check, queries_per_second)`` is called before the first query and
    after each recipient is checked.
    """
    rd = RunDir(run_dir)
    rd.load()
    with rd.lock("sluice reconcile"):
        return await _reconcile(
            rd, endpoint, queries_per_second, concurrency, settle_after, transport, clock, on_progress
        )


async def _reconcile(
    rd: RunDir,
    endpoint: str | None,
    queries_per_second: float | None,
    concurrency: int,
    settle_after: float,
    transport: httpx.AsyncBaseTransport | None,
    clock: Callable[[], float],
    on_progress: Callable[[int, int, float], None] | None = None,
) -> ReconcileResult:
    campaign, doc = pinned_campaign(rd)
    rd.check_ledger(doc, force=False)
    provider = make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
    spec = provider_kind(campaign)
    query = spec.reconcile
    if query is None:
        raise CampaignError("provider.kind", f"{spec.kind} has no status query to reconcile with")
    if query.preflight is not None:
        try:  # e.g. a query that needs a credential sending does not
            query.preflight(provider)
        except CredentialsError as exc:
            raise CampaignError("provider.kind", f"{spec.kind} reconciliation needs {exc}") from None
    intents = _unknown_rows(rd.ledger)
    result = ReconcileResult()
    if not intents:
        return result
    todo = await unsettled_sends(campaign, intents)
    rate = queries_per_second or query.queries_per_second
    log.info("reconcile_started", unknown=len(todo), queries_per_second=rate)
    progress = on_progress or (lambda checked, total, qps: None)
    progress(0, len(todo), rate)
    settled: list[tuple[int, str, str, str]] = []

    def record(item: UnknownSend, verdict: str) -> None:
        result.checked += 1
        if verdict == "sent":
            result.sent += 1
            settled.append((item.row, item.key, "sent", "Reconciled"))
        elif verdict.startswith("failed:"):
            result.failed += 1
            settled.append((item.row, item.key, "failed", verdict[7:]))
        elif verdict == "missing" and clock() - item.sent_at >= settle_after:
            result.resendable += 1
            settled.append((item.row, item.key, "deferred", "NotFoundAtProvider"))
        else:
            result.still_unknown += 1
            if verdict.startswith("error:"):
                result.query_errors[verdict[6:]] = result.query_errors.get(verdict[6:], 0) + 1
        progress(result.checked, len(todo), rate)

    await ask_all(
        campaign,
        provider,
        todo,
        rate=rate,
        concurrency=concurrency,
        transport=transport,
        one=query.lookup,
        sweep=query.sweep,
        failed=lambda exc: f"error:{type(exc).__name__}",
        answer=record,
    )
    writer = LedgerWriter(rd.ledger, keyed=campaign.source.key is not None, checkpoint=rd.record_ledger_bytes)
    try:
        writer.settle(settled)
    finally:
        writer.close()
    log.info("reconciled", **{k: v for k, v in vars(result).items() if k != "query_errors"})
    return result
