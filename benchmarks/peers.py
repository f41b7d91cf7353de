"""The peers sluice is measured against: what a user would run instead of it.

Each sends recipients ``1..n`` (numbers and parameters from :mod:`benchmarks.common`) as
SendBatchSms requests of ``batch`` numbers, V3-signed (ACS3-HMAC-SHA256), and returns how
many recipients the responder accepted (``Code`` ``OK``). None of them reads a file or
keeps a ledger: they are the lower bound of the work, not the same work.

* ``sdk``: the official SDK (``alibabacloud-dysmsapi20170525``; its Tea core sends with
  ``requests``), one shared client, a ThreadPoolExecutor of 32.
* ``httpx``: a sequential loop, ``AliyunSms.build_request`` signs, a plain ``httpx.Client``.
* ``aiohttp``: ``AliyunSms.build_request`` signs, one ``aiohttp.ClientSession``, every batch
  a task behind an ``asyncio.Semaphore(64)``.

``python -m benchmarks.peers PEER URL N [--batch 100]`` runs one peer in this process and
prints one JSON line: recipients accepted, wall seconds and CPU seconds of the sending,
peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks.common import SIGN_NAME, TEMPLATE_CODE, TEST_ENV, child_result, params_of, phone_of
from providers.aliyun import AliyunCredentials, AliyunSms
from providers.base import Batch, Message

__all__ = ("PEERS", "aiohttp_semaphore", "httpx_sequential", "official_sdk")

SDK_THREADS = 32
AIOHTTP_CONCURRENCY = 64
CREDENTIALS = AliyunCredentials(TEST_ENV["ALIYUN_ACCESS_KEY_ID"], TEST_ENV["ALIYUN_ACCESS_KEY_SECRET"])


def _ranges(n: int, batch: int) -> Iterator[tuple[int, int]]:
    """1-based, inclusive-exclusive recipient ranges of at most ``batch``."""
    for lo in range(1, n + 1, batch):
        yield lo, min(n + 1, lo + batch)


def _batch(batch_id: int, lo: int, hi: int) -> Batch:
    return Batch(
        batch_id,
        [Message(i, str(i), "86" + phone_of(i), params_of(i), SIGN_NAME) for i in range(lo, hi)],
        out_id=f"peer-{batch_id}-1",
    )


def _provider(url: str) -> AliyunSms:
    return AliyunSms(credentials=CREDENTIALS, template_code=TEMPLATE_CODE, endpoint=url, signature="v3")


def _accepted(content: bytes) -> bool:
    try:
        return bool(json.loads(content).get("Code") == "OK")
    except ValueError:
        return False


# -- (a) the official SDK, 32 threads ------------------------------------------------------
def official_sdk(url: str, n: int, batch: int = 100, threads: int = SDK_THREADS) -> int:
    """``Client.send_batch_sms_with_options`` from a ThreadPoolExecutor; V3 is the SDK's default.

    The SDK takes a host, not a URL: ``endpoint='127.0.0.1:PORT'`` with ``protocol='http'``
    (``Config.protocol`` overrides the API's ``HTTPS``; ``DaraCore.compose_url`` builds
    ``http://127.0.0.1:PORT/?...``). Its own retries are off by default.
    """
    from alibabacloud_dysmsapi20170525.client import Client  # type: ignore[import-untyped]
    from alibabacloud_dysmsapi20170525.models import SendBatchSmsRequest  # type: ignore[import-untyped]
    from alibabacloud_tea_openapi.models import Config  # type: ignore[import-untyped]
    from darabonba.runtime import RuntimeOptions  # type: ignore[import-untyped]

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"loopback http URLs only: {url}")
    config = Config(
        access_key_id=CREDENTIALS.access_key_id,
        access_key_secret=CREDENTIALS.access_key_secret,
        endpoint=parts.netloc,
        protocol="http",
    )
    client = Client(config)

    def send(span: tuple[int, int]) -> int:
        lo, hi = span
        request = SendBatchSmsRequest(
            phone_number_json=json.dumps([phone_of(i) for i in range(lo, hi)]),
            sign_name_json=json.dumps([SIGN_NAME] * (hi - lo)),
            template_code=TEMPLATE_CODE,
            template_param_json=json.dumps([params_of(i) for i in range(lo, hi)]),
            out_id=f"sdk-{lo}",
        )
        response = client.send_batch_sms_with_options(request, RuntimeOptions())
        return hi - lo if response.body is not None and response.body.code == "OK" else 0

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(send, _ranges(n, batch)))


# -- (b) a sequential httpx loop -------------------------------------------------------------
def httpx_sequential(url: str, n: int, batch: int = 100) -> int:
    """One request after another on a keep-alive ``httpx.Client``."""
    provider = _provider(url)
    ok = 0
    with httpx.Client(timeout=10.0) as client:
        for batch_id, (lo, hi) in enumerate(_ranges(n, batch), 1):
            response = client.send(provider.build_request(_batch(batch_id, lo, hi)))
            if response.status_code == 200 and _accepted(response.content):
                ok += hi - lo
    return ok


# -- (c) aiohttp + a semaphore ------------------------------------------------------------------
def aiohttp_semaphore(url: str, n: int, batch: int = 100, concurrency: int = AIOHTTP_CONCURRENCY) -> int:
    """Every batch a task; a semaphore of 64 bounds requests in flight (uvloop when installed)."""
    import aiohttp

    provider = _provider(url)

    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def send(batch_id: int, lo: int, hi: int) -> int:
                async with sem:
                    request = provider.build_request(_batch(batch_id, lo, hi))
                    headers = {k: v for k, v in request.headers.items() if k != "content-length"}
                    async with session.post(str(request.url), headers=headers, data=request.content) as resp:
                        body = await resp.read()
                        return hi - lo if resp.status == 200 and _accepted(body) else 0

            results = await asyncio.gather(
                *(send(batch_id, lo, hi) for batch_id, (lo, hi) in enumerate(_ranges(n, batch), 1))
            )
        return sum(results)

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    result: int = uvloop.run(main())
    return result


PEERS: dict[str, Callable[[str, int, int], int]] = {
    "sdk": official_sdk,
    "httpx": httpx_sequential,
    "aiohttp": aiohttp_semaphore,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description="Run one peer and measure it.")
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("url", help="the responder's base URL (loopback)")
    p.add_argument("recipients", type=int)
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args(argv)
    if not 0 < args.recipients <= 20_000_000:
        p.error("recipients must be between 1 and 20 000 000")
    fn = PEERS[args.peer]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ok = fn(args.url, args.recipients, args.batch)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    child_result(peer=args.peer, recipients=args.recipients, accepted=ok, wall_s=wall, cpu_s=cpu)
    return 0 if ok == args.recipients else 1


if __name__ == "__main__":
    sys.exit(main())
