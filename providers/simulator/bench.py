"""How much CPU the simulator spends per request: ``python -m providers.simulator.bench``.

Starts ``python -m providers.simulator`` in its own process, signs every
request up front (SendBatchSms, ``--numbers`` recipients each), sends them over
``--connections`` keep-alive connections with a minimal raw HTTP/1.1 client,
and reads the server's process CPU time from ``GET /__stats`` before and after.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import orjson

from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, Message

__all__ = ("main",)


def _raw(request: httpx.Request) -> bytes:
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return head.encode() + b"\r\n" + request.content


def _requests(url: str, n: int, numbers: int, signature: str) -> list[bytes]:
    sms = AliyunSms(
        credentials=TEST_CREDENTIALS,
        template_code="SMS_154950909",
        endpoint=url,
        signature="v2" if signature == "v2" else "v3",
    )
    out = []
    for i in range(n):
        msgs = [
            Message(
                j,
                f"k{j}",
                f"861{(i * numbers + j) % 10**10:010d}",
                {"name": f"n{j}", "code": f"{j % 1000000:06d}"},
                "Acme",
            )
            for j in range(numbers)
        ]
        out.append(_raw(sms.build_request(Batch(i, msgs, out_id=f"bench-{i}"))))
    return out


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return await reader.readexactly(length)


async def _drive(
    host: str, port: int, requests: list[bytes], connections: int
) -> tuple[float, int, dict[str, float]]:
    async def stats() -> dict[str, float]:
        reader, writer = await asyncio.open_connection(host, port)
        body = await _exchange(reader, writer, b"GET /__stats HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.close()
        result: dict[str, float] = orjson.loads(body)
        return result

    ok = 0

    async def worker(share: list[bytes]) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(host, port)
        for data in share:
            if b'"Code":"OK"' in await _exchange(reader, writer, data):
                ok += 1
        writer.close()

    before = await stats()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(requests[i::connections]) for i in range(connections)))
    elapsed = time.perf_counter() - t0
    after = await stats()
    return elapsed, ok, {"cpu_s": after["cpu_s"] - before["cpu_s"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m providers.simulator.bench", description=__doc__)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--numbers", type=int, default=100, help="recipients per request")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--signature", choices=("v3", "v2"), default="v3")
    p.add_argument("--minimal", action="store_true", help="run the simulator with --minimal")
    p.add_argument("--no-receipts", action="store_true", help="run the simulator without a receipts file")
    p.add_argument("sim_args", nargs="*", help="more simulator options (after --)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "providers.simulator", "--port", "0"]
        if not args.no_receipts:
            cmd += ["--receipts", str(Path(tmp) / "receipts.jsonl")]
        if args.minimal:
            cmd.append("--minimal")
        cmd += args.sim_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIYUN_")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().decode().strip()
            requests = _requests(url, args.requests, args.numbers, args.signature)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            elapsed, ok, delta = asyncio.run(_drive(host, int(port), requests, args.connections))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    n = args.requests
    result = {
        "requests": n,
        "numbers": args.numbers,
        "ok": ok,
        "signature": args.signature,
        "minimal": args.minimal,
        "receipts": not args.no_receipts,
        "connections": args.connections,
        "simulator_args": args.sim_args,
        "server_cpu_us_per_request": round(delta["cpu_s"] / n * 1e6, 1),
        "server_cpu_bound_requests_per_s": round(n / delta["cpu_s"]) if delta["cpu_s"] else None,
        "wall_requests_per_s": round(n / elapsed),
    }
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
