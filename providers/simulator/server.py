"""HTTP/1.1 plumbing for the simulator, written on ``asyncio.Protocol``.

A framework cannot drop a connection at the exact moments a fault injector
needs (after the head, after the body was processed, instead of a response),
so requests are parsed here: request line, headers, ``Content-Length``
bodies, keep-alive, ``Connection: close``, ``Expect: 100-continue``.

One request per connection is in progress at a time: pipelined requests stay
in the buffer until the previous response has gone out, so responses always
leave in request order. An :class:`App` receives each request and must end it
with exactly one of :meth:`Connection.respond`, :meth:`Connection.drop` or
:meth:`Connection.reset`, at once or after a delay (a timer, never a sleep).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import socket
import ssl
import struct
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, cast
from urllib.parse import unquote_plus

__all__ = (
    "MAX_BODY",
    "MAX_HEAD",
    "App",
    "Connection",
    "JsonEndpoint",
    "Request",
    "Router",
    "parse_urlencoded",
    "start_server",
    "unquote_form",
)

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_PIPELINE_LIMIT = 1024 * 1024  # buffered bytes past a busy request before reading pauses
JSON = b"application/json;charset=utf-8"

_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
_LINGER_RST = struct.pack("ii", 1, 0)


def unquote_form(s: str) -> str:
    """``urllib.parse.unquote_plus`` (UTF-8, errors replaced), at C speed for well-formed input.

    The quoted-printable decoder turns ``=XX`` into a byte; with ``%`` written
    as ``=`` it percent-decodes. It is used only when that is provably the same:
    ASCII input without ``=``, CR or LF, and every ``%`` followed by two hex
    digits (then exactly two characters disappear per ``%``).
    """
    if "%" not in s:
        return s.replace("+", " ") if "+" in s else s
    if "=" in s or "\r" in s or "\n" in s or not s.isascii():
        return unquote_plus(s)
    out = binascii.a2b_qp(s.replace("+", " ").replace("%", "="))
    if len(out) != len(s) - 2 * s.count("%"):
        return unquote_plus(s)  # a malformed escape
    return out.decode("utf-8", "replace")


def parse_urlencoded(s: str) -> list[tuple[str, str]]:
    """``urllib.parse.parse_qsl(s, keep_blank_values=True)``, faster."""
    return [
        (unquote_form(k), unquote_form(v))
        for k, _, v in (part.partition("=") for part in s.split("&") if part)
    ]


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Request:
    """A parsed request; ``headers`` are keyed by lower-case name (repeats joined with ``, ``)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "state", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.path, _, self.query = target.partition("?")
        self.body = b""
        conn = headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        self.state: object = None  # for the app, between on_head and handle


class App(Protocol):
    def on_head(self, request: Request) -> bool:
        """The head has arrived (the body may not have): False drops the connection now."""
        ...

    def handle(self, request: Request, conn: Connection) -> None:
        """The whole request has arrived; end it through ``conn``."""
        ...


class Router:
    """Routes by exact path; unknown paths get a plain 404."""

    def __init__(self, routes: Mapping[str, App]) -> None:
        self._routes = dict(routes)

    def on_head(self, request: Request) -> bool:
        app = self._routes.get(request.path)
        return True if app is None else app.on_head(request)

    def handle(self, request: Request, conn: Connection) -> None:
        app = self._routes.get(request.path)
        if app is None:
            conn.respond(404, b'{"error":"no such path"}')
        else:
            app.handle(request, conn)


class JsonEndpoint:
    """``GET`` answers ``render()`` (JSON bytes); no faults, no delay."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render

    def on_head(self, request: Request) -> bool:
        return True

    def handle(self, request: Request, conn: Connection) -> None:
        if request.method == "GET":
            conn.respond(200, self._render())
        else:
            conn.respond(405, b'{"error":"use GET"}', [("Allow", "GET")])


class Connection(asyncio.Protocol):
    """One client connection: parses requests and writes the app's answers."""

    def __init__(self, app: App, live: set[Connection]) -> None:
        self._app = app
        self._live = live
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: Request | None = None  # head parsed, body still arriving
        self._need = 0
        self._current: Request | None = None  # handed to the app, not yet answered
        self._timer: asyncio.TimerHandle | None = None
        self._looping = False
        self._read_paused = False
        self._write_paused = False

    # -- asyncio callbacks ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._current is None:
            self._process()
        elif len(self._buf) > _PIPELINE_LIMIT and self._transport is not None:
            self._transport.pause_reading()
            self._read_paused = True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._current is None:
            self._process()

    # -- answering (called by the app) ------------------------------------------
    def respond(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_type: bytes = JSON,
        delay: float = 0.0,
    ) -> None:
        """Send a response, after ``delay`` seconds if positive."""
        req = self._current
        close = req is None or not req.keep_alive
        out = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            status,
            _REASONS.get(status, b"Status"),
            content_type,
            len(body),
        )
        for name, value in headers:
            out += f"{name}: {value}\r\n".encode("latin-1")
        out += b"Connection: close\r\n\r\n" if close else b"\r\n"
        self._finish(out + body, close, False, delay)

    def drop(self, *, delay: float = 0.0) -> None:
        """Close without a response (an orderly FIN)."""
        self._finish(b"", True, False, delay)

    def reset(self, *, delay: float = 0.0) -> None:
        """Abort without a response: SO_LINGER 0, so the peer gets an RST."""
        self._finish(b"", True, True, delay)

    def close(self) -> None:
        """Close at once, whatever is in progress (server shutdown)."""
        if self._transport is not None:
            self._transport.close()

    def _finish(self, data: bytes, close: bool, rst: bool, delay: float) -> None:
        if delay > 0:
            self._timer = self._loop.call_later(delay, self._finish, data, close, rst, 0.0)
            return
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            transport.abort()
            return
        if data:
            transport.write(data)
        if close:
            transport.close()
            return
        self._current = None
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if not self._looping:
            self._process()

    # -- parsing ------------------------------------------------------------------
    def _process(self) -> None:
        """Hand every complete buffered request to the app, one at a time."""
        self._looping = True
        try:
            while self._current is None and not self._write_paused and self._transport is not None:
                if not self._next_request():
                    return
        finally:
            self._looping = False

    def _next_request(self) -> bool:
        """Parse and dispatch one request; False when more bytes are needed (or the end)."""
        buf = self._buf
        transport = self._transport
        assert transport is not None
        if self._head is None:
            while buf[:2] == b"\r\n":  # stray CRLFs between requests
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._error(431)
                elif b"\n\n" in buf:  # bare LF line endings
                    self._error(400)
                return False
            if end > MAX_HEAD:
                self._error(431)
                return False
            try:
                head = self._parse_head(bytes(buf[:end]))
            except _BadRequest as exc:
                self._error(exc.status)
                return False
            del buf[: end + 4]
            if not self._app.on_head(head):
                transport.close()
                return False
            self._head = head
            if self._need > len(buf) and head.headers.get("expect", "").lower() == "100-continue":
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(buf) < self._need:
            return False
        req = self._head
        self._head = None
        if self._need:
            req.body = bytes(buf[: self._need])
            del buf[: self._need]
        self._current = req
        try:
            self._app.handle(req, self)
        except Exception:  # a simulator bug: answer 500, keep serving, show the traceback
            traceback.print_exc(file=sys.stderr)
            if self._current is req and self._timer is None:
                self.respond(500, b'{"Code":"InternalError","Message":"simulator bug"}')
        return True

    def _parse_head(self, raw: bytes) -> Request:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        lines = text.split("\r\n")
        if "\r" in text.replace("\r\n", "") or "\n" in text.replace("\r\n", ""):
            raise _BadRequest(400)
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505 if version.startswith("HTTP/") else 400)
        if not (method.isascii() and method.isalpha() and method.isupper()) or target[:1] != "/":
            raise _BadRequest(400)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or " " in name or "\t" in name:
                raise _BadRequest(400)
            name = name.lower()
            value = value.strip(" \t")
            old = headers.get(name)
            if old is None:
                headers[name] = value
            elif name == "content-length":
                if old != value:
                    raise _BadRequest(400)
            else:
                headers[name] = f"{old}, {value}"
        if "transfer-encoding" in headers:
            raise _BadRequest(501)  # our clients send Content-Length bodies only
        length = headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise _BadRequest(400)
        self._need = int(length)
        if self._need > MAX_BODY:
            raise _BadRequest(413)
        return Request(method, target, version, headers)

    def _error(self, status: int) -> None:
        """Answer a malformed request and close: the stream cannot be trusted past it."""
        self._head = None
        self._current = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            reason = _REASONS[status]
            body = b'{"error":"%s"}' % reason
            transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, reason, JSON, len(body), body)
            )
            transport.close()
        self._buf.clear()


async def start_server(
    app: App, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, set[Connection]]:
    """Listen on ``host:port`` (HTTPS with ``tls``); returns the server and its live connections
    (to close at shutdown)."""
    live: set[Connection] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: Connection(app, live), host, port, backlog=1024, reuse_address=True, ssl=tls
    )
    return server, live
