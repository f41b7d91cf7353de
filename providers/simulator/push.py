"""Delivery receipts pushed to a listener, each in its provider's format (``--receipts-to``).

Every accepted recipient gets a receipt after a delay drawn from an exponential distribution
(mean ``delay_ms``, at least ``min_delay_ms``), so receipts arrive out of order; a share
``out_of_order_rate`` is held back a further ``10 × delay_ms``. A share ``undelivered_rate``
is undelivered (decided by :func:`undelivered`, which the pull APIs use too, so push and pull
agree), ``duplicate_rate`` is pushed twice. A push that is not acknowledged (a non-2xx answer,
a wrong body, a broken connection) is retried after each of ``retry_s`` (Aliyun: 1, 5, 10 min,
PROTOCOLS.md §1.9; the default here is seconds, for tests), then dropped. NXCloud pushes each
DR once (§3.6): it gets ``nxcloud_retries`` (0 by default, as the provider).

Formats: Aliyun ``SmsReport`` (JSON arrays of up to 100), SUBMAIL SUBHOOK (one form event,
signed md5(token + key)), NXCloud DR (one form body).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ("PushConfig", "ReceiptPusher", "identity_of", "undelivered")

BEIJING = 8 * 3600
ALIYUN_BATCH = 100


def undelivered(identity: str, rate: float) -> bool:
    """Whether the receipt of ``identity`` (Aliyun: out_id|last 11 digits; SUBMAIL: send_id;
    NXCloud: sysMessageId) says undelivered: a fixed hash draw, the same for push and pull."""
    if rate <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


def identity_of(record: dict[str, Any]) -> tuple[str, str]:
    """(protocol, identity) of a line of the simulator's receipts file."""
    provider = str(record.get("provider", "aliyun"))
    if provider == "submail":
        return provider, str(record.get("send_id", ""))
    if provider == "nxcloud":
        return provider, str(record.get("out_id", ""))
    return provider, f"{record.get('out_id', '')}|{str(record.get('phone', ''))[-11:]}"


def _bj(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t + BEIJING))


@dataclass
class PushConfig:
    url: str  # the listener's base: <url>/aliyun, <url>/submail, <url>/nxcloud
    delay_ms: float = 200.0
    min_delay_ms: float = 0.0
    duplicate_rate: float = 0.0
    out_of_order_rate: float = 0.0
    retry_s: tuple[float, ...] = (1.0, 5.0, 10.0)
    nxcloud_retries: int = 0
    subhook_key: str = "simulator-subhook-key"
    concurrency: int = 16
    seed: int | None = None

    def __post_init__(self) -> None:
        rates = (self.duplicate_rate, self.out_of_order_rate)
        if not all(0 <= r <= 1 for r in rates) or self.delay_ms < 0 or self.min_delay_ms < 0:
            raise ValueError("receipt rates must be in [0, 1] and delays non-negative")


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    protocol: str = field(compare=False)
    identity: str = field(compare=False)
    payload: dict[str, str | bool | int] = field(compare=False)
    attempt: int = field(compare=False, default=0)


class ReceiptPusher:
    """Fed the receipts file's lines as they are written; pushes them from one task."""

    def __init__(
        self, config: PushConfig, clock: Callable[[], float] = time.time, *, undelivered_rate: float = 0.0
    ) -> None:
        self.config = config
        self.undelivered_rate = undelivered_rate
        self._clock = clock
        self._rng = random.Random(None if config.seed is None else f"{config.seed}:push")
        self._heap: list[_Due] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.acked: set[tuple[str, str]] = set()  # (protocol, identity) the listener acknowledged
        self.counts = {
            "scheduled": 0,
            "pushes": 0,
            "acked": 0,
            "failed_pushes": 0,
            "dropped": 0,
            "duplicates": 0,
            "undelivered": 0,
        }

    # -- feeding ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        now = self._clock()
        for line in data.splitlines():
            if line:
                self._schedule(orjson.loads(line), now)
        self._wake.set()

    def _delay(self) -> float:
        c = self.config
        d = c.min_delay_ms + self._rng.expovariate(1 / c.delay_ms) if c.delay_ms else c.min_delay_ms
        if c.out_of_order_rate and self._rng.random() < c.out_of_order_rate:
            d += 10 * c.delay_ms
        return d / 1000

    def _schedule(self, record: dict[str, Any], now: float) -> None:
        protocol, ident = identity_of(record)
        bad = undelivered(ident, self.undelivered_rate)
        self.counts["undelivered"] += bad
        copies = 2 if self.config.duplicate_rate and self._rng.random() < self.config.duplicate_rate else 1
        self.counts["duplicates"] += copies - 1
        self.counts["scheduled"] += 1
        sent = float(record.get("t", now))
        for _ in range(copies):
            at = now + self._delay()
            payload = self._payload(protocol, record, not bad, sent, at)
            self._seq += 1
            heapq.heappush(self._heap, _Due(at, self._seq, protocol, ident, payload))

    def _payload(
        self, protocol: str, r: dict[str, Any], ok: bool, sent: float, at: float
    ) -> dict[str, str | bool | int]:
        if protocol == "submail":
            token = secrets.token_hex(16)
            sig = hashlib.md5((token + self.config.subhook_key).encode()).hexdigest()
            event: dict[str, str | bool | int] = {
                "events": "delivered" if ok else "dropped",
                "address": str(r["phone"]),
                "app": str(r.get("appid", "")),
                "send_id": str(r["send_id"]),
                "tag": str(r.get("out_id", ""))[:32],
                "timestamp": str(int(at)),
                "token": token,
                "signature": sig,
            }
            if not ok:
                event["report"] = "UNDELIV"
                event["dropped_reason"] = "UNDELIV"
            return event
        if protocol == "nxcloud":
            return {
                "phone": str(r["phone"]),
                "messageid": str(r["out_id"]),
                "status": "2" if ok else "5",
                "result": "DELIVRD" if ok else "UNDELIV",
                "drtime": _bj(at),
                "sendtime": _bj(sent),
                "size": "1",
                "price": "0.0050",
                "currency": "USD",
            }
        return {
            "phone_number": str(r["phone"]),
            "send_time": _bj(sent),
            "report_time": _bj(at),
            "success": ok,
            "err_code": "DELIVERED" if ok else "MK:0001",
            "err_msg": "用户接收成功" if ok else "UNDELIV",
            "sms_size": "1",
            "biz_id": str(r.get("biz_id", "")),
            "out_id": str(r.get("out_id", "")),
        }

    # -- pushing ---------------------------------------------------------------
    def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=10.0, limits=httpx.Limits(max_connections=self.config.concurrency)
        )
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            for t in list(self._inflight):
                t.cancel()
            await asyncio.gather(self._task, *self._inflight, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    @property
    def pending(self) -> int:
        return len(self._heap) + len(self._inflight)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.config.concurrency)
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._heap[0].at - self._clock()
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            group = [heapq.heappop(self._heap)]
            if group[0].protocol == "aliyun":  # SmsReport carries many reports per push
                now = self._clock()
                while self._heap and len(group) < ALIYUN_BATCH and self._heap[0].at <= now:
                    if self._heap[0].protocol != "aliyun":
                        break
                    group.append(heapq.heappop(self._heap))
            await slots.acquire()
            task = asyncio.create_task(self._push(group))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _push(self, group: list[_Due]) -> None:
        assert self._client is not None
        protocol = group[0].protocol
        url = f"{self.config.url}/{protocol}"
        self.counts["pushes"] += 1
        try:
            if protocol == "aliyun":
                body = orjson.dumps([d.payload for d in group])
                r = await self._client.post(url, content=body, headers={"content-type": "application/json"})
                ok = r.status_code == 200 and _aliyun_ok(r.content)
            else:
                r = await self._client.post(url, data={k: str(v) for k, v in group[0].payload.items()})
                ok = r.status_code == 200 and r.text.strip() == "success"
        except httpx.HTTPError:
            ok = False
        if ok:
            self.counts["acked"] += len(group)
            self.acked.update((d.protocol, d.identity) for d in group)
            return
        self.counts["failed_pushes"] += 1
        retries = self.config.retry_s
        if protocol == "nxcloud":
            retries = retries[: self.config.nxcloud_retries]
        for d in group:
            if d.attempt < len(retries):
                d.at = self._clock() + retries[d.attempt]
                d.attempt += 1
                heapq.heappush(self._heap, d)
            else:
                self.counts["dropped"] += 1
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "acked_unique": len(self.acked), "pending": self.pending}


def _aliyun_ok(body: bytes) -> bool:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and answer.get("code") == 0
