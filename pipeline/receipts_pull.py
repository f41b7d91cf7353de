"""``sluice receipts``: ask the provider what became of sent recipients that have no receipt yet.

For providers or setups without pushes. The queries are reconciliation's
(:mod:`pipeline.reconcile`): Aliyun ``QuerySendDetails`` (``SendStatus`` 3 delivered, 2 failed),
card ``GetCardSmsDetails`` (3 success; 2, 4 failed), NXCloud's record query (``dr``), SUBMAIL
``sms/log`` (``delivered`` / ``dropped``; one page a minute by default). Only rows sent at least
``settle_after`` seconds ago are asked about; a receipt found is appended to ``receipts.jsonl``
(fsynced every ``sync_every`` receipts), so a killed pull loses at most that many answers and the
next pull skips every row that has one. Queries go through a rate limiter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import orjson
import structlog

from pipeline.account import make_provider, protocol_of
from pipeline.api import pinned_campaign
from pipeline.engine import open_source
from pipeline.ledger import Status, replay
from pipeline.limit import RateGovernor
from pipeline.receipts import Journal, Receipt
from pipeline.reconcile import Fetch, _Unknown, aliyun_record, card_record, nxcloud_record, submail_log
from pipeline.render import normalize_phone
from pipeline.rundir import RunDir
from pipeline.transport import HttpTransport
from providers.aliyun import AliyunSms
from providers.aliyun_card import AliyunCardSms
from providers.base import Provider
from providers.submail import SubmailError, SubmailSms

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
    sent = set(replay(ledger).status.rows_with(Status.SENT)) - skip
    out: dict[int, tuple[str, float]] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"i":'):
                obj = orjson.loads(line)
                for r in obj["r"]:
                    if r in sent:
                        out[r] = (obj["o"], obj.get("t", 0.0))
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

    ``queries_per_second`` defaults to 50, and to one a minute for SUBMAIL's ``sms/log``.
    """
    rd = RunDir(run_dir)
    campaign, doc = pinned_campaign(rd, strict=False)
    provider = make_provider(campaign, run_id=doc["run_id"], endpoint=endpoint)
    protocol = protocol_of(campaign)
    journal = Journal(rd.path)
    result = PullResult()
    try:
        wanted, result.not_yet_settled = _wanted(rd.ledger, journal.seen, clock() - settle_after)
        todo: list[_Unknown] = []
        key_col = campaign.source.key
        async for chunk in open_source(campaign).chunks():
            for row, rec in chunk:
                if row in wanted and not isinstance(rec, str):
                    phone = normalize_phone(
                        str(rec.get(campaign.source.phone, "")), campaign.source.default_country
                    )
                    if phone is not None:
                        key = str(rec.get(key_col, row)) if key_col else str(row)
                        todo.append(_Unknown(row, key, phone, *wanted[row]))
        rate = queries_per_second or (1 / 60 if protocol == "submail" else 50.0)
        governor = RateGovernor(rate, min_rate=rate)
        transport = transport or HttpTransport(max_connections=concurrency)
        timeout = httpx.Timeout(campaign.provider.timeout).as_dict()
        pending = 0

        async def fetch(request: httpx.Request) -> httpx.Response:
            await governor.acquire()
            request.extensions["timeout"] = timeout
            response = await transport.handle_async_request(request)
            await response.aread()
            return response

        def settle(item: _Unknown, verdict: str, code: str = "") -> None:
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

        async with transport:
            if isinstance(provider, SubmailSms):
                await _submail(provider, todo, fetch, settle)
            else:
                send, recv = anyio.create_memory_object_stream[_Unknown](concurrency)

                async def worker(stream: anyio.abc.ObjectReceiveStream[_Unknown]) -> None:
                    async with stream:
                        async for item in stream:
                            try:
                                verdict, code = await _ask(provider, item, fetch)
                            except httpx.TransportError as exc:
                                verdict, code = "error", type(exc).__name__
                            settle(item, verdict, code)

                async with anyio.create_task_group() as tg:
                    for _ in range(concurrency):
                        tg.start_soon(worker, recv.clone())
                    recv.close()
                    async with send:
                        for item in todo:
                            await send.send(item)
        journal.sync()
    finally:
        journal.close()
    if progress is not None:
        progress(result, result.asked)
    log.info("receipts pulled", **{k: v for k, v in vars(result).items() if k != "query_errors"})
    return result


async def _ask(provider: Provider, item: _Unknown, fetch: Fetch) -> tuple[str, str]:
    if isinstance(provider, AliyunSms | AliyunCardSms):
        find = aliyun_record if isinstance(provider, AliyunSms) else card_record
        rec = await find(provider, item, fetch)
        if isinstance(rec, str):
            return ("error", rec[6:]) if rec.startswith("error:") else ("waiting", "")
        if rec.send_status == 3:
            return "delivered", rec.err_code or "DELIVERED"
        if rec.send_status in (2, 4):
            return "undelivered", rec.err_code or f"SendStatus{rec.send_status}"
        return "waiting", ""
    found = await nxcloud_record(provider, item, fetch)
    if not found.ok or found.row is None:
        return ("waiting", "") if found.code == "0" else ("error", found.code)
    dr = str(found.row.get("dr") or "")
    if dr == "DELIVRD":
        return "delivered", dr
    return ("undelivered", dr) if dr else ("waiting", "")


async def _submail(
    provider: SubmailSms,
    todo: list[_Unknown],
    fetch: Fetch,
    settle: Callable[[_Unknown, str, str], None],
) -> None:
    """One ``sms/log`` sweep over the window of ``todo``; matched by number."""
    if not todo:
        return
    try:
        rows = await submail_log(provider, todo, fetch)
    except (SubmailError, httpx.TransportError) as exc:
        code = exc.code if isinstance(exc, SubmailError) else type(exc).__name__
        for item in todo:
            settle(item, "error", str(code))
        return
    by_number: dict[str, dict[str, object]] = {}
    for r in rows:
        if r.get("status") in ("delivered", "dropped"):
            by_number[str(r.get("to", ""))[-11:]] = r
    for item in todo:
        found = by_number.get(item.phone[-11:])
        if found is None:
            settle(item, "waiting", "")
        elif found["status"] == "delivered":
            settle(item, "delivered", str(found.get("report_state") or "DELIVRD"))
        else:
            reason = found.get("report_state") or found.get("dropped_reason") or "dropped"
            settle(item, "undelivered", str(reason))
