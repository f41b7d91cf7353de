"""``python -m providers.simulator`` (also ``sluice simulate``): serve until SIGINT/SIGTERM.

Prints its base URL as the first line of stdout once it accepts connections;
final statistics go to stderr as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import orjson

from providers.simulator import FAULT_KINDS, SimulatorConfig, serve

__all__ = ("build_parser", "main")


def _mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        mix[kind] = float(weight or 1)
    return mix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice simulate", description="Serve the provider simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--qps", type=int, default=0, help="requests per second per AccessKeyId (0: unlimited)")
    p.add_argument("--fault-rate", type=float, default=0.0, help="fraction of requests given a fault")
    p.add_argument("--fault-mix", type=_mix, default=None, help=f"kind=weight,... of {', '.join(FAULT_KINDS)}")
    p.add_argument("--slow-ms", type=float, default=10_000.0, help="delay of a 'slow' fault")
    p.add_argument("--receipts", type=Path, help="append every accepted recipient here (JSONL)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip signature checks")
    p.add_argument("--no-time-check", action="store_true", help="skip timestamp and nonce checks")
    p.add_argument("--minimal", action="store_true", help="benchmark mode: no checks, no index")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    return p


def config_from(args: argparse.Namespace) -> SimulatorConfig:
    extra = {"fault_mix": args.fault_mix} if args.fault_mix else {}
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        qps=args.qps,
        fault_rate=args.fault_rate,
        slow_ms=args.slow_ms,
        receipts=args.receipts,
        verify=not (args.no_verify or args.minimal),
        check_time=not (args.no_time_check or args.minimal),
        index_receipts=not args.minimal,
        seed=args.seed,
        allow_remote=args.allow_remote,
        **extra,
    )


async def run_forever(config: SimulatorConfig) -> dict[str, object]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config) as sim:
        sys.stdout.write(sim.base_url + "\n")
        sys.stdout.flush()
        await stop.wait()
        return sim.stats()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args)
        if not config.allow_remote:
            import ipaddress

            if config.host != "localhost" and not ipaddress.ip_address(config.host).is_loopback:
                raise ValueError(f"refusing non-loopback --host {config.host} without --allow-remote")
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        import uvloop

        stats = uvloop.run(run_forever(config))
    except ImportError:
        stats = asyncio.run(run_forever(config))
    sys.stderr.write(orjson.dumps(stats).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
