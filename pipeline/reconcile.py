"""Reconcile: settle ``unknown`` recipients through the provider's status API.

For each unknown row: the ``OutId`` and time of its last intent come from the
ledger, its number from re-reading the source. Then, per provider:

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import orjson
import structlog

from pipeline.account import make_provider, protocol_of
from pipeline.admit import recipients
from pipeline.api import pinned_campaign
from pipeline.errors import CampaignError
from pipeline.ledger import LedgerWriter, Status, replay
from pipeline.limit import RateGovernor
from pipeline.rundir import RunDir
from pipeline.transport import HttpTransport
from providers.aliyun import AliyunSms, CredentialsError, aliyun_phone
from providers.aliyun_card import AliyunCardSms, parse_card_details
from providers.aliyun_query import beijing_date, parse_query
from providers.base import Message, Provider
from providers.nxcloud import NxcloudSms, parse_record
from providers.submail import SubmailError, SubmailSms, parse_log

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


@dataclass(frozen=True, slots=True)
class _Unknown:
    row: int
    key: str
    phone: str
    out_id: str
    sent_at: float


def _unknown_rows(ledger: Path) -> dict[int, tuple[str, float]]:
    """Row → (OutId, time) of the last intent of every row now unknown or in flight."""
    state = replay(ledger)
    wanted = set(state.status.rows_with(Status.UNKNOWN, Status.INFLIGHT))
    out: dict[int, tuple[str, float]] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"i":'):
                obj = orjson.loads(line)
                for r in obj["r"]:
                    if r in wanted:
                        out[r] = (obj["o"], obj.get("t", 0.0))
    return out


async def reconcile_run(
    run_dir: Path,
    *,
    endpoint: str | None = None,
    queries_per_second: float | None = None,
    concurrency: int = 8,
    settle_after: float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> ReconcileResult:
    """Query the provider for every unknown recipient of ``run_dir`` and settle what it can.

    ``queries_per_second`` defaults to 50, and to one a minute for SUBMAIL's ``sms/log``.
    """
    rd = RunDir(run_dir)
    rd.load()
    with rd.lock("sluice reconcile"):
        return await _reconcile(rd, endpoint, queries_per_second, concurrency, settle_after, transport, clock)


async def _reconcile(
    rd: RunDir,
    endpoint: str | None,
    queries_per_second: float | None,
    concurrency: int,
    settle_after: float,
    transport: httpx.AsyncBaseTransport | None,
    clock: Callable[[], float],
) -> ReconcileResult:
    campaign, doc = pinned_campaign(rd)
    rd.check_ledger(doc, force=False)
    provider = make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
    protocol = protocol_of(campaign)
    if isinstance(provider, NxcloudSms):
        try:  # the record query authenticates with the app's own secret
            provider.record_query_request("probe-0000000000", "20260101")
        except CredentialsError as exc:
            raise CampaignError("provider.kind", f"nxcloud reconciliation needs {exc}") from None
    intents = _unknown_rows(rd.ledger)
    result = ReconcileResult()
    if not intents:
        return result
    todo: list[_Unknown] = []
    async for row, key, phone in recipients(campaign, intents):
        out_id, t = intents[row]
        todo.append(_Unknown(row, key, phone, out_id, t))
    rate = queries_per_second or (1 / 60 if protocol == "submail" else 50.0)
    governor = RateGovernor(rate, min_rate=rate)
    transport = transport or HttpTransport(max_connections=concurrency)
    timeout = httpx.Timeout(campaign.provider.timeout).as_dict()
    settled: list[tuple[int, str, str, str]] = []

    async def fetch(request: httpx.Request) -> httpx.Response:
        await governor.acquire()
        request.extensions["timeout"] = timeout
        response = await transport.handle_async_request(request)
        await response.aread()
        return response

    def record(item: _Unknown, verdict: str) -> None:
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

    async with transport:
        if isinstance(provider, SubmailSms):
            await _submail(provider, todo, fetch, record)
        else:
            lookup = (
                _aliyun
                if isinstance(provider, AliyunSms)
                else _card
                if isinstance(provider, AliyunCardSms)
                else _nxcloud
            )
            send, recv = anyio.create_memory_object_stream[_Unknown](concurrency)

            async def worker(stream: anyio.abc.ObjectReceiveStream[_Unknown]) -> None:
                async with stream:
                    async for item in stream:
                        try:
                            verdict = await lookup(provider, item, fetch)
                        except httpx.TransportError as exc:
                            verdict = f"error:{type(exc).__name__}"
                        record(item, verdict)

            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker, recv.clone())
                recv.close()
                async with send:
                    for item in todo:
                        await send.send(item)
    writer = LedgerWriter(rd.ledger, keyed=campaign.source.key is not None, checkpoint=rd.record_ledger_bytes)
    try:
        writer.settle(settled)
    finally:
        writer.close()
    log.info("reconciled", **{k: v for k, v in vars(result).items() if k != "query_errors"})
    return result


Fetch = Callable[[httpx.Request], Awaitable[httpx.Response]]


async def _aliyun(provider: Provider, item: _Unknown, fetch: Fetch) -> str:
    """'sent' | 'failed:<code>' | 'missing' | 'error:<code>'"""
    assert isinstance(provider, AliyunSms)
    page = 1
    while True:
        response = await fetch(
            provider.details_request(aliyun_phone(item.phone), beijing_date(item.sent_at), page)
        )
        code, total, records = parse_query(response)
        if code.startswith("Throttling"):
            continue
        if code != "OK":
            return f"error:{code}"
        for rec in records:
            if rec.out_id == item.out_id:
                return f"failed:{rec.err_code or 'SendStatus2'}" if rec.send_status == 2 else "sent"
        if page * 50 >= total:
            return "missing"
        page += 1


async def _card(provider: Provider, item: _Unknown, fetch: Fetch) -> str:
    """GetCardSmsDetails by number and day, matched on the batch's OutId (2 and 4 are failures)."""
    assert isinstance(provider, AliyunCardSms)
    day = beijing_date(item.sent_at)
    page = 1
    while True:
        code, total, records = parse_card_details(
            await fetch(provider.card_details_request(aliyun_phone(item.phone), day, page=page))
        )
        if code.startswith("Throttling"):
            continue
        if code != "OK":
            return f"error:{code}"
        for rec in records:
            if rec.out_id == item.out_id:
                return f"failed:{rec.err_code or 'SendStatus'}" if rec.send_status in (2, 4) else "sent"
        if page * 50 >= total:
            return "missing"
        page += 1


async def _nxcloud(provider: Provider, item: _Unknown, fetch: Fetch) -> str:
    assert isinstance(provider, NxcloudSms)
    message = Message(item.row, item.key, item.phone, {}, "")
    found = parse_record(
        await fetch(provider.record_query_request(provider.message_id(message), beijing_date(item.sent_at)))
    )
    if found.ok:
        return "sent"
    return "missing" if found.code == "0" else f"error:{found.code}"


async def _submail(
    provider: SubmailSms, todo: list[_Unknown], fetch: Fetch, record: Callable[[_Unknown, str], None]
) -> None:
    """Page ``sms/log`` over the window of the unknown sends; a number found there was accepted."""
    if not todo:
        return
    start = int(min(i.sent_at for i in todo)) - 60
    end = int(max(i.sent_at for i in todo)) + 3600
    seen: set[str] = set()
    offset, rows = 0, 50
    try:
        while True:
            page = parse_log(
                await fetch(provider.log_request(start_date=start, end_date=end, rows=rows, offset=offset))
            )
            seen.update(str(r.get("to", ""))[-11:] for r in page)
            if len(page) < rows:
                break
            offset += rows
    except (SubmailError, httpx.TransportError) as exc:
        code = exc.code if isinstance(exc, SubmailError) else type(exc).__name__
        for item in todo:
            record(item, f"error:{code}")
        return
    for item in todo:
        record(item, "sent" if item.phone[-11:] in seen else "missing")
