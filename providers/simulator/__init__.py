"""A local gateway speaking the providers' protocols, for demos, tests and benchmarks.

One port serves every provider, routed by path: Aliyun dysmsapi at ``/``,
SUBMAIL at ``/sms/{batchsend,multisend,multixsend,log}`` and
``/service/timestamp`` (each also with ``.json``), NXCloud at
``/v1/sms/multi/mt`` and ``/api/sms/get``.

It binds to loopback unless told otherwise, verifies signatures, enforces the
provider's limits with its own error responses, adds latency, injects faults,
and appends every recipient it accepted to a receipts file, so a test can
count duplicates and losses from the provider's side. ``GET /__stats``
returns its counters.

::

    async with serve(SimulatorConfig(qps=1000, receipts=Path("r.jsonl"))) as sim:
        ...  # send to sim.base_url
        sim.stats()["accepted_recipients"]
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from providers.simulator.aliyun import AliyunGateway
from providers.simulator.config import DEFAULT_FAULT_MIX, SimulatorConfig, default_credentials
from providers.simulator.core import FAULT_KINDS, ReceiptLog, Stats
from providers.simulator.nxcloud import NxcloudGateway
from providers.simulator.push import ReceiptPusher
from providers.simulator.server import App, Connection, JsonEndpoint, Router, start_server
from providers.simulator.submail import SubmailGateway

__all__ = (
    "DEFAULT_FAULT_MIX",
    "FAULT_KINDS",
    "Simulator",
    "SimulatorConfig",
    "default_credentials",
    "run_forever",
    "serve",
)


class Simulator:
    """A running simulator (from :func:`serve`)."""

    def __init__(
        self,
        config: SimulatorConfig,
        host: str,
        port: int,
        stats: Stats,
        receipts: ReceiptLog,
        live: set[Connection],
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        scheme = "https" if config.tls_cert is not None else "http"
        self.base_url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        self._stats = stats
        self._receipts = receipts
        self._live = live
        self._started = time.monotonic()
        self.pusher: ReceiptPusher | None = None

    @property
    def receipts(self) -> Path | None:
        """The receipts file (None when not recording to a file)."""
        return self._receipts.path

    @property
    def accepted(self) -> int:
        """Recipients accepted so far."""
        return self._receipts.accepted

    def acked_receipts(self) -> list[str]:
        """``"<protocol> <identity>"`` of every receipt a listener acknowledged."""
        return sorted(" ".join(a) for a in (self.pusher.acked if self.pusher is not None else ()))

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "requests": s.requests,
            "accepted_requests": s.accepted_requests,
            "accepted_recipients": self._receipts.accepted,
            # per account, the most accepted in any sliding one-second window
            "peak_1s": s.peak_1s(),
            "throttled": s.throttled,
            "faults": dict(s.faults),
            "rejected": dict(s.rejected),
            "actions": dict(s.actions),
            "connections": len(self._live),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "cpu_s": round(time.process_time(), 4),  # the whole process, for benchmarks
            **({"receipts_push": self.pusher.stats()} if self.pusher is not None else {}),
        }


@asynccontextmanager
async def serve(config: SimulatorConfig | None = None) -> AsyncIterator[Simulator]:
    """Serve on the running asyncio loop until the block exits.

    On exit it stops accepting, closes every connection and fsyncs the receipts.

    Raises:
        OSError: the address cannot be bound.
    """
    config = config or SimulatorConfig()
    stats = Stats()
    receipts = ReceiptLog(config.receipts, index=config.index_receipts)
    try:
        holder: list[Simulator] = []
        aliyun = AliyunGateway(config, stats, receipts)
        submail = SubmailGateway(config, stats, receipts)
        nxcloud = NxcloudGateway(config, stats, receipts)
        if config.index_receipts:
            _restore(receipts, aliyun, submail, nxcloud)
        routes: dict[str, App] = {
            "/": aliyun,
            "/__stats": JsonEndpoint(lambda: orjson.dumps(holder[0].stats())),
            # the receipts a listener acknowledged, "<protocol> <identity>" (tests: none lost)
            "/__receipts_acked": JsonEndpoint(lambda: orjson.dumps(holder[0].acked_receipts())),
            **submail.routes(),
            **nxcloud.routes(),
        }
        router = Router(routes)
        tls = None
        if config.tls_cert is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.tls_cert, config.tls_key)
        server, live = await start_server(router, config.host, config.port, tls)
        try:
            port = server.sockets[0].getsockname()[1]
            sim = Simulator(config, config.host, port, stats, receipts, live)
            holder.append(sim)
            if config.push is not None:
                sim.pusher = ReceiptPusher(
                    config.push, config.clock, undelivered_rate=config.undelivered_rate
                )
                receipts.on_write = sim.pusher.feed
                sim.pusher.start()
            yield sim
        finally:
            if holder and holder[0].pusher is not None:
                await holder[0].pusher.stop()
            server.close()
            for conn in list(live):
                conn.close()
            await server.wait_closed()
    finally:
        receipts.close()


def _restore(
    receipts: ReceiptLog, aliyun: AliyunGateway, submail: SubmailGateway, nxcloud: NxcloudGateway
) -> None:
    """Give each gateway the receipts an earlier run left in the file (by their ``provider``;
    Aliyun's lines have none), in one pass, a bounded chunk at a time."""
    gateways: dict[str, AliyunGateway | SubmailGateway | NxcloudGateway]
    gateways = {"aliyun": aliyun, "submail": submail, "nxcloud": nxcloud}
    chunks: dict[str, list[dict[str, Any]]] = {name: [] for name in gateways}
    for record in receipts.previous():
        name = str(record.get("provider", "aliyun"))
        chunk = chunks.get(name)
        if chunk is None:
            continue
        chunk.append(record)
        if len(chunk) >= 10_000:
            gateways[name].restore(chunk)
            chunk.clear()
    for name, chunk in chunks.items():
        gateways[name].restore(chunk)


def run_forever(
    config: SimulatorConfig, *, on_ready: Callable[[Simulator], None] | None = None
) -> dict[str, Any]:
    """Serve until SIGINT or SIGTERM (blocking; on uvloop when importable); return the final stats."""

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
                loop.add_signal_handler(sig, stop.set)
        async with serve(config) as sim:
            if on_ready is not None:
                on_ready(sim)
            await stop.wait()
        return sim.stats()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    result: dict[str, Any] = uvloop.run(main())
    return result
