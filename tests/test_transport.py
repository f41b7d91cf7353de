"""The aiohttp-backed httpx transport, against real loopback sockets.

What matters most: an error after the request left must never look like one
before it (that would re-send a batch the provider may have processed).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from pipeline.transport import HttpTransport
from providers.base import Outcome, classify_transport_error

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


@pytest.fixture
async def server() -> AsyncIterator[Callable[[str], str]]:
    """Start a loopback server whose behaviour is chosen per test."""
    mode: dict[str, str] = {}
    received: list[bytes] = []
    gate = asyncio.Event()

    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head, body = await read_request(reader)
                received.append(head + body)
                if mode["m"] == "ok":
                    payload = b'{"Code":"OK"}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Echo: "
                        + head.split(b" ")[1]
                        + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
                        + payload
                    )
                    await writer.drain()
                elif mode["m"] == "close_after_read":
                    return
                elif mode["m"] == "hang":
                    await gate.wait()
                    return
                elif mode["m"] == "truncated":
                    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"Co')
                    await writer.drain()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]

    def use(m: str) -> str:
        mode["m"] = m
        return f"http://127.0.0.1:{port}"

    use.received = received  # type: ignore[attr-defined]
    yield use
    gate.set()
    await asyncio.gather(*handlers)
    srv.close()
    await srv.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
class TestHttpTransport:
    async def test_round_trip_keeps_the_exact_target(self, server: Callable[[str], str]) -> None:
        base = server("ok")
        target = "/?A=%2A~%20%2B&B=%E4%B8%AD"
        async with httpx.AsyncClient(transport=HttpTransport(max_connections=2)) as client:
            r = await client.send(httpx.Request("POST", httpx.URL(base + target), content=b"x=1"))
        assert r.status_code == 200 and r.json() == {"Code": "OK"}
        assert r.headers["x-echo"] == target
        assert server.received[0].endswith(b"\r\n\r\nx=1")  # type: ignore[attr-defined]

    async def test_connect_refused_is_retryable(self) -> None:
        async with httpx.AsyncClient(transport=HttpTransport()) as client:
            with pytest.raises(httpx.ConnectError) as info:
                await client.post(f"http://127.0.0.1:{free_port()}/", content=b"x")
        assert classify_transport_error(info.value).outcome is Outcome.RETRY

    @pytest.mark.parametrize("mode", ["close_after_read", "truncated"])
    async def test_loss_after_sending_is_unknown(self, server: Callable[[str], str], mode: str) -> None:
        base = server(mode)
        async with httpx.AsyncClient(transport=HttpTransport()) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.post(base + "/", content=b"x=1")
        assert not isinstance(info.value, httpx.ConnectError | httpx.ConnectTimeout)
        assert classify_transport_error(info.value).outcome is Outcome.UNKNOWN

    async def test_read_timeout_is_unknown(self, server: Callable[[str], str]) -> None:
        base = server("hang")
        async with httpx.AsyncClient(transport=HttpTransport(), timeout=httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout) as info:
                await client.post(base + "/", content=b"x=1")
        assert classify_transport_error(info.value).outcome is Outcome.UNKNOWN
