"""Aliyun ``QuerySendDetails``: look up what happened to one number's sends on one day. Sans-I/O.

Used by reconciliation: a batch whose outcome is unknown carried a unique ``OutId``;
a record for the number with that ``OutId`` proves the provider accepted it.
``SendStatus``: 1 waiting for a receipt, 2 failed, 3 delivered (PROTOCOLS.md §1.9;
the enumeration is UNVERIFIED there, so only "a record exists" is relied on for
"sent", and 2 for "failed").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
import orjson

from providers.aliyun_sign import (
    API_VERSION,
    DEFAULT_ENDPOINT,
    AliyunCredentials,
    percent_encode,
    v3_sign_headers,
)

__all__ = ("SendRecord", "beijing_date", "delivery_of", "find_record", "parse_query", "query_request")

BEIJING = 8 * 3600


def beijing_date(t: float) -> str:
    """``yyyyMMdd`` in UTC+8, the calendar Aliyun files sends under."""
    return time.strftime("%Y%m%d", time.gmtime(t + BEIJING))


@dataclass(frozen=True, slots=True)
class SendRecord:
    out_id: str
    send_status: int
    err_code: str


def query_request(
    credentials: AliyunCredentials,
    phone: str,
    send_date: str,
    *,
    page: int = 1,
    page_size: int = 50,
    endpoint: str = DEFAULT_ENDPOINT,
    clock: Callable[[], float] = time.time,
) -> httpx.Request:
    """A V3-signed ``QuerySendDetails`` request (parameters in the query)."""
    url = httpx.URL(endpoint)
    host = url.netloc.decode("ascii")
    query = [
        ("CurrentPage", str(page)),
        ("PageSize", str(page_size)),
        ("PhoneNumber", phone),
        ("SendDate", send_date),
    ]
    headers = v3_sign_headers(
        "POST",
        "/",
        query,
        {
            "host": host,
            "x-acs-action": "QuerySendDetails",
            "x-acs-version": API_VERSION,
            "x-acs-date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock())),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "accept": "application/json",
        },
        b"",
        credentials,
    )
    qs = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in query)
    return httpx.Request("POST", httpx.URL(f"{url.scheme}://{host}/?{qs}"), headers=headers)


def parse_query(response: httpx.Response) -> tuple[str, int, list[SendRecord]]:
    """(code, total count, records). Never raises on a bad body: the code says what happened."""
    try:
        data: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"HTTP{response.status_code}", 0, []
    if not isinstance(data, dict):
        return f"HTTP{response.status_code}", 0, []
    code = str(data.get("Code", f"HTTP{response.status_code}"))
    dtos = (data.get("SmsSendDetailDTOs") or {}).get("SmsSendDetailDTO") or []
    records = [
        SendRecord(str(d.get("OutId") or ""), int(d.get("SendStatus") or 0), str(d.get("ErrCode") or ""))
        for d in dtos
        if isinstance(d, dict)
    ]
    try:
        total = int(data.get("TotalCount") or len(records))
    except (TypeError, ValueError):
        total = len(records)
    return code, total, records


class _Record(Protocol):
    @property
    def send_status(self) -> int: ...
    @property
    def err_code(self) -> str: ...


def delivery_of(rec: _Record | str, *, failed: tuple[int, ...]) -> tuple[str, str]:
    """A send record (or 'missing' | 'error:<code>') read for delivery: (delivered |
    undelivered | waiting | error, code); ``failed`` are the ``SendStatus`` values of a failure."""
    if isinstance(rec, str):
        return ("error", rec[6:]) if rec.startswith("error:") else ("waiting", "")
    if rec.send_status == 3:
        return "delivered", rec.err_code or "DELIVERED"
    if rec.send_status in failed:
        return "undelivered", rec.err_code or f"SendStatus{rec.send_status}"
    return "waiting", ""


class _OutIdRecord(Protocol):
    @property
    def out_id(self) -> str: ...


R = TypeVar("R", bound=_OutIdRecord)
_MAX_THROTTLES = 50


async def find_record(page: Callable[[int], Awaitable[tuple[str, int, list[R]]]], out_id: str) -> R | str:
    """Page a status query (``page(n)`` → code, total, records; 50 a page) for the record of the
    batch ``out_id``: the record, or 'missing' | 'error:<code>'. A throttled page is asked again,
    a bounded number of times (the caller's fetch paces the queries)."""
    n, throttles = 1, 0
    while True:
        code, total, records = await page(n)
        if code.startswith("Throttling"):
            throttles += 1
            if throttles >= _MAX_THROTTLES:
                return f"error:{code}"
            continue
        if code != "OK":
            return f"error:{code}"
        for rec in records:
            if rec.out_id == out_id:
                return rec
        if n * 50 >= total:
            return "missing"
        n += 1
