"""``HttpTransport`` (our HTTP/1.1 keep-alive pool on asyncio protocols), against real loopback sockets.

What matters most: an error after the request left must never look like one
before it (that would re-send a batch the provider may have processed).

Every server here is a real asyncio server on 127.0.0.1, port 0, whose behaviour per
connection is picked by the test (a *handler*); nothing is mocked, no fixed sleep is
used to wait for anything, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import httpx
import pytest
import trustme

from pipeline.transport import HttpTransport
from providers.base import CERTIFICATE_CODE, Outcome, WireRequest, classify_transport_error
from tests.conftest import REPO

TIMEOUT = httpx.Timeout(5)
"""The client side's timeouts, when a test is not about them."""

WAIT = 5.0
"""Seconds any wait on the server side may take before the test fails."""


# -- the loopback server ------------------------------------------------------------------------


class Received:
    """One request as the server read it off the wire."""

    def __init__(self, conn: int, head: bytes, body: bytes) -> None:
        self.conn = conn  # index of the connection it came on
        self.head = head
        self.body = body
        self.request_line = head.split(b"\r\n", 1)[0]
        self.target = self.request_line.split(b" ")[1]

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (case-insensitive), in order."""
        values = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.lower() == name.lower():
                values.append(value.strip())
        return values


class Conn:
    """One accepted connection, as a handler sees it."""

    def __init__(
        self, server: Server, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer
        self.raw = b""  # bytes read outside a request, for handlers that look at them
        self.peer_closed = asyncio.Event()  # the client closed it (seen by a read)
        self.done = asyncio.Event()  # the server side has closed it

    async def request(self) -> Received | None:
        """The next request on this connection, or None once the client has closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await self.reader.readexactly(length) if length else b""
        received = Received(self.index, head, body)
        self.server.requests.append(received)
        self.server.arrived.set()
        return received

    async def send(self, *parts: bytes, byte_by_byte: bool = False) -> None:
        """Write ``parts`` in as many writes (one per byte with ``byte_by_byte``)."""
        if byte_by_byte:
            parts = tuple(bytes([b]) for b in b"".join(parts))
        for i, part in enumerate(parts):
            if i:
                # Not a wait for anything: one turn of the loop, so the client (same loop)
                # reads this write on its own instead of all of them at once.
                await asyncio.sleep(0)
            self.writer.write(part)
            await self.writer.drain()

    async def until_peer_closes(self) -> None:
        """Read and drop whatever comes, until the client closes the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.peer_closed.set()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]


class Server:
    """A loopback HTTP server; ``handler`` serves each accepted connection, then it is closed."""

    def __init__(self) -> None:
        self.handler: Handler = answer_ok
        self.conns: list[Conn] = []
        self.requests: list[Received] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()  # for handlers that hold a response back
        self.open = 0
        self.max_open = 0
        self.url = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._srv: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self._srv = await asyncio.start_server(self._accept, host, 0, ssl=tls)
        port = self._srv.sockets[0].getsockname()[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def serve(self, handler: Handler) -> str:
        """Serve connections with ``handler`` from now on; the base URL."""
        self.handler = handler
        return self.url

    @property
    def connections(self) -> int:
        """How many connections were accepted."""
        return len(self.conns)

    async def wait_for_requests(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self, len(self.conns), reader, writer)
        self.conns.append(conn)
        self._tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            conn.done.set()

    async def stop(self) -> None:
        """Stop listening, end every connection still open, and wait for their handlers."""
        assert self._srv is not None
        self._srv.close()
        self.release.set()
        for conn in self.conns:
            conn.writer.transport.abort()  # a handler reading sees the end and returns
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=WAIT)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await self._srv.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A loopback server whose behaviour is chosen per test (``server.serve(handler)``)."""
    srv = Server()
    await srv.start()
    yield srv
    await srv.stop()


# -- responses and handlers ---------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"
KEEP_ALIVE = b"Connection: keep-alive"


def chunked(body: bytes, size: int = 7) -> bytes:
    """``body`` as chunks of ``size`` bytes, the first with an extension, then a trailer."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";ext=1" if not i else b"", p) for i, p in enumerate(pieces))
    return out + b"0\r\nX-Trailer: done\r\n\r\n"


def response(
    body: bytes = b"ok",
    *,
    framing: str = "content-length",
    status: bytes = b"200 OK",
    version: bytes = b"HTTP/1.1",
    headers: Iterable[bytes] = (),
) -> bytes:
    """A whole response; ``framing`` is content-length, chunked or until-close (no length)."""
    lines = [version + b" " + status, *headers]
    payload = body
    if framing == "content-length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = chunked(body)
    else:
        assert framing == "until-close"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def ok_response(target: bytes) -> bytes:
    return response(b'{"Code":"OK"}', headers=[b"Content-Type: application/json", b"X-Echo: " + target])


async def answer_ok(conn: Conn) -> None:
    """Answer every request on the connection (kept alive), echoing its target in X-Echo."""
    while (req := await conn.request()) is not None:
        await conn.send(ok_response(req.target))


def answer_with(*parts: bytes, close: bool = False, byte_by_byte: bool = False) -> Handler:
    """Answer every request with these raw bytes (one write each); ``close`` after the first."""

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(*parts, byte_by_byte=byte_by_byte)
            if close:
                return

    return handler


async def hang(conn: Conn) -> None:
    """Read the request, never answer; return once the client gives up and closes."""
    if await conn.request() is not None:
        await conn.until_peer_closes()


async def hang_on_first_connection(conn: Conn) -> None:
    await (hang(conn) if conn.index == 0 else answer_ok(conn))


async def close_after_read(conn: Conn) -> None:
    await conn.request()


# -- client-side helpers ------------------------------------------------------------------------


async def send(
    transport: HttpTransport,
    url: str,
    content: bytes = b"x=1",
    *,
    method: str = "POST",
    headers: Iterable[tuple[str, str]] = (),
    timeouts: httpx.Timeout = TIMEOUT,
) -> httpx.Response:
    return await transport.send(WireRequest(method, url, list(headers), content), timeouts)


async def within(event: asyncio.Event, what: str) -> None:
    """Wait for ``event``, failing the test with ``what`` after WAIT seconds."""
    try:
        await asyncio.wait_for(event.wait(), WAIT)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT} s: {what}") from None


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop turn until ``condition`` holds (a bounded number of turns)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def idle_usable(transport: HttpTransport) -> bool:
    """Whether the pool holds an idle connection it would reuse (looks inside the pool)."""
    return any(c.usable() for conns in transport._idle.values() for c in conns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_unknown(exc: httpx.TransportError) -> None:
    assert not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    assert classify_transport_error(exc).outcome is Outcome.UNKNOWN


def assert_retryable(exc: httpx.TransportError) -> None:
    assert classify_transport_error(exc).outcome is Outcome.RETRY


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.anyio
class TestHttpTransport:
    async def test_round_trip_keeps_the_exact_target(self, server: Server) -> None:
        base = server.serve(answer_ok)
        target = "/?A=%2A~%20%2B&B=%E4%B8%AD"
        async with httpx.AsyncClient(transport=HttpTransport(max_connections=2)) as client:
            r = await client.send(httpx.Request("POST", httpx.URL(base + target), content=b"x=1"))
        assert r.status_code == 200 and r.json() == {"Code": "OK"}
        assert r.headers["x-echo"] == target
        assert server.requests[0].body == b"x=1"

    async def test_connect_refused_is_retryable(self) -> None:
        async with httpx.AsyncClient(transport=HttpTransport()) as client:
            with pytest.raises(httpx.ConnectError) as info:
                await client.post(f"http://127.0.0.1:{free_port()}/", content=b"x")
        assert_retryable(info.value)

    @pytest.mark.parametrize(
        "handler",
        [
            pytest.param(close_after_read, id="close_after_read"),
            pytest.param(answer_with(OK + b'Content-Length: 100\r\n\r\n{"Co', close=True), id="truncated"),
        ],
    )
    async def test_loss_after_sending_is_unknown(self, server: Server, handler: Handler) -> None:
        base = server.serve(handler)
        async with httpx.AsyncClient(transport=HttpTransport()) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.post(base + "/", content=b"x=1")
        assert_unknown(info.value)

    async def test_read_timeout_is_unknown(self, server: Server) -> None:
        base = server.serve(hang)
        async with httpx.AsyncClient(transport=HttpTransport(), timeout=httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout) as info:
                await client.post(base + "/", content=b"x=1")
        assert_unknown(info.value)

    # -- keep-alive ---------------------------------------------------------------------------

    async def test_sequential_requests_share_one_connection(self, server: Server) -> None:
        base = server.serve(answer_ok)
        async with HttpTransport() as transport:
            for path in ("/one", "/two"):
                r = await send(transport, base + path)
                assert r.status_code == 200 and r.headers["x-echo"] == path
        assert server.connections == 1
        assert [r.conn for r in server.requests] == [0, 0]

    @pytest.mark.parametrize(
        ("reply", "reused"),
        [
            pytest.param(response(version=b"HTTP/1.0"), False, id="http/1.0"),
            pytest.param(response(version=b"HTTP/1.0", headers=[KEEP_ALIVE]), True, id="http/1.0-keep-alive"),
            pytest.param(response(headers=[b"Connection: close"]), False, id="http/1.1-connection-close"),
            pytest.param(response(), True, id="http/1.1"),
        ],
    )
    async def test_reuse_follows_the_response(self, server: Server, reply: bytes, reused: bool) -> None:
        # The server would answer again on the same connection: reuse is the client's choice.
        base = server.serve(answer_with(reply))
        async with HttpTransport() as transport:
            for _ in range(2):
                r = await send(transport, base + "/")
                assert r.status_code == 200 and r.content == b"ok"
            if not reused:
                await within(server.conns[0].peer_closed, "the client closes a connection it does not keep")
        assert server.connections == (1 if reused else 2)
        assert len(server.requests) == 2

    async def test_server_closing_an_idle_connection_is_noticed_before_writing(self, server: Server) -> None:
        base = server.serve(answer_with(response(headers=[KEEP_ALIVE]), close=True))
        async with HttpTransport() as transport:
            assert (await send(transport, base + "/")).content == b"ok"
            await within(server.conns[0].done, "the server closed the first connection")
            await until(lambda: not idle_usable(transport), "the client saw the idle connection close")
            r = await send(transport, base + "/")
        assert r.status_code == 200 and r.content == b"ok"
        assert len(server.requests) == 2
        assert [r.conn for r in server.requests] == [0, 1]

    async def test_connection_idle_longer_than_keepalive_is_not_reused(self, server: Server) -> None:
        base = server.serve(answer_ok)
        async with HttpTransport(keepalive_seconds=0) as transport:
            await send(transport, base + "/")
            await send(transport, base + "/")
            await within(server.conns[0].peer_closed, "the stale connection is closed")
        assert server.connections == 2

    # -- what goes on the wire ----------------------------------------------------------------

    async def test_send_puts_the_exact_bytes_on_the_wire(self, server: Server) -> None:
        reply = response(
            b"\x00binary\xff",
            status=b"201 Created",
            headers=[b"X-Reply: yes", b"X-Multi: a", b"X-Multi: b"],
        )
        base = server.serve(answer_with(reply))
        target = "/a%2Fb/?X=%2A~%20+&Y=%E4%B8%AD&Z=%3D"
        body = b"k=v&raw=\xff\x00"
        headers = [("Content-Type", "application/x-www-form-urlencoded"), ("X-Signature", "abc=")]
        async with HttpTransport() as transport:
            r = await send(transport, base + target, body, headers=headers)
        assert r.status_code == 201
        assert r.headers["x-reply"] == "yes" and r.headers.get_list("x-multi") == ["a", "b"]
        assert r.content == b"\x00binary\xff"
        [req] = server.requests
        assert req.request_line == b"POST " + target.encode() + b" HTTP/1.1"
        assert req.header(b"content-type") == [b"application/x-www-form-urlencoded"]
        assert req.header(b"x-signature") == [b"abc="]
        assert req.header(b"host") == [base.removeprefix("http://").encode()]
        assert req.header(b"content-length") == [b"%d" % len(body)]
        assert req.body == body

    async def test_send_keeps_a_given_host_and_gives_a_bodiless_get_no_length(self, server: Server) -> None:
        base = server.serve(answer_ok)
        async with HttpTransport() as transport:
            await send(transport, base + "/q?a=1", b"", method="GET", headers=[("Host", "api.example.com")])
        [req] = server.requests
        assert req.request_line == b"GET /q?a=1 HTTP/1.1"
        assert req.header(b"host") == [b"api.example.com"]
        assert req.header(b"content-length") == []

    async def test_httpx_client_streamed_body_goes_with_a_length(self, server: Server) -> None:
        base = server.serve(answer_ok)

        async def body() -> AsyncIterator[bytes]:
            yield b"a=1"
            yield b"&b=2"

        async with httpx.AsyncClient(transport=HttpTransport()) as client:
            r = await client.post(base + "/", content=body())
        assert r.status_code == 200
        [req] = server.requests
        assert req.header(b"transfer-encoding") == [] and req.header(b"content-length") == [b"7"]
        assert req.body == b"a=1&b=2"

    # -- parsing responses --------------------------------------------------------------------

    async def test_chunked_response_is_decoded_and_the_connection_reused(self, server: Server) -> None:
        reply = (
            OK + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n"
            b"2\r\n, \r\n"
            b"A\r\n0123456789\r\n"
            b"0\r\nX-Checksum: abc\r\nX-More: 1\r\n\r\n"
        )
        base = server.serve(answer_with(reply))
        async with HttpTransport() as transport:
            bodies = [(await send(transport, base + "/")).content for _ in range(2)]
        assert bodies == [b"hello, 0123456789"] * 2
        assert server.connections == 1

    @pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
    async def test_response_in_tiny_writes_is_parsed(self, server: Server, framing: str) -> None:
        body = b'{"Code":"OK","Message":"a body long enough to span many chunks"}'
        reply = response(body, framing=framing, headers=[b"Content-Type: application/json", b"X-A: 1"])
        base = server.serve(answer_with(reply, byte_by_byte=True, close=framing == "until-close"))
        async with HttpTransport() as transport:
            for _ in range(2):
                r = await send(transport, base + "/")
                assert r.status_code == 200 and r.content == body
                assert r.headers["content-type"] == "application/json" and r.headers["x-a"] == "1"
        # the whole response was consumed: nothing left over to spoil a kept-alive connection
        assert server.connections == (2 if framing == "until-close" else 1)

    async def test_interim_100_continue_is_skipped(self, server: Server) -> None:
        base = server.serve(answer_with(b"HTTP/1.1 100 Continue\r\n\r\n", response(b"final")))
        async with HttpTransport() as transport:
            r = await send(transport, base + "/")
            assert r.status_code == 200 and r.content == b"final"
            assert (await send(transport, base + "/")).content == b"final"
        assert server.connections == 1

    async def test_response_read_until_close_is_whole_and_not_reused(self, server: Server) -> None:
        head = OK + b"Connection: close\r\nContent-Type: text/plain\r\n\r\n"
        base = server.serve(answer_with(head, b"first part, ", b"second part, ", b"end", close=True))
        async with HttpTransport() as transport:
            for _ in range(2):
                r = await send(transport, base + "/")
                assert r.status_code == 200 and r.content == b"first part, second part, end"
        assert server.connections == 2

    @pytest.mark.parametrize(
        "reply",
        [
            pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
            pytest.param(b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", id="two-digit-status"),
            pytest.param(OK + b"Content-Length: abc\r\n\r\n", id="content-length-not-a-number"),
            pytest.param(OK + b"Content-Length: -1\r\n\r\n", id="content-length-negative"),
            pytest.param(
                OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="content-lengths-differ"
            ),
            pytest.param(OK + b"broken\r\nContent-Length: 0\r\n\r\n", id="header-without-colon"),
            pytest.param(OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", id="chunk-size-not-hex"),
            pytest.param(OK + b"X-Big: " + b"a" * 70_000, id="head-too-large"),
        ],
    )
    async def test_malformed_response_is_a_protocol_error(self, server: Server, reply: bytes) -> None:
        base = server.serve(answer_with(reply))
        async with HttpTransport() as transport:
            with pytest.raises(httpx.RemoteProtocolError) as info:
                await send(transport, base + "/")
            await within(server.conns[0].peer_closed, "the client drops a connection it cannot trust")
        assert_unknown(info.value)

    @pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
    async def test_body_over_max_response_bytes_is_a_read_error(self, server: Server, framing: str) -> None:
        async def sized(conn: Conn) -> None:  # a body of as many bytes as the path says
            while (req := await conn.request()) is not None:
                await conn.send(response(b"x" * int(req.target[1:]), framing=framing))
                if framing == "until-close":
                    return

        base = server.serve(sized)
        async with HttpTransport(max_response_bytes=100) as transport:
            assert len((await send(transport, base + "/100")).content) == 100
            with pytest.raises(httpx.ReadError) as info:
                await send(transport, base + "/101")
        assert_unknown(info.value)

    # -- the pool -----------------------------------------------------------------------------

    async def test_pool_limit_serialises_concurrent_requests(self, server: Server) -> None:
        base = server.serve(answer_ok)
        async with HttpTransport(max_connections=1) as transport:
            first, second = await asyncio.gather(send(transport, base + "/1"), send(transport, base + "/2"))
        assert first.headers["x-echo"] == "/1" and second.headers["x-echo"] == "/2"
        assert server.connections == 1 and server.max_open == 1
        assert [r.conn for r in server.requests] == [0, 0]

    async def test_no_free_connection_in_time_is_a_retryable_pool_timeout(self, server: Server) -> None:
        base = server.serve(hang_on_first_connection)
        async with HttpTransport(max_connections=1) as transport:
            busy = asyncio.create_task(send(transport, base + "/busy"))
            await server.wait_for_requests(1)
            with pytest.raises(httpx.PoolTimeout) as info:
                await send(transport, base + "/next", timeouts=httpx.Timeout(5, pool=0.1))
            assert_retryable(info.value)
            assert len(server.requests) == 1 and server.connections == 1
            busy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await busy
            # the slot was given back
            assert (await send(transport, base + "/after")).status_code == 200

    async def test_cancelled_request_closes_its_connection(self, server: Server) -> None:
        base = server.serve(hang_on_first_connection)
        async with HttpTransport() as transport:
            task = asyncio.create_task(send(transport, base + "/"))
            await server.wait_for_requests(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await within(server.conns[0].peer_closed, "the cancelled request's connection is closed")
            r = await send(transport, base + "/later")
        assert r.headers["x-echo"] == "/later"
        assert [r.conn for r in server.requests] == [0, 1]

    # -- errors before the request left -------------------------------------------------------

    async def test_https_to_a_plain_tcp_server_is_a_connect_error(self, server: Server) -> None:
        async def not_tls(conn: Conn) -> None:
            conn.raw = await conn.reader.read(1)
            await conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        base = server.serve(not_tls).replace("http://", "https://")
        async with HttpTransport() as transport:  # verify=True, the default
            with pytest.raises(httpx.ConnectError) as info:
                await send(transport, base + "/")
        assert_retryable(info.value)
        assert server.conns[0].raw == b"\x16"  # a TLS handshake record: what left was no request

    @pytest.mark.parametrize("failure", ["refused", "read-timeout"])
    async def test_httpx_client_errors_carry_the_request(self, server: Server, failure: str) -> None:
        url = f"http://127.0.0.1:{free_port()}/x" if failure == "refused" else server.serve(hang) + "/x"
        timeout = httpx.Timeout(5, read=0.2)
        async with httpx.AsyncClient(transport=HttpTransport(), timeout=timeout) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.post(url, content=b"x=1")
        assert isinstance(info.value, httpx.ConnectError if failure == "refused" else httpx.ReadTimeout)
        assert info.value.request.method == "POST" and str(info.value.request.url) == url
        # the client fills in a missing exc.request itself: the transport must do it on its own too
        request = httpx.Request("POST", url, content=b"x=1", extensions={"timeout": timeout.as_dict()})
        async with HttpTransport() as transport:
            with pytest.raises(httpx.TransportError) as info:
                await transport.handle_async_request(request)
        assert info.value.request is request

    async def test_request_after_aclose_is_a_connect_error(self, server: Server) -> None:
        base = server.serve(answer_ok)
        transport = HttpTransport()
        await send(transport, base + "/")
        await transport.aclose()
        await within(server.conns[0].peer_closed, "aclose closes the idle connection")
        with pytest.raises(httpx.ConnectError) as info:
            await send(transport, base + "/")
        assert_retryable(info.value)
        assert len(server.requests) == 1

    # -- bugs found in pipeline/transport.py (these fail until it is fixed) ---------------------

    async def test_negative_chunk_size_is_rejected_not_looped_on(self, server: Server) -> None:
        # int(text, 16) alone accepts "-6": the parser would step back and spin inside
        # data_received, hanging the whole event loop (no timeout could fire). Run in a
        # child process, which the kernel stops with SIGALRM if its loop hangs.
        base = server.serve(answer_with(OK + b"Transfer-Encoding: chunked\r\n\r\n-6\r\n"))
        child = (
            "import asyncio, signal, sys\n"
            "import httpx\n"
            "from pipeline.transport import HttpTransport\n"
            "from providers.base import WireRequest\n"
            "async def main() -> None:\n"
            "    async with HttpTransport() as t:\n"
            "        try:\n"
            "            await t.send(WireRequest('GET', sys.argv[1], []), httpx.Timeout(2))\n"
            "        except httpx.TransportError as exc:\n"
            "            print(type(exc).__name__)\n"
            "signal.alarm(3)\n"
            "asyncio.run(main())\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", child, base + "/"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, f"the client's event loop hung (exit status {done.returncode})"
        assert done.stdout.strip() == b"RemoteProtocolError"

    async def test_aclose_during_a_request_does_not_keep_its_connection(self, server: Server) -> None:
        # A connection finishing its exchange after aclose() must not go back to the pool
        # (nothing would close it: a leaked socket).
        async def held(conn: Conn) -> None:
            if await conn.request() is not None:
                await conn.server.release.wait()
                await conn.send(response())
                await conn.until_peer_closes()

        base = server.serve(held)
        transport = HttpTransport()
        task = asyncio.create_task(send(transport, base + "/"))
        try:
            await server.wait_for_requests(1)
            await transport.aclose()
            server.release.set()
            await asyncio.wait_for(task, WAIT)
            await within(server.conns[0].peer_closed, "a connection finishing after aclose() is closed")
        finally:
            for conns in transport._idle.values():  # do not leak it into the other tests
                for conn in conns:
                    conn.close()

    async def test_reset_during_a_body_read_until_close_is_a_read_error(self, server: Server) -> None:
        # A body delimited by the close ends with a clean close only: a reset midway must not
        # pass for a complete 200 response.
        async def reset_midway(conn: Conn) -> None:
            if await conn.request() is not None:
                await conn.send(OK + b'Connection: close\r\n\r\n{"Code":"O')
                conn.reset()

        base = server.serve(reset_midway)
        async with HttpTransport() as transport:
            with pytest.raises(httpx.ReadError) as info:
                await send(transport, base + "/")
        assert_unknown(info.value)

    async def test_response_to_head_has_no_body(self, server: Server) -> None:
        # A response to HEAD never has a body (RFC 9112 §6.3), whatever its Content-Length.
        base = server.serve(answer_with(OK + b"Content-Length: 1234\r\n\r\n"))
        async with httpx.AsyncClient(transport=HttpTransport(), timeout=httpx.Timeout(5, read=1)) as client:
            r = await client.head(base + "/")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "1234"

    async def test_send_keeps_a_query_without_a_path(self, server: Server) -> None:
        # "http://host:port?a=1": the query must not be taken for part of the origin.
        base = server.serve(answer_ok)
        async with HttpTransport() as transport:
            await send(transport, base + "?a=1", b"", method="GET")
        assert server.requests[0].target == b"/?a=1"

    @pytest.mark.parametrize(
        "head",
        [
            pytest.param(OK + b"Content-Length: 100000000\r\n\r\n", id="content-length"),
            pytest.param(OK + b"Transfer-Encoding: chunked\r\n\r\n", id="chunked"),
            pytest.param(OK + b"Connection: close\r\n\r\n", id="until-close"),  # this one passes
        ],
    )
    async def test_oversized_body_is_refused_as_it_arrives(self, server: Server, head: bytes) -> None:
        # max_response_bytes holds while the body arrives, for every framing: an endless or
        # over-declared body is refused early, not buffered until the read timeout.
        async def endless(conn: Conn) -> None:
            if await conn.request() is not None:
                data = b"x" * 200_000  # far over the limit, framing or slack aside
                chunk = b"%x\r\n%s\r\n" % (len(data), data) if b"chunked" in head else data
                await conn.send(head + chunk)
                await conn.until_peer_closes()

        base = server.serve(endless)
        async with HttpTransport(max_response_bytes=100) as transport:
            with pytest.raises(httpx.ReadError):
                await send(transport, base + "/", timeouts=httpx.Timeout(5, read=1))

    async def test_send_brackets_an_ipv6_host(self) -> None:
        # An IPv6 literal goes in brackets in Host: "[::1]:8080" (RFC 9110 §7.2).
        v6 = Server()
        try:
            await v6.start("::1")
        except OSError:
            pytest.skip("no IPv6 loopback here")
        try:
            async with HttpTransport() as transport:
                await send(transport, v6.url + "/")
            assert v6.requests[0].header(b"host") == [v6.url.removeprefix("http://").encode()]
        finally:
            await v6.stop()


# -- TLS: a real handshake with a test CA (trustme) ---------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """What the engine uses (verification on), trusting the test CA."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def tls_server(ca: trustme.CA, *hosts: str, not_after: datetime.datetime | None = None) -> Server:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if not_after is None:
        ca.issue_cert(*hosts).configure_cert(ctx)
    else:
        not_before = not_after - datetime.timedelta(days=30)
        ca.issue_cert(*hosts, not_before=not_before, not_after=not_after).configure_cert(ctx)
    srv = Server()
    await srv.start(tls=ctx)
    return srv


def abort_after(*parts: bytes) -> Handler:
    """Answer the first request with ``parts``, then close the TCP connection without a TLS close_notify."""

    async def handler(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(*parts)
            conn.writer.transport.abort()

    return handler


CLOSE_FRAMED = OK + b"Connection: close\r\nContent-Type: application/json\r\n\r\n"


@pytest.mark.anyio
class TestTls:
    @pytest.fixture(params=["asyncio", "uvloop"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
        # The CLI runs on uvloop when it is installed; the two loops end TLS sessions differently.
        return ("asyncio", {"use_uvloop": request.param == "uvloop"})

    async def test_body_framed_by_a_close_with_close_notify_is_complete(self, ca: trustme.CA) -> None:
        srv = await tls_server(ca, "127.0.0.1")
        try:
            base = srv.serve(answer_with(CLOSE_FRAMED, b'{"Code":', b'"OK"}', close=True))
            async with HttpTransport(verify=client_context(ca)) as transport:
                r = await send(transport, base + "/")
            assert r.status_code == 200 and r.content == b'{"Code":"OK"}'
        finally:
            await srv.stop()

    @pytest.mark.parametrize(
        "reply",
        [
            pytest.param(CLOSE_FRAMED + b'{"Code":"O', id="close-framed-without-close-notify"),
            pytest.param(OK + b'Content-Length: 13\r\n\r\n{"Code":"O', id="content-length-short"),
            pytest.param(OK + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"Cod\r\n', id="no-last-chunk"),
        ],
    )
    async def test_body_cut_short_is_never_complete(self, ca: trustme.CA, reply: bytes) -> None:
        srv = await tls_server(ca, "127.0.0.1")
        try:
            base = srv.serve(abort_after(reply))
            async with HttpTransport(verify=client_context(ca)) as transport:
                with pytest.raises(httpx.RemoteProtocolError) as info:
                    await send(transport, base + "/")
            assert_unknown(info.value)  # the request was processed, maybe: the batch is unknown
            if b"close" in reply:
                assert "close_notify" in str(info.value)
        finally:
            await srv.stop()

    @pytest.mark.parametrize(
        ("cert_hosts", "trusted", "reason"),
        [
            pytest.param(("127.0.0.1",), False, "unable to get local issuer certificate", id="untrusted-ca"),
            pytest.param(("sluice.invalid",), True, "IP address mismatch", id="wrong-host"),
        ],
    )
    async def test_certificate_not_accepted_is_fatal_with_the_reason(
        self, ca: trustme.CA, cert_hosts: tuple[str, ...], trusted: bool, reason: str
    ) -> None:
        srv = await tls_server(ca, *cert_hosts)
        try:
            base = srv.serve(answer_ok)
            verify: bool | ssl.SSLContext = client_context(ca) if trusted else True
            async with HttpTransport(verify=verify) as transport:
                with pytest.raises(httpx.ConnectError) as info:
                    await send(transport, base + "/")
            outcome = classify_transport_error(info.value)
            assert outcome.outcome is Outcome.FATAL and outcome.code == CERTIFICATE_CODE
            message = outcome.message or ""
            assert reason in message and "CERTIFICATE_VERIFY_FAILED" in message
            assert base.removeprefix("https://") in message  # names the endpoint
            assert srv.requests == []  # nothing was sent
        finally:
            await srv.stop()

    async def test_ca_file_is_added_to_the_trusted_cas(self, ca: trustme.CA, tmp_path: Path) -> None:
        srv = await tls_server(ca, "127.0.0.1")
        try:
            base = srv.serve(answer_ok)
            bundle = tmp_path / "company-ca.pem"
            ca.cert_pem.write_to_path(str(bundle))
            async with HttpTransport(ca_file=str(bundle)) as transport:
                for i in range(3):  # and the TLS connection is kept alive between them
                    r = await send(transport, f"{base}/{i}")
                    assert r.status_code == 200 and r.headers["x-echo"] == f"/{i}"
                assert idle_usable(transport)
                context = transport._tls_context()
            assert srv.connections == 1 and len(srv.requests) == 3
            # added, not replacing: the system's CAs are still there next to the test CA
            default_count = len(ssl.create_default_context().get_ca_certs())
            assert len(context.get_ca_certs()) == default_count + 1
        finally:
            await srv.stop()

    async def test_expired_certificate_is_fatal(self, ca: trustme.CA) -> None:
        yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        srv = await tls_server(ca, "127.0.0.1", not_after=yesterday)
        try:
            base = srv.serve(answer_ok)
            async with HttpTransport(verify=client_context(ca)) as transport:
                with pytest.raises(httpx.ConnectError) as info:
                    await send(transport, base + "/")
            outcome = classify_transport_error(info.value)
            assert outcome.outcome is Outcome.FATAL and outcome.code == CERTIFICATE_CODE
            assert "certificate has expired" in (outcome.message or "")
            assert srv.requests == []
        finally:
            await srv.stop()

    async def test_certificate_error_of_httpx_own_transport_is_fatal_too(self, ca: trustme.CA) -> None:
        # Any httpx transport can be handed to the engine: the SSL error is found in the cause chain.
        srv = await tls_server(ca, "sluice.invalid")
        try:
            base = srv.serve(answer_ok)
            transport = httpx.AsyncHTTPTransport(verify=client_context(ca))
            async with httpx.AsyncClient(transport=transport) as client:
                with pytest.raises(httpx.ConnectError) as info:
                    await client.post(base + "/", content=b"x=1")
            outcome = classify_transport_error(info.value)
            assert outcome.outcome is Outcome.FATAL and "IP address mismatch" in (outcome.message or "")
        finally:
            await srv.stop()
