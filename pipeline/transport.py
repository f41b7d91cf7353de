"""Transport: HTTP/1.1 with a keep-alive pool, on asyncio protocols, behind httpx's interface.

httpx stays the client API (tests inject ``httpx.MockTransport``; anything speaking
``httpx.AsyncBaseTransport`` can be given to the engine), but the work per request is
what decides how fast a bulk sender drains a list: with aiohttp under httpx a whole
sluice run took 17.4 µs of CPU per recipient, with this module 9.8 µs (200 000 recipients,
batches of 100, on a 2-core VM; benchmarks/README.md). It does one thing: a request, its
whole response, on a kept-alive connection, directly or through a forward proxy (``CONNECT``
for HTTPS); no redirects, cookies or decompression (sluice sends no ``Accept-Encoding``).

Responses are parsed by llhttp (``httptools``, the parser under Node.js and uvicorn), each
byte once as it arrives. It was measured against h11 and the hand-written parser it replaced
(``python -m benchmarks.bench_parser``): per provider response, 2.0–10 µs against 3.3–57 µs
(hand-written, which rescanned its buffer on every packet) and 52–307 µs (h11).

Every error says *when* it happened, which is what decides a retry:

* before a byte of the request left (refused, unreachable, connect timeout, TLS
  handshake, a proxy's refusal of ``CONNECT``, no free connection in time) → ``httpx.ConnectError`` /
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
import socket
import ssl
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

import httptools
import httpx

from pipeline.proxy import DIRECT_ROUTE, Proxy, Route, authority, bypasses_proxy, environment_proxies
from providers.base import Response, WireRequest, WireResponse

__all__ = ("TLS_NOT_VERIFIED", "HttpTransport", "HttpxWireTransport", "WireTransport", "wire_transport")

TLS_NOT_VERIFIED = (
    "verify_tls = false: the provider's certificate is not checked; anyone on the path can read "
    "and change the requests, credentials and signatures included"
)

_MAX_HEAD = 64 * 1024

_Result = tuple[int, list[tuple[bytes, bytes]], bytes]
"""A response: status, raw headers, body."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: one request at a time, its response parsed as it arrives.

    The bytes go through llhttp (``httptools``) once each, as they come; this class only
    decides what a response's end means (its framing, keep-alive, limits, close_notify).
    """

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[_Result] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._head_done = False
        self._until_close = False  # the body ends with the connection
        self._done = False
        self._fault: httpx.TransportError | None = None  # raised from a parser callback
        self._no_body = False  # a response to HEAD
        self.keep_alive = True
        self._tls = False
        self._close_notify = False  # a TLS peer ended the session properly
        self._tunnel: asyncio.Future[bytes] | None = None  # the proxy's answer to CONNECT
        self._tunnel_buf = bytearray()

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        waiter = self._waiter
        parser = self._parser
        if waiter is None or waiter.done() or parser is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(waiter, httpx.RemoteProtocolError("the server switched protocols (an upgrade)"))
            return
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            if self._fault is None and not self._done:
                self._fault = httpx.RemoteProtocolError(f"malformed response: {exc}")
        if self._fault is not None:
            self._fail(waiter, self._fault)
            return
        if not self._head_done:
            self._head_size += len(data)
            if self._head_size > _MAX_HEAD:
                self._fail(waiter, httpx.RemoteProtocolError("response head too large"))

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
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ConnectionError("the proxy closed the connection"))
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        what = "the server closed the connection before a complete response"
        if exc is None and self._head_done and self._until_close and self._fault is None:
            if not self._tls or self._close_notify:
                self._finish(waiter)
                return
            what = "the TLS connection ended without close_notify: the body it framed may be cut short"
        if exc is not None:
            waiter.set_exception(httpx.ReadError(f"{what}: {exc!r}"))
        else:
            waiter.set_exception(httpx.RemoteProtocolError(what))

    # -- llhttp's callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:  # bytes beyond the response: do not reuse the connection
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head: a chunked body's trailer fields, not headers
            self._headers.append((name, value.rstrip(b" \t")))  # llhttp keeps trailing whitespace

    def on_headers_complete(self) -> None:
        if self._done:
            return
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim response (100 Continue): the real one follows
        self._status = status
        self._head_done = True
        if self._no_body:
            self.keep_alive = False  # llhttp would wait for a body a HEAD response has not
            self._finish_now()
            return
        chunked = length = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                if value.lower() != b"chunked":  # a coding sluice cannot undo: its body is unreadable
                    self._fault = httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {value[:40]!r}")
                    raise self._fault
                chunked = True
            elif lower == b"content-length":
                length = True
                if int(value) > self._max_body:  # llhttp has checked the digits
                    self._fault = httpx.ReadError(f"response body of {int(value)} bytes is over the limit")
                    raise self._fault  # stops llhttp
        if not (chunked or length) and status not in (204, 304):
            self._until_close = True
        if self._until_close:
            self.keep_alive = False

    def on_body(self, data: bytes) -> None:
        if self._done:
            return
        self._body_size += len(data)
        if self._body_size > self._max_body:
            self._fault = httpx.ReadError("response body too large")
            raise self._fault  # stops llhttp
        self._body.append(data)

    def on_message_complete(self) -> None:
        if self._done or not self._head_done:
            if not self._done:  # the end of an interim response
                self._headers = []
            return
        assert self._parser is not None
        if not self._parser.should_keep_alive():
            self.keep_alive = False
        self._finish_now()

    # -- one exchange ---------------------------------------------------------------
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, data: bytes, read_timeout: float | None, *, head: bool = False) -> _Result:
        """Write ``data``; the status, headers and body of the response to it."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Result] = loop.create_future()
        self._waiter = waiter
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._body = []
        self._body_size = self._head_size = 0
        self._head_done = self._until_close = self._done = False
        self._fault = None
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
            self._parser = None

    def _timed_out(self, waiter: asyncio.Future[_Result], seconds: float) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout(f"no complete response within {seconds} s"))

    def _fail(self, waiter: asyncio.Future[_Result], exc: httpx.TransportError) -> None:
        if not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _finish_now(self) -> None:
        self._done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._fault is None:
            self._finish(waiter)

    def _finish(self, waiter: asyncio.Future[_Result]) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result((self._status, self._headers, body))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- a tunnel through a proxy (CONNECT) --------------------------------------------------
    async def open_tunnel(self, request: bytes) -> int:
        """Send a CONNECT ``request`` to the proxy; the status of its answer."""
        assert self.transport is not None
        self._tunnel = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            head = await self._tunnel
        finally:
            self._tunnel = None
        status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            raise ConnectionError(f"the proxy answered CONNECT with {head[:40]!r}")
        return int(status_line[1])

    def _tunnel_data(self, data: bytes) -> None:
        assert self._tunnel is not None
        self._tunnel_buf += data
        end = self._tunnel_buf.find(b"\r\n\r\n")
        if end >= 0 and not self._tunnel.done():
            self._tunnel.set_result(bytes(self._tunnel_buf[:end]))
            self._tunnel_buf.clear()
        elif len(self._tunnel_buf) > _MAX_HEAD and not self._tunnel.done():
            self._tunnel.set_exception(ConnectionError("the proxy's answer to CONNECT is too large"))

    def tunnel_secured(self, transport: asyncio.Transport) -> None:
        """The TLS session to the origin now runs inside the tunnel, on ``transport``."""
        self.transport = transport
        self._tls = True


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


class HttpTransport(httpx.AsyncBaseTransport):
    """A pool of kept-alive HTTP/1.1 connections, at most ``max_connections`` open at once.

    ``proxy`` (an ``http://`` URL, or a :class:`Proxy`) carries every request; without it,
    ``trust_env`` reads the proxy environment variables as httpx does (:func:`environment_proxies`).
    HTTPS goes through a proxy in a ``CONNECT`` tunnel, the TLS session to the provider inside it.
    ``ca_file`` adds a CA bundle to the system's trusted CAs (``verify`` true).
    """

    def __init__(
        self,
        *,
        max_connections: int = 64,
        verify: bool | ssl.SSLContext = True,
        keepalive_seconds: float = 15.0,
        max_response_bytes: int = 16 << 20,
        proxy: str | Proxy | None = None,
        trust_env: bool = True,
        ca_file: str | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max_connections = max_connections
        self._verify = verify
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._keepalive = keepalive_seconds
        self._max_body = max_response_bytes
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._origins: dict[str, tuple[str, str, int]] = {}
        self._routes: dict[tuple[str, str, int], Route] = {}
        self._proxy = Proxy(proxy) if isinstance(proxy, str) else proxy
        self._env = environment_proxies() if trust_env and self._proxy is None else {}
        self._closed = False

    # -- the engine's path: a WireRequest ------------------------------------------------
    async def send(self, request: WireRequest, timeouts: httpx.Timeout) -> WireResponse:
        """Send ``request``; its whole response. Raises ``httpx.TransportError`` subclasses."""
        origin, target = self._split(request.url)
        route = self._routes.get(origin) or self._route(origin)
        headers = request.headers
        if route.target_prefix:
            target = route.target_prefix + target
            headers = [*headers, *route.proxy_headers]
        data = _head(request.method, target, origin, headers, len(request.content)) + request.content
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

    def _route(self, origin: tuple[str, str, int]) -> Route:
        """How to reach ``origin`` (worked out once per origin)."""
        scheme, host, port = origin
        proxy = self._proxy
        if proxy is None and self._env and not bypasses_proxy(host, self._env.get("no", "")):
            url = self._env.get(scheme) or self._env.get("all")
            if url:
                try:
                    proxy = Proxy(url)
                except ValueError as exc:
                    raise httpx.ProxyError(f"{scheme.upper()}_PROXY: {exc}") from None
        if proxy is None:
            route = DIRECT_ROUTE
        else:
            auth = [("Proxy-Authorization", proxy.authorization)] if proxy.authorization else []
            target = authority(host, port)
            if scheme == "http":
                route = Route((proxy.host, proxy.port), target_prefix=f"http://{target}", proxy_headers=auth)
            else:
                lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
                lines += [f"{name}: {value}" for name, value in auth]
                connect = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                route = Route((proxy.host, proxy.port), connect_request=connect)
        self._routes[origin] = route
        return route

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
        try:
            route = self._routes.get(origin) or self._route(origin)
            target = route.target_prefix + url.raw_path.decode("ascii")
            if route.target_prefix:
                headers += route.proxy_headers
            data = _head(request.method, target, origin, headers, len(body)) + body
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
        route = self._routes.get(origin) or self._route(origin)
        tls = self._tls_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                if route.proxy is None:
                    conn = await self._open(host, port, tls, host)
                else:
                    conn = await self._through_proxy(route, host, port, tls)
        except TimeoutError:
            via = f" through the proxy {authority(*route.proxy)}" if route.proxy else ""
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port}{via} took over {connect_timeout} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            via = f" through the proxy {authority(*route.proxy)}" if route.proxy else ""
            raise httpx.ConnectError(f"cannot connect to {host}:{port}{via}: {exc}") from exc
        return conn

    async def _open(self, host: str, port: int, tls: ssl.SSLContext | None, server_name: str) -> _Connection:
        loop = asyncio.get_running_loop()
        max_body = self._max_body
        _, conn = await loop.create_connection(
            lambda: _Connection(max_body), host, port, ssl=tls, server_hostname=server_name if tls else None
        )
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def _through_proxy(
        self, route: Route, host: str, port: int, tls: ssl.SSLContext | None
    ) -> _Connection:
        assert route.proxy is not None
        proxy_host, proxy_port = route.proxy
        try:
            conn = await self._open(proxy_host, proxy_port, None, proxy_host)
        except OSError as exc:
            raise OSError(f"cannot reach the proxy {authority(proxy_host, proxy_port)}: {exc}") from exc
        if tls is None:
            return conn  # plain http: requests go to the proxy in absolute form
        try:
            status = await conn.open_tunnel(route.connect_request)
            if status != 200:
                raise ConnectionRefusedError(
                    f"the proxy {authority(proxy_host, proxy_port)} refused CONNECT with {status}"
                    f" {_REASONS.get(status, '')}".rstrip()
                )
            assert conn.transport is not None
            loop = asyncio.get_running_loop()
            secured = await loop.start_tls(conn.transport, conn, tls, server_hostname=host)
            if secured is None:
                raise ConnectionError("the TLS session inside the tunnel did not start")
            conn.tunnel_secured(secured)
        except BaseException:
            conn.close()
            raise
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self._verify, ssl.SSLContext):
                self._ssl = self._verify
            elif self._verify:
                self._ssl = ssl.create_default_context()
                if self._ca_file:
                    self._ssl.load_verify_locations(cafile=self._ca_file)  # added to the system's CAs
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


_REASONS = {
    403: "Forbidden",
    407: "Proxy Authentication Required",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class WireTransport(Protocol):
    """The seam the dispatcher sends through: :class:`HttpTransport` in production, a fake in tests."""

    async def send(self, request: WireRequest, timeouts: httpx.Timeout) -> Response: ...


class HttpxWireTransport:
    """Any httpx transport (``httpx.MockTransport`` in tests) behind :class:`WireTransport`'s ``send``.

    The transport directly, not an AsyncClient: no auth, redirects, cookies or hooks to run."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def send(self, request: WireRequest, timeouts: httpx.Timeout) -> Response:
        http_request = request.to_httpx()
        http_request.extensions["timeout"] = timeouts.as_dict()
        response = await self.transport.handle_async_request(http_request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


def wire_transport(transport: httpx.AsyncBaseTransport | WireTransport) -> WireTransport:
    """``transport`` if it sends :class:`WireRequest` itself, else an httpx transport adapted."""
    if isinstance(transport, httpx.AsyncBaseTransport) and not isinstance(transport, HttpTransport):
        return HttpxWireTransport(transport)
    return transport
