"""A local gateway speaking the providers' protocols, for demos, tests and benchmarks.

It binds to loopback unless told otherwise, verifies signatures, enforces the
providers' limits with their own error responses, injects faults, and records
every recipient it accepted in a receipts file so duplicates and losses can be
counted from the provider's side.

::

    async with serve(SimulatorConfig(qps=1000)) as sim:
        print(sim.base_url)
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials
from providers.simulator.aliyun import FAULT_KINDS, AliyunGateway, GatewayConfig
from providers.simulator.server import serve_http

__all__ = ("FAULT_KINDS", "Simulator", "SimulatorConfig", "default_credentials", "serve")


def default_credentials(environ: Mapping[str, str] = os.environ) -> AliyunCredentials:
    """The client's environment credentials when set, else the documented test ones."""
    if environ.get("ALIYUN_ACCESS_KEY_ID") and environ.get("ALIYUN_ACCESS_KEY_SECRET"):
        return AliyunCredentials.from_env(environ)
    return TEST_CREDENTIALS


@dataclass(frozen=True)
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    qps: int = 0
    fault_rate: float = 0.0
    fault_mix: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 1.0))
    slow_ms: float = 10_000.0
    receipts: Path | None = None
    verify: bool = True
    check_time: bool = True
    retry_after_header: bool = True
    index_receipts: bool = True
    seed: int | None = None
    credentials: AliyunCredentials | None = None
    allow_remote: bool = False

    def gateway(self) -> GatewayConfig:
        return GatewayConfig(
            credentials=self.credentials or default_credentials(),
            latency_ms=self.latency_ms,
            jitter_ms=self.jitter_ms,
            qps=self.qps,
            fault_rate=self.fault_rate,
            fault_mix=self.fault_mix,
            slow_ms=self.slow_ms,
            verify=self.verify,
            check_time=self.check_time,
            retry_after_header=self.retry_after_header,
            index_receipts=self.index_receipts,
            seed=self.seed,
        )


@dataclass
class Simulator:
    base_url: str
    receipts: Path | None
    gateway: AliyunGateway

    def stats(self) -> dict[str, Any]:
        return self.gateway.stats


def _check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to bind the simulator to non-loopback {host} (allow_remote=False)")


@asynccontextmanager
async def serve(config: SimulatorConfig) -> AsyncIterator[Simulator]:
    """Serve until the block exits."""
    _check_host(config.host, config.allow_remote)
    gateway = AliyunGateway(config.gateway(), config.receipts)
    server = await serve_http(gateway.handle, config.host, config.port, on_head=gateway.on_head)
    try:
        port = server.sockets[0].getsockname()[1]
        yield Simulator(f"http://{config.host}:{port}", config.receipts, gateway)
    finally:
        server.close()
        gateway.close()
