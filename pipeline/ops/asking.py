"""Asking the provider's status API about recipients, shared by ``sluice reconcile`` (was an
unknown send accepted?) and ``sluice receipts`` (was it delivered?): the recipients' rows and
batches from the ledger and the source, one rate-limited client with the campaign's transport
settings (proxy, ``ca_file``, ``verify_tls``), and a query per recipient on a few workers or
one sweep for all of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Sequence
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc
import httpx

from pipeline.admit import recipients
from pipeline.app.campaign import Campaign
from pipeline.ledger import Intent, events
from pipeline.limit import RateGovernor
from pipeline.proxy import Proxy
from pipeline.transport import HttpTransport
from providers.base import Provider
from providers.spec import Fetch, UnknownSend

__all__ = ("ask_all", "last_intents", "unsettled_sends")

A = TypeVar("A")


def last_intents(ledger: Path, rows: Container[int]) -> dict[int, tuple[str, float]]:
    """Row → (OutId, time) of the last intent naming it, for ``rows``."""
    out: dict[int, tuple[str, float]] = {}
    for event in events(ledger, recipients=False):
        if isinstance(event, Intent):
            for r in event.rows:
                if r in rows:
                    out[r] = (event.out_id, event.time or 0.0)
    return out


async def unsettled_sends(campaign: Campaign, intents: dict[int, tuple[str, float]]) -> list[UnknownSend]:
    """The recipients of ``intents`` as the status queries take them (key and number from the source)."""
    return [
        UnknownSend(row, key, phone, *intents[row]) async for row, key, phone in recipients(campaign, intents)
    ]


async def ask_all(
    campaign: Campaign,
    provider: Provider,
    todo: Sequence[UnknownSend],
    *,
    rate: float,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None,
    one: Callable[[Provider, UnknownSend, Fetch], Awaitable[A]] | None,
    sweep: Callable[[Provider, Sequence[UnknownSend], Fetch], Awaitable[list[A]]] | None,
    failed: Callable[[httpx.TransportError], A],
    answer: Callable[[UnknownSend, A], None],
) -> None:
    """Ask about every recipient of ``todo`` at ``rate`` queries a second (``sweep`` when the
    provider answers for all at once, else ``one`` on ``concurrency`` workers) and hand each answer
    to ``answer``; a query that fails in transport is answered ``failed(error)``."""
    governor = RateGovernor(rate, min_rate=rate)
    client = transport or HttpTransport(
        max_connections=concurrency,
        verify=campaign.provider.verify_tls,
        proxy=Proxy.configured(campaign.provider.proxy),
        ca_file=campaign.provider.ca_file,
    )
    timeout = httpx.Timeout(campaign.provider.timeout).as_dict()

    async def fetch(request: httpx.Request) -> httpx.Response:
        await governor.acquire()
        request.extensions["timeout"] = timeout
        response = await client.handle_async_request(request)
        await response.aread()
        return response

    async with client:
        if sweep is not None:
            for item, reply in zip(todo, await sweep(provider, todo, fetch), strict=True):
                answer(item, reply)
            return
        assert one is not None
        ask = one
        send, recv = anyio.create_memory_object_stream[UnknownSend](concurrency)

        async def worker(stream: anyio.abc.ObjectReceiveStream[UnknownSend]) -> None:
            async with stream:
                async for item in stream:
                    try:
                        reply = await ask(provider, item, fetch)
                    except httpx.TransportError as exc:
                        reply = failed(exc)
                    answer(item, reply)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker, recv.clone())
            recv.close()
            async with send:
                for item in todo:
                    await send.send(item)
