"""``python -m providers.simulator`` (also ``sluice simulate``): serve until SIGINT or SIGTERM.

The first line of stdout is the base URL, printed once connections are
accepted; nothing else goes to stdout. Final statistics go to stderr as JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from providers.simulator import FAULT_KINDS, Simulator, SimulatorConfig, run_forever
from providers.simulator.config import DEFAULT_FAULT_MIX
from providers.simulator.push import PushConfig

__all__ = ("build_parser", "config_from_args", "main")


def _weights(text: str) -> dict[str, float]:
    """``kind=number,kind...`` (a bare kind means 1)."""
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        try:
            out[kind] = float(value) if value else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    return out


def build_parser(prog: str = "python -m providers.simulator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Serve the SMS provider simulator (Aliyun dysmsapi, SUBMAIL v4, NXCloud)."
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=0, help="0: a free port (the URL is printed)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before every response")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="plus a uniform random 0..N ms")
    p.add_argument(
        "--qps",
        type=int,
        default=0,
        help="requests per second per Aliyun AccessKeyId and NXCloud accessKey (0: unlimited)",
    )
    p.add_argument("--no-retry-after", action="store_true", help="no x-acs-retry-after header on throttles")
    p.add_argument("--fault-rate", type=float, default=0.0, help="fraction of send requests given a fault")
    p.add_argument(
        "--fault-mix",
        type=_weights,
        default=None,
        help=f"relative weights kind=w,... (default: all equal) of {', '.join(FAULT_KINDS)}",
    )
    p.add_argument("--fault-rates", type=_weights, default=None, help="absolute per-kind rates kind=r,...")
    p.add_argument("--slow-ms", type=float, default=10_000.0, help="response delay of a 'slow' fault")
    p.add_argument(
        "--business-error-code", default="isv.MOBILE_NUMBER_ILLEGAL", help="Code of a 'business_error' fault"
    )
    p.add_argument(
        "--bad-number-rate",
        type=float,
        default=0.0,
        help="share of numbers the gateway treats as bad; a call holding one is refused whole",
    )
    p.add_argument(
        "--receipts",
        type=Path,
        help="append every accepted recipient here (JSONL); read back on start, so status queries "
        "answer for sends made before a restart",
    )
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    p.add_argument("--seed", type=int, help="seed of the fault and jitter draws")
    p.add_argument("--no-verify", action="store_true", help="skip access key, signature and version checks")
    p.add_argument("--no-time-check", action="store_true", help="skip timestamp windows")
    p.add_argument("--no-nonce-check", action="store_true", help="skip SignatureNonceUsed")
    p.add_argument("--no-index", action="store_true", help="no receipt index (QuerySendDetails unavailable)")
    p.add_argument(
        "--submail-hot-numbers",
        default="",
        help="comma-separated numbers SUBMAIL refuses with 115 (per-number frequency)",
    )
    p.add_argument(
        "--submail-log-interval",
        type=float,
        default=60.0,
        help="seconds sms/log answers its cached result (0: always fresh)",
    )
    p.add_argument(
        "--submail-qps",
        type=int,
        default=0,
        help="SUBMAIL requests per second per appid (HTTP 429; 0: unlimited)",
    )
    p.add_argument(
        "--nxcloud-tps",
        type=int,
        default=None,
        help="NXCloud requests per second per accessKey (code 13008; default: --qps)",
    )
    p.add_argument(
        "--nxcloud-refuse-bad-numbers",
        action="store_true",
        help="NXCloud refuses a whole call holding a bad number (13005, data null) instead of "
        "answering that item Failure",
    )
    p.add_argument(
        "--nxcloud-number-hourly-limit",
        type=int,
        default=0,
        help="NXCloud messages accepted per number per hour, code 13007 beyond (0: unlimited)",
    )
    p.add_argument(
        "--receipts-to",
        metavar="URL",
        help="push each accepted recipient's delivery receipt to URL/aliyun, URL/submail, URL/nxcloud "
        "(what `sluice listen` prints as receipts-to)",
    )
    p.add_argument(
        "--receipt-delay-ms", type=float, default=200.0, help="mean delay of a receipt (exponential)"
    )
    p.add_argument("--receipt-min-delay-ms", type=float, default=0.0, help="least delay of a receipt")
    p.add_argument("--undelivered-rate", type=float, default=0.0, help="share of receipts undelivered")
    p.add_argument("--duplicate-rate", type=float, default=0.0, help="share of receipts pushed twice")
    p.add_argument(
        "--out-of-order-rate", type=float, default=0.0, help="share of receipts held back 10 mean delays"
    )
    p.add_argument(
        "--receipt-retries",
        default="1,5,10",
        help="seconds between the attempts of an unacknowledged push (Aliyun's are 1,5,10 minutes)",
    )
    p.add_argument(
        "--nxcloud-receipt-retries", type=int, default=0, help="NXCloud pushes a DR once (0 retries)"
    )
    p.add_argument(
        "--subhook-key",
        default="simulator-subhook-key",
        help="the SUBHOOK key SUBMAIL events are signed with",
    )
    p.add_argument(
        "--minimal",
        action="store_true",
        help="benchmark mode: --no-verify --no-time-check --no-nonce-check --no-index",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Raises ValueError for inconsistent settings."""
    minimal = args.minimal
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        qps=args.qps,
        retry_after_header=not args.no_retry_after,
        fault_rate=args.fault_rate,
        fault_mix=args.fault_mix or DEFAULT_FAULT_MIX,
        fault_rates=args.fault_rates or {},
        slow_ms=args.slow_ms,
        business_error_code=args.business_error_code,
        receipts=args.receipts,
        seed=args.seed,
        verify=not (minimal or args.no_verify),
        check_time=not (minimal or args.no_time_check),
        check_nonce=not (minimal or args.no_nonce_check),
        index_receipts=not (minimal or args.no_index),
        submail_hot_numbers=frozenset(filter(None, (n.strip() for n in args.submail_hot_numbers.split(",")))),
        submail_log_interval_s=args.submail_log_interval,
        submail_qps=args.submail_qps,
        nxcloud_tps=args.nxcloud_tps,
        nxcloud_refuse_bad_numbers=args.nxcloud_refuse_bad_numbers,
        nxcloud_number_hourly_limit=args.nxcloud_number_hourly_limit,
        bad_number_rate=args.bad_number_rate,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        push=_push_config(args),
        undelivered_rate=args.undelivered_rate,
    )


def _push_config(args: argparse.Namespace) -> PushConfig | None:
    if not args.receipts_to:
        return None
    try:
        retries = tuple(float(x) for x in args.receipt_retries.split(",") if x.strip())
    except ValueError:
        raise ValueError("--receipt-retries: comma-separated seconds") from None
    return PushConfig(
        url=args.receipts_to.rstrip("/"),
        delay_ms=args.receipt_delay_ms,
        min_delay_ms=args.receipt_min_delay_ms,
        duplicate_rate=args.duplicate_rate,
        out_of_order_rate=args.out_of_order_rate,
        retry_s=retries,
        nxcloud_retries=args.nxcloud_receipt_retries,
        subhook_key=args.subhook_key,
        seed=args.seed,
    )


def _ready(sim: Simulator) -> None:
    sys.stdout.write(sim.base_url + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m providers.simulator") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    stats = run_forever(config, on_ready=_ready)
    sys.stderr.write(orjson.dumps(stats).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
