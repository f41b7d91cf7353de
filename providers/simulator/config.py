"""The simulator's settings (one frozen value, shared by the CLI and the Python API)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials
from providers.simulator.core import FAULT_KINDS, FaultPlan

__all__ = ("DEFAULT_FAULT_MIX", "SimulatorConfig", "default_credentials")

DEFAULT_FAULT_MIX: Mapping[str, float] = MappingProxyType(dict.fromkeys(FAULT_KINDS, 1.0))
"""Every fault kind, equally likely."""


def default_credentials(environ: Mapping[str, str] = os.environ) -> AliyunCredentials:
    """The client's environment credentials when both variables are set, else the documented test ones."""
    if environ.get("ALIYUN_ACCESS_KEY_ID") and environ.get("ALIYUN_ACCESS_KEY_SECRET"):
        return AliyunCredentials.from_env(environ)
    return TEST_CREDENTIALS


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulator listens, checks, limits, delays, fails and records.

    Times are in milliseconds; rates are fractions of requests. ``fault_rate``
    is spread over ``fault_mix`` (relative weights), and ``fault_rates`` adds
    absolute per-kind rates. ``clock`` (wall, for timestamps and receipts) and
    ``monotonic`` (rate windows, nonce expiry) are injectable for tests.

    Raises:
        ValueError: a negative delay or limit, an unknown fault kind, fault
            rates adding up to more than 1, or a non-loopback ``host``
            without ``allow_remote=True``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    qps: int = 0  # per AccessKeyId, fixed one-second windows; 0: unlimited
    retry_after_header: bool = True  # x-acs-retry-after (ms) on throttles
    fault_rate: float = 0.0
    fault_mix: Mapping[str, float] = field(default_factory=lambda: DEFAULT_FAULT_MIX)
    fault_rates: Mapping[str, float] = field(default_factory=dict)
    slow_ms: float = 10_000.0
    business_error_code: str = "isv.MOBILE_NUMBER_ILLEGAL"
    receipts: Path | None = None
    index_receipts: bool = True  # phone → sends, for QuerySendDetails
    verify: bool = True  # access key, signature, version
    check_time: bool = True  # timestamp windows (off to replay old captures)
    check_nonce: bool = True  # SignatureNonceUsed within the window
    credentials: tuple[AliyunCredentials, ...] = ()  # empty: default_credentials()
    seed: int | None = None
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if min(self.latency_ms, self.jitter_ms, self.slow_ms, self.qps, self.port) < 0:
            raise ValueError("latency, jitter, slow delay, qps and port must not be negative")
        if not 0 <= self.fault_rate <= 1:
            raise ValueError("fault_rate must be between 0 and 1")
        FaultPlan(self.fault_rate, self.fault_mix, self.fault_rates, random.Random(0))  # validates
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError(f"refusing non-loopback host {self.host!r} without allow_remote=True")

    @classmethod
    def minimal(cls, **overrides: Any) -> SimulatorConfig:
        """Benchmark mode: no signature, time or nonce checks and no index (limits, receipts optional)."""
        base = cls(verify=False, check_time=False, check_nonce=False, index_receipts=False)
        return dataclasses.replace(base, **overrides)

    def resolved_credentials(self) -> tuple[AliyunCredentials, ...]:
        return self.credentials or (default_credentials(),)
