"""Forward proxies, as httpx's users configure them: ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
``ALL_PROXY`` / ``NO_PROXY`` (read as httpx's ``trust_env`` reads them) or ``[provider] proxy``,
with Basic credentials from ``SLUICE_PROXY_AUTH``; how a request to an origin is routed
(straight, absolute-form through the proxy for http, ``CONNECT`` for https: pipeline/transport.py
does the I/O). Proxy credentials are secrets: never in a message, a log or run.json."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

import httpx

__all__ = (
    "DIRECT_ROUTE",
    "PROXY_AUTH_VAR",
    "Proxy",
    "Route",
    "authority",
    "bypasses_proxy",
    "environment_proxies",
    "proxy_secrets",
)


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Route:
    """How requests to one origin go: straight, or through a proxy (``proxy`` is (host, port))."""

    __slots__ = ("connect_request", "proxy", "proxy_headers", "target_prefix")

    def __init__(
        self,
        proxy: tuple[str, int] | None = None,
        *,
        target_prefix: str = "",
        proxy_headers: Sequence[tuple[str, str]] = (),
        connect_request: bytes = b"",
    ) -> None:
        self.proxy = proxy
        self.target_prefix = target_prefix  # http through a proxy: the request target in absolute form
        self.proxy_headers = list(proxy_headers)  # on every request (http) or on the CONNECT (https)
        self.connect_request = connect_request  # https through a proxy: the CONNECT to send first


DIRECT_ROUTE = Route()


class Proxy:
    """A forward HTTP proxy: ``http://[user:password@]host[:port]`` (port 80 when absent).

    The credentials are a secret: ``str()`` and ``repr()`` show ``host:port`` only, and so does
    every error message.
    """

    __slots__ = ("authorization", "host", "port")

    def __init__(self, url: str, *, credentials: tuple[str, str] | None = None) -> None:
        if "://" not in url:
            url = "http://" + url  # as httpx reads HTTPS_PROXY=proxy:3128
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise ValueError("the proxy is not a valid URL") from None
        if parsed.scheme != "http" or not parsed.host:
            raise ValueError(
                f"the proxy must be an http:// URL (a {parsed.scheme}:// proxy is not supported)"
            )
        self.host = parsed.host
        self.port = parsed.port or 80
        if parsed.username or parsed.password:
            credentials = (unquote(parsed.username), unquote(parsed.password))
        self.authorization: str | None = None
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode("ascii")
            self.authorization = f"Basic {token}"

    @classmethod
    def configured(cls, url: str | None) -> Proxy | None:
        """The campaign's ``[provider] proxy``, its credentials from ``SLUICE_PROXY_AUTH`` (user:password)."""
        if url is None:
            return None
        auth = os.environ.get(PROXY_AUTH_VAR)
        user, _, password = auth.partition(":") if auth else ("", "", "")
        return cls(url, credentials=(user, password) if auth else None)

    def __str__(self) -> str:
        return authority(self.host, self.port)

    __repr__ = __str__


PROXY_AUTH_VAR = "SLUICE_PROXY_AUTH"


def proxy_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """What logs must never show of the proxy settings: their passwords (and user:password)."""
    env = os.environ if env is None else env
    found = []
    auth = env.get(PROXY_AUTH_VAR)
    if auth:
        found += [auth, auth.partition(":")[2]]
    for url in environment_proxies(env).values():
        userinfo = url.split("://", 1)[-1].rpartition("@")[0]
        if userinfo:
            found += [userinfo, unquote(userinfo.partition(":")[2]), userinfo.partition(":")[2]]
    return [s for s in found if s]


def environment_proxies(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"http": url, "https": url, "all": url, "no": hosts}`` from the environment, as httpx reads
    it (``trust_env``): ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, the lower-case
    name winning over the upper-case one."""
    env = os.environ if env is None else env
    found: dict[str, str] = {}
    for key in ("http", "https", "all", "no"):
        value = env.get(f"{key}_proxy") or env.get(f"{key.upper()}_PROXY")
        if value:
            found[key] = value
    return found


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``host`` is in ``NO_PROXY`` (comma-separated): ``*`` for every host, a host name (its
    subdomains too; a leading dot or ``*.`` allowed), an IP address."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if "://" in entry:
            entry = entry.split("://", 1)[1]
        entry = entry.strip("[]").lstrip("*").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False
