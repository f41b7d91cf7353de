"""An httpx transport over aiohttp's connection pool.

httpx stays the client API (tests inject ``httpx.MockTransport``), but its
default transport costs ~2.7 ms of CPU per request on this stack (httpcore's
pool), several times aiohttp's. Third-party bridges exist, but the one we
measured maps ``ServerDisconnectedError`` (the server may have processed the
request) to ``httpx.ConnectTimeout`` (provably not sent); for a sender that
must never send twice that is the one mapping that matters. This module keeps
the bridge small and maps every aiohttp error by *when* it happened:

* before a byte of the request left (connect refused, connect timeout, TLS
  handshake) → ``httpx.ConnectError`` / ``httpx.ConnectTimeout``: safe to retry;
* after (read timeout, disconnect, reset, truncated body) → ``ReadTimeout`` /
  ``RemoteProtocolError`` / ``ReadError``: ambiguous.
"""

from __future__ import annotations

import ssl
from types import TracebackType

import aiohttp
import httpx
import yarl

__all__ = ("AiohttpTransport",)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """A pooled aiohttp session behind httpx's transport interface."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        verify: bool | ssl.SSLContext = True,
        keepalive_seconds: float = 30.0,
    ) -> None:
        self._max_connections = max_connections
        self._verify = verify
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        ssl_arg: bool | ssl.SSLContext = self._verify
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive,
            ssl=ssl_arg,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # httpx decodes by Content-Encoding
            skip_auto_headers=("User-Agent",),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        t = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=t.get("pool"),
            sock_connect=t.get("connect"),
            sock_read=t.get("read"),
        )
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"content-length"
        ]
        try:
            async with session.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=headers,
                data=request.content or None,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                content = await resp.read()
                status = resp.status
                raw_headers = resp.raw_headers
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc) or "server disconnected", request=request) from exc
        except aiohttp.ClientPayloadError as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        except aiohttp.ClientResponseError as exc:  # malformed response head
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientOSError, ConnectionError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timeout", request=request) from exc
        return httpx.Response(status, headers=raw_headers, content=content, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()
