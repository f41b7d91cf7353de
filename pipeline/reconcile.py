"""Reconcile: settle ``unknown`` recipients through the provider's status API.

For each unknown row: the ``OutId`` and time of its last intent come from the
ledger, its number from re-reading the source. Aliyun ``QuerySendDetails``
(number + date) then says whether a send with that ``OutId`` exists:

* found, ``SendStatus`` 2 → ``failed`` (with the provider's ``ErrCode``);
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

import anyio
import httpx
import orjson
import structlog

from pipeline.api import pinned_campaign
from pipeline.engine import open_source
from pipeline.ledger import LedgerWriter, Status, replay
from pipeline.limit import RateGovernor
from pipeline.render import normalize_phone
from pipeline.rundir import RunDir
from pipeline.transport import AiohttpTransport
from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials, aliyun_phone
from providers.aliyun_query import beijing_date, parse_query, query_request

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
    wanted = {r for r, s in enumerate(state.status) if s in (Status.UNKNOWN, Status.INFLIGHT)}
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
    credentials: AliyunCredentials | None = None,
    queries_per_second: float = 50.0,
    concurrency: int = 8,
    settle_after: float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> ReconcileResult:
    """Query the provider for every unknown recipient of ``run_dir`` and settle what it can."""
    rd = RunDir(run_dir)
    campaign, _ = pinned_campaign(rd)
    if credentials is None:
        try:
            credentials = AliyunCredentials.from_env()
        except Exception:
            if campaign.provider.kind != "simulator":
                raise
            credentials = TEST_CREDENTIALS
    url = endpoint or campaign.provider.endpoint or "https://dysmsapi.aliyuncs.com"
    intents = _unknown_rows(rd.ledger)
    result = ReconcileResult()
    if not intents:
        return result
    todo: list[_Unknown] = []
    key_col = campaign.source.key
    async for chunk in open_source(campaign).chunks():
        for row, rec in chunk:
            if row in intents and not isinstance(rec, str):
                raw = str(rec.get(campaign.source.phone, ""))
                phone = normalize_phone(raw, campaign.source.default_country)
                if phone is None:
                    continue
                key = str(rec.get(key_col, row)) if key_col else str(row)
                out_id, t = intents[row]
                todo.append(_Unknown(row, key, aliyun_phone(phone), out_id, t))
    governor = RateGovernor(queries_per_second)
    transport = transport or AiohttpTransport(max_connections=concurrency)
    timeout = httpx.Timeout(campaign.provider.timeout).as_dict()
    settled: list[tuple[int, str, str, str]] = []

    async def query(item: _Unknown) -> str:
        """'sent' | 'failed:<code>' | 'missing' | 'error:<code>'"""
        page = 1
        while True:
            await governor.acquire()
            request = query_request(
                credentials, item.phone, beijing_date(item.sent_at), page=page, endpoint=url, clock=clock
            )
            request.extensions["timeout"] = timeout
            try:
                response = await transport.handle_async_request(request)
                await response.aread()
            except httpx.TransportError as exc:
                return f"error:{type(exc).__name__}"
            code, total, records = parse_query(response)
            if code.startswith("Throttling"):
                governor.throttled(None)
                continue
            if code != "OK":
                return f"error:{code}"
            for rec in records:
                if rec.out_id == item.out_id:
                    return f"failed:{rec.err_code or 'SendStatus2'}" if rec.send_status == 2 else "sent"
            if page * 50 >= total:
                return "missing"
            page += 1

    send, recv = anyio.create_memory_object_stream[_Unknown](concurrency)

    async def worker(stream: anyio.abc.ObjectReceiveStream[_Unknown]) -> None:
        async with stream:
            async for item in stream:
                verdict = await query(item)
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

    async with transport, anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker, recv.clone())
        recv.close()
        async with send:
            for item in todo:
                await send.send(item)
    writer = LedgerWriter(rd.ledger, keyed=key_col is not None)
    try:
        writer.settle(settled)
    finally:
        writer.close()
    log.info("reconciled", **{k: v for k, v in vars(result).items() if k != "query_errors"})
    return result
