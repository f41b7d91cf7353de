"""Transport: HTTP/1.1 with a keep-alive pool, on asyncio protocols, behind httpx's interface.

httpx stays the client API (tests inject ``httpx.MockTransport``; anything speaking
``httpx.AsyncBaseTransport`` can be given to the engine), but the work per request is
what decides how fast a bulk sender drains a list: with aiohttp under httpx a whole
sluice run took 17.4 µs of CPU per recipient, with this module 9.8 µs (200 000 recipients,
batches of 100, on a 2-core VM; benchmarks/README.md). It does one thing: a request, its
whole response, on a kept-alive connection; no redirects, cookies, proxies or
decompression (sluice sends no ``Accept-Encoding``).

Every error says *when* it happened, which is what decides a retry:

* before a byte of the request left (refused, unreachable, connect timeout, TLS
  handshake, no free connection in time) → ``httpx.ConnectError`` /
  ``httpx.ConnectTimeout`` / ``httpx.PoolTimeout``: provably not sent, safe to retry;
* after (read timeout, connection lost or reset, a malformed or truncated response)
  → ``httpx.ReadTimeout`` / ``httpx.RemoteProtocolError`` / ``httpx.ReadError``:
  the provider may have processed it.

A body cut short is never returned as complete: a Content-Length not reached or a
chunked body without its last chunk is an error, and so is a body framed by the close
of a TLS connection that ended without the server's close_notify (a truncation an
attacker or a middlebox can make, RFC 9112 §9.8).

A kept-alive connection the server has closed is noticed (and dropped) before a
request is written to it; one idle longer than ``keepalive_seconds`` is not reused.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Sequence
from types import TracebackType

import httpx

from providers.base import WireRequest, WireResponse

__all__ = ("HttpTransport",)

_MAX_HEAD = 64 * 1024
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_UNTIL_CLOSE = -1
_CHUNKED = -2

_Result = tuple[int, list[tuple[bytes, bytes]], bytes]
"""A response: status, raw headers, body."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[_Result] | None = None
        self._buf = bytearray()
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._body_at = 0
        self._need = 0
        self._no_body = False  # a response to HEAD
        self.keep_alive = True
        self._tls = False
        self._close_notify = False  # a TLS peer ended the session properly

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._buf += data
        try:
            self._parse(waiter)
        except httpx.TransportError as exc:
            waiter.set_exception(exc)
            self.close()

    def eof_received(self) -> bool:
        if self._tls:
            # All decrypted data has been delivered by now. After a close_notify the TLS
            # object reads as ended (b""); after a bare TCP FIN it wants more data (asyncio),
            # and uvloop does not call this at all then.
            tls_object = self.transport.get_extra_info("ssl_object") if self.transport else None
            try:
                self._close_notify = tls_object is not None and tls_object.read(1) == b""
            except ssl.SSLError:
                self._close_notify = False
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        what = "the server closed the connection before a complete response"
        if exc is None and self._head is not None and self._need == _UNTIL_CLOSE:
            if not self._tls or self._close_notify:
                self._finish(waiter, bytes(self._buf[self._body_at :]))
                return
            what = "the TLS connection ended without close_notify: the body it framed may be cut short"
        if exc is not None:
            waiter.set_exception(httpx.ReadError(f"{what}: {exc!r}"))
        else:
            waiter.set_exception(httpx.RemoteProtocolError(what))

    # -- one exchange ---------------------------------------------------------------
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, data: bytes, read_timeout: float | None, *, head: bool = False) -> _Result:
        """Write ``data``; the status, headers and body of the response to it."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Result] = loop.create_future()
        self._waiter = waiter
        self._buf.clear()
        self._head = None
        self._no_body = head
        self.transport.write(data)
        timer = None
        if read_timeout is not None:
            timer = loop.call_later(read_timeout, self._timed_out, waiter, read_timeout)
        try:
            return await waiter
        except BaseException:
            self.close()  # cancelled or failed mid-exchange: what follows on the wire is unknowable
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[_Result], seconds: float) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout(f"no complete response within {seconds} s"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing --------------------------------------------------------------------
    def _parse(self, waiter: asyncio.Future[_Result]) -> None:
        buf = self._buf
        while self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head too large")
                return
            status, headers, keep_alive = _parse_head(bytes(buf[:end]))
            if 100 <= status < 200:  # an interim response (100 Continue): the real one follows
                del buf[: end + 4]
                continue
            self._head = (status, headers)
            self._body_at = end + 4
            self.keep_alive = keep_alive
            self._need = 0 if self._no_body else _body_length(status, headers)
            if self._need > self._max_body:
                raise httpx.ReadError(f"response body of {self._need} bytes is over the limit")
            if self._need == _UNTIL_CLOSE:
                self.keep_alive = False
        need, at = self._need, self._body_at
        if need >= 0:
            if len(buf) - at >= need:
                if len(buf) - at > need:
                    self.keep_alive = False  # bytes beyond the response: do not reuse
                self._finish(waiter, bytes(buf[at : at + need]))
        elif need == _CHUNKED:
            body = _dechunk(buf, at)
            if body is not None:
                self._finish(waiter, body)
            elif len(buf) - at > self._max_body + _MAX_HEAD:  # chunk framing allowed for
                raise httpx.ReadError("response body too large")
        elif len(buf) - at > self._max_body:
            raise httpx.ReadError("response body too large")

    def _finish(self, waiter: asyncio.Future[_Result], body: bytes) -> None:
        assert self._head is not None
        if len(body) > self._max_body:
            waiter.set_exception(httpx.ReadError("response body too large"))
            self.close()
            return
        waiter.set_result((self._head[0], self._head[1], body))


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]], bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    connection = b",".join(v.lower() for k, v in headers if k.lower() == b"connection")
    if parts[0] == b"HTTP/1.0":
        keep_alive = b"keep-alive" in connection
    else:
        keep_alive = b"close" not in connection
    return int(parts[1]), headers, keep_alive


def _body_length(status: int, headers: list[tuple[bytes, bytes]]) -> int:
    if status in (204, 304):
        return 0
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            if value.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                return _CHUNKED
            return _UNTIL_CLOSE
        if lower == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
    return _UNTIL_CLOSE if length is None else length


def _dechunk(buf: bytearray, at: int) -> bytes | None:
    """The body of a complete chunked message starting at ``at``, or None while incomplete."""
    out: list[bytes] = []
    pos = at
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):  # int(..., 16) alone would take "-6" and loop
            raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailers, up to the empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(out)
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
        out.append(bytes(buf[pos : pos + size]))
        pos += size + 2


class HttpTransport(httpx.AsyncBaseTransport):
    """A pool of kept-alive HTTP/1.1 connections, at most ``max_connections`` open at once."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        verify: bool | ssl.SSLContext = True,
        keepalive_seconds: float = 15.0,
        max_response_bytes: int = 16 << 20,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max_connections = max_connections
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._keepalive = keepalive_seconds
        self._max_body = max_response_bytes
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._origins: dict[str, tuple[str, str, int]] = {}
        self._closed = False

    # -- the engine's path: a WireRequest ------------------------------------------------
    async def send(self, request: WireRequest, timeouts: httpx.Timeout) -> WireResponse:
        """Send ``request``; its whole response. Raises ``httpx.TransportError`` subclasses."""
        origin, target = self._split(request.url)
        data = _head(request.method, target, origin, request.headers, len(request.content)) + request.content
        status, raw_headers, body = await self._round_trip(origin, data, timeouts)
        return WireResponse(status, raw_headers, body)

    def _split(self, url: str) -> tuple[tuple[str, str, int], str]:
        start = url.find("://") + 3
        ends = [i for i in (url.find("/", start), url.find("?", start)) if i >= 0]
        cut = min(ends) if ends else len(url)
        base, target = url[:cut], url[cut:] or "/"
        if target[0] == "?":
            target = "/" + target
        origin = self._origins.get(base)
        if origin is None:
            parsed = httpx.URL(base)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise httpx.UnsupportedProtocol(f"cannot send to {base!r}: http(s) URLs only")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            origin = self._origins[base] = (parsed.scheme, parsed.host, port)
        return origin, target

    # -- httpx's interface: anything else (reconcile, clock sync, users' clients) -----------
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https") or not url.host:
            raise httpx.UnsupportedProtocol(f"cannot send to {url}: http(s) URLs only", request=request)
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        t = request.extensions.get("timeout", {})
        timeouts = httpx.Timeout(
            connect=t.get("connect"), read=t.get("read"), write=t.get("write"), pool=t.get("pool")
        )
        data = _head(request.method, url.raw_path.decode("ascii"), origin, headers, len(body)) + body
        try:
            status, raw_headers, content = await self._round_trip(
                origin, data, timeouts, head=request.method == "HEAD"
            )
        except httpx.TransportError as exc:
            exc.request = request
            raise
        return httpx.Response(status, headers=raw_headers, content=content, request=request)

    # -- the pool -------------------------------------------------------------------------
    async def _round_trip(
        self, origin: tuple[str, str, int], data: bytes, timeouts: httpx.Timeout, *, head: bool = False
    ) -> _Result:
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max_connections)
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), timeouts.pool)
            except TimeoutError:
                raise httpx.PoolTimeout(f"no free connection within {timeouts.pool} s") from None
        else:
            await slots.acquire()
        try:
            conn = await self._connection(origin, timeouts.connect)
            result = await conn.exchange(data, timeouts.read, head=head)
            if conn.keep_alive and conn.usable() and not self._closed:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()
            return result
        finally:
            slots.release()

    async def _connection(self, origin: tuple[str, str, int], connect_timeout: float | None) -> _Connection:
        idle = self._idle.get(origin)
        if idle:
            stale_before = time.monotonic() - self._keepalive
            while idle:
                conn = idle.pop()
                if conn.usable() and conn.idle_since >= stale_before:
                    return conn
                conn.close()
        return await self._connect(origin, connect_timeout)

    async def _connect(self, origin: tuple[str, str, int], connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if scheme == "https" else None
        max_body = self._max_body
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(max_body), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {connect_timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self._verify, ssl.SSLContext):
                self._ssl = self._verify
            elif self._verify:
                self._ssl = ssl.create_default_context()
            else:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._ssl = ctx
        return self._ssl

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


def _head(
    method: str, target: str, origin: tuple[str, str, int], headers: Sequence[tuple[str, str]], length: int
) -> bytes:
    """The request line and headers; ``Host`` and ``Content-Length`` added when absent."""
    lines = [f"{method} {target} HTTP/1.1"]
    has_host = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length" or lower == "transfer-encoding":
            continue
        if lower == "host":
            has_host = True
        lines.append(f"{name}: {value}")
    if not has_host:
        scheme, host, port = origin
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        default = 443 if scheme == "https" else 80
        lines.append(f"host: {host}" if port == default else f"host: {host}:{port}")
    if length or method not in ("GET", "HEAD"):
        lines.append(f"content-length: {length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
