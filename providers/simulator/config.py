"""The simulator's settings (one frozen value, shared by the CLI and the Python API)."""

from __future__ import annotations

import dataclasses
import hashlib
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
from providers.simulator.push import PushConfig

__all__ = (
    "DEFAULT_FAULT_MIX",
    "NXCLOUD_TEST_ACCOUNT",
    "SUBMAIL_TEST_APP",
    "NxcloudAccount",
    "SimulatorConfig",
    "SubmailApp",
    "default_credentials",
    "default_nxcloud_accounts",
    "default_submail_apps",
)

DEFAULT_FAULT_MIX: Mapping[str, float] = MappingProxyType(dict.fromkeys(FAULT_KINDS, 1.0))
"""Every fault kind, equally likely."""


def default_credentials(environ: Mapping[str, str] = os.environ) -> AliyunCredentials:
    """The client's environment credentials when both variables are set, else the documented test ones."""
    if environ.get("ALIYUN_ACCESS_KEY_ID") and environ.get("ALIYUN_ACCESS_KEY_SECRET"):
        return AliyunCredentials.from_env(environ)
    return TEST_CREDENTIALS


@dataclass(frozen=True, slots=True)
class SubmailApp:
    """A SUBMAIL app: ``appid`` and its ``appkey``."""

    appid: str
    appkey: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NxcloudAccount:
    """An NXCloud account: the signing pair, its SMS app key, and the app secret of the record query."""

    access_key: str
    access_secret: str = field(repr=False)
    app_key: str
    app_secret: str = field(repr=False)


SUBMAIL_TEST_APP = SubmailApp("10001", "abcdef0123456789abcdef0123456789")
"""The inputs of PROTOCOLS.md's SUBMAIL vectors C1-C4."""
NXCLOUD_TEST_ACCOUNT = NxcloudAccount("fme2na3kdi3ki", "abciiiko2k3", "yourAppKey", "yourAppSecret")
"""The key and secret of PROTOCOLS.md's NXCloud vectors D1-D5 (the app secret is made up)."""


def default_submail_apps(environ: Mapping[str, str] = os.environ) -> tuple[SubmailApp, ...]:
    """``SUBMAIL_APPID``/``SUBMAIL_APPKEY`` when both are set, else the test app."""
    appid, appkey = environ.get("SUBMAIL_APPID", "").strip(), environ.get("SUBMAIL_APPKEY", "").strip()
    return (SubmailApp(appid, appkey),) if appid and appkey else (SUBMAIL_TEST_APP,)


def default_nxcloud_accounts(environ: Mapping[str, str] = os.environ) -> tuple[NxcloudAccount, ...]:
    """``NXCLOUD_ACCESS_KEY``/``_ACCESS_SECRET``/``_APP_KEY`` (and optional ``_APP_SECRET``) when
    the first three are set, else the test account."""
    names = ("NXCLOUD_ACCESS_KEY", "NXCLOUD_ACCESS_SECRET", "NXCLOUD_APP_KEY")
    key, secret, app = (environ.get(name, "").strip() for name in names)
    if not (key and secret and app):
        return (NXCLOUD_TEST_ACCOUNT,)
    app_secret = environ.get("NXCLOUD_APP_SECRET", "").strip() or NXCLOUD_TEST_ACCOUNT.app_secret
    return (NxcloudAccount(key, secret, app, app_secret),)


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
    ``monotonic`` (rate windows, nonce expiry, the ``sms/log`` cache) are
    injectable for tests. ``verify``, ``check_time``, ``index_receipts``, the
    latency and the fault plan apply to every provider; the ``submail_*`` and
    ``nxcloud_*`` settings to one.

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
    # SUBMAIL (PROTOCOLS.md §2)
    submail_credentials: tuple[SubmailApp, ...] = ()  # empty: default_submail_apps()
    submail_timestamp_window_s: float = 6.0  # error 152 beyond it
    submail_log_interval_s: float = 60.0  # sms/log answers its cached result within it; 0: never
    submail_hot_numbers: frozenset[str] = frozenset()  # these get error 115 (per-number frequency)
    submail_qps: int = 0  # per appid; SUBMAIL documents no API limit, so the answer is an HTTP 429
    submail_business_error_code: str = "252"
    # NXCloud (PROTOCOLS.md §3)
    nxcloud_credentials: tuple[NxcloudAccount, ...] = ()  # empty: default_nxcloud_accounts()
    nxcloud_tps: int | None = None  # per accessKey, code 13008 beyond it; None: same as qps
    # a business_error fault: 0 every item "Failure"; otherwise that top-level code, data null
    nxcloud_business_error_code: int = 0
    # bad numbers: False each gets a "Failure" item (the seed's partial failure, code 0);
    # True the whole call is refused with 13005 and data null (nothing sent)
    nxcloud_refuse_bad_numbers: bool = False
    nxcloud_number_hourly_limit: int = 0  # accepted messages per number per hour, 13007 beyond; 0: off
    # Every provider: the share of numbers the gateway treats as bad (malformed, blacklisted),
    # chosen by is_bad_number so a test can tell which; a call holding one is refused whole.
    bad_number_rate: float = 0.0
    # Serve HTTPS with this certificate chain and key (PEM), for TLS tests; None: plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Push every accepted recipient's delivery receipt to a listener (None: no pushes).
    push: PushConfig | None = None
    # The share of accepted messages whose receipt says undelivered (pushed and queried alike).
    undelivered_rate: float = 0.0

    def __post_init__(self) -> None:
        if (
            min(
                self.latency_ms,
                self.jitter_ms,
                self.slow_ms,
                self.qps,
                self.port,
                self.submail_qps,
                self.submail_timestamp_window_s,
                self.submail_log_interval_s,
                self.nxcloud_tps or 0,
                self.nxcloud_number_hourly_limit,
            )
            < 0
        ):
            raise ValueError("delays, windows, rate limits and port must not be negative")
        if not 0 <= self.fault_rate <= 1:
            raise ValueError("fault_rate must be between 0 and 1")
        if not 0 <= self.bad_number_rate <= 1:
            raise ValueError("bad_number_rate must be between 0 and 1")
        FaultPlan(self.fault_rate, self.fault_mix, self.fault_rates, random.Random(0))  # validates
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError(f"refusing non-loopback host {self.host!r} without allow_remote=True")

    @classmethod
    def minimal(cls, **overrides: Any) -> SimulatorConfig:
        """Benchmark mode: no signature, time or nonce checks and no index (limits, receipts optional)."""
        base = cls(verify=False, check_time=False, check_nonce=False, index_receipts=False)
        return dataclasses.replace(base, **overrides)

    def is_bad_number(self, phone: str) -> bool:
        """Whether the gateway refuses ``phone`` (digits, any prefix form): a fixed function of the
        number's last 11 digits, so clients and tests can predict it at a given rate."""
        if self.bad_number_rate <= 0:
            return False
        tail = "".join(c for c in phone if c.isdigit())[-11:]
        draw = int.from_bytes(hashlib.sha256(tail.encode()).digest()[:8], "big") / 2**64
        return draw < self.bad_number_rate

    def rng(self, *tags: str) -> random.Random:
        """A generator for one purpose (``"faults"``, ``"submail", "ids"``…), reproducible with ``seed``."""
        return random.Random(None if self.seed is None else ":".join((str(self.seed), *tags)))

    def resolved_credentials(self) -> tuple[AliyunCredentials, ...]:
        return self.credentials or (default_credentials(),)

    def resolved_submail(self) -> tuple[SubmailApp, ...]:
        return self.submail_credentials or default_submail_apps()

    def resolved_nxcloud(self) -> tuple[NxcloudAccount, ...]:
        return self.nxcloud_credentials or default_nxcloud_accounts()
