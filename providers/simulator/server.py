"""A small HTTP/1.1 server on asyncio, with control over *when* a connection dies.

Frameworks hide the moments a fault injector needs (after the head, after the
body was processed, before the response), so this parses requests itself:
request line, headers, ``Content-Length`` bodies, keep-alive, pipelined
requests answered in order.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ("Abort", "Close", "Request", "Response", "serve_http")

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json;charset=utf-8"


@dataclass(slots=True)
class Close:
    """Close the connection without a response (FIN)."""


@dataclass(slots=True)
class Abort:
    """Reset the connection without a response (RST)."""


Outcome = Response | Close | Abort
Handler = Callable[[Request], Awaitable[Outcome]]
HeadHook = Callable[[Request], bool]
"""Called when a request's head has arrived; False drops the connection at once."""


class _Connection(asyncio.Protocol):
    def __init__(self, handler: Handler, on_head: HeadHook | None) -> None:
        self._handler = handler
        self._on_head = on_head
        self._buf = bytearray()
        self._queue: asyncio.Queue[Request | None] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending_head: Request | None = None
        self._need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._transport is not None and not self._transport.is_closing():
            if self._pending_head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        self._fail(431)
                    return
                head = bytes(self._buf[:end]).decode("latin-1")
                del self._buf[: end + 4]
                req = self._parse_head(head)
                if req is None:
                    return
                if self._on_head is not None and not self._on_head(req):
                    self._transport.close()  # dropped before the body was read
                    return
                self._pending_head = req
            if len(self._buf) < self._need:
                return
            req = self._pending_head
            req.body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._pending_head = None
            self._queue.put_nowait(req)

    def _parse_head(self, head: str) -> Request | None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400)
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400)
                return None
            headers[name.strip().lower()] = value.strip()
        try:
            self._need = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400)
            return None
        if self._need < 0 or self._need > MAX_BODY:
            self._fail(413)
            return None
        if "chunked" in headers.get("transfer-encoding", ""):
            self._fail(400)  # no client of ours sends chunked bodies
            return None
        return Request(parts[0], parts[1], headers)

    def _fail(self, status: int) -> None:
        assert self._transport is not None
        self._transport.write(_render(Response(status, b'{"Code":"BadRequest"}'), close=True))
        self._transport.close()

    async def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            req = await self._queue.get()
            if req is None or transport.is_closing():
                return
            try:
                out = await self._handler(req)
            except Exception:  # a handler bug answers 500 and keeps the server up
                out = Response(500, b'{"Code":"InternalError","Message":"simulator error"}')
            if transport.is_closing():
                return
            if isinstance(out, Close):
                transport.close()
                return
            if isinstance(out, Abort):
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                return
            close = req.headers.get("connection", "").lower() == "close"
            transport.write(_render(out, close=close))
            if close:
                transport.close()
                return


def _render(resp: Response, *, close: bool = False) -> bytes:
    head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}",
            f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}"]
    head.extend(f"{k}: {v}" for k, v in resp.headers.items())
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body


async def serve_http(
    handler: Handler, host: str, port: int, on_head: HeadHook | None = None
) -> asyncio.Server:
    """Start serving; the caller closes the returned server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(handler, on_head), host, port, backlog=1024)
