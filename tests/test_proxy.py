"""``HttpTransport`` through a real forward proxy (Debian's tinyproxy, started here on 127.0.0.1).

http endpoints go through it in absolute form, https ones in a CONNECT tunnel with the TLS
session to the endpoint inside; Basic authentication; a refusal is a connect-phase error
(nothing sent); the environment is read as httpx reads it, NO_PROXY included; the
proxy's credentials appear in no message. The proxy's own log says what it saw.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from pipeline.proxy import Proxy, bypasses_proxy, environment_proxies, proxy_secrets
from pipeline.transport import HttpTransport
from providers.base import Outcome, classify_transport_error
from tests.helpers import simulator, sluice, write_campaign, write_recipients
from tests.test_endpoint_e2e import tls_files
from tests.test_providers_e2e import accepted_by_number
from tests.test_transport import (
    TIMEOUT,
    Server,
    answer_ok,
    answer_with,
    client_context,
    send,
    tls_server,
)

TINYPROXY = shutil.which("tinyproxy")
needs_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None and not os.environ.get("CI"),
    reason="tinyproxy is not installed (apt-get install tinyproxy; .ci/run installs it)",
)

USER, PASSWORD = "alice", "pr0xy-s3cret"
PROXY_VARS = [f"{k}_proxy" for k in ("http", "https", "all", "no")]


class Tinyproxy:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def lines(self, needle: str) -> list[str]:
        """The log lines with ``needle`` (tinyproxy writes a request's line as it reads it)."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if needle in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tinyproxy(tmp_path: Path, *, auth: bool = False) -> Iterator[Tinyproxy]:
    assert TINYPROXY is not None, "tinyproxy must be installed under CI"
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        f'LogFile "{log}"',
        "LogLevel Info",
        "MaxClients 20",
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
    ]
    if os.getuid() == 0:
        lines += ["User root", "Group root"]
    if auth:
        lines.append(f"BasicAuth {USER} {PASSWORD}")
    conf.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tinyproxy.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:  # bounded: until it accepts connections, 10 s at most
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tinyproxy did not start: {out.read_text()!r}")
            time.sleep(0.05)
        yield Tinyproxy(f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@needs_tinyproxy
@pytest.mark.anyio
class TestThroughTinyproxy:
    async def test_http_endpoint_in_absolute_form(self, server: Server, tmp_path: Path) -> None:
        base = server.serve(answer_ok)
        with tinyproxy(tmp_path) as proxy:
            async with HttpTransport(proxy=proxy.url, trust_env=False) as transport:
                r = await send(transport, base + "/send?x=1")
            assert r.status_code == 200 and r.headers["x-echo"] == "/send?x=1"
            assert proxy.lines(f"POST {base}/send?x=1 HTTP/1.1")  # the proxy carried it
        assert server.requests[0].target == b"/send?x=1"

    async def test_https_endpoint_through_connect_and_reuse(self, ca: trustme.CA, tmp_path: Path) -> None:
        srv = await tls_server(ca, "127.0.0.1")
        try:
            base = srv.serve(answer_ok)
            authority = base.removeprefix("https://")
            with tinyproxy(tmp_path) as proxy:
                async with HttpTransport(verify=client_context(ca), proxy=proxy.url, trust_env=False) as t:
                    for i in range(3):
                        r = await send(t, f"{base}/{i}")
                        assert r.status_code == 200 and r.headers["x-echo"] == f"/{i}"
                assert len(proxy.lines(f"CONNECT {authority} HTTP/1.1")) == 1  # one tunnel, kept alive
            assert srv.connections == 1 and len(srv.requests) == 3
        finally:
            await srv.stop()

    async def test_https_certificate_is_checked_inside_the_tunnel(
        self, ca: trustme.CA, tmp_path: Path
    ) -> None:
        srv = await tls_server(ca, "sluice.invalid")
        try:
            base = srv.serve(answer_ok)
            with tinyproxy(tmp_path) as proxy:
                async with HttpTransport(verify=client_context(ca), proxy=proxy.url, trust_env=False) as t:
                    with pytest.raises(httpx.ConnectError) as info:
                        await send(t, base + "/")
            assert classify_transport_error(info.value).outcome is Outcome.FATAL
            assert srv.requests == []
        finally:
            await srv.stop()

    @pytest.mark.parametrize("scheme", ["http", "https"])
    async def test_basic_authentication(self, ca: trustme.CA, tmp_path: Path, scheme: str) -> None:
        srv = await tls_server(ca, "127.0.0.1") if scheme == "https" else Server()
        if scheme == "http":
            await srv.start()
        try:
            base = srv.serve(answer_ok)
            with tinyproxy(tmp_path, auth=True) as proxy:
                host_port = proxy.url.removeprefix("http://")
                with_auth = f"http://{USER}:{PASSWORD}@{host_port}"
                async with HttpTransport(verify=client_context(ca), proxy=with_auth, trust_env=False) as t:
                    r = await send(t, base + "/ok")
                assert r.status_code == 200
                async with HttpTransport(verify=client_context(ca), proxy=proxy.url, trust_env=False) as t:
                    if scheme == "https":  # the CONNECT is refused: nothing of the request was sent
                        with pytest.raises(httpx.ConnectError) as info:
                            await send(t, base + "/refused")
                        assert "407" in str(info.value) and host_port in str(info.value)
                        assert classify_transport_error(info.value).outcome is Outcome.RETRY
                    else:  # http: the proxy answers the request itself (without reading a body:
                        # a GET, or its close could reset the connection before the answer is read)
                        r = await send(t, base + "/refused", b"", method="GET")
                        assert r.status_code == 407
            assert [q.target for q in srv.requests] == [b"/ok"]
        finally:
            await srv.stop()

    async def test_credentials_never_in_a_message(self, tmp_path: Path) -> None:
        with tinyproxy(tmp_path, auth=True) as proxy:
            host_port = proxy.url.removeprefix("http://")
            closed = free_port()
            transport = HttpTransport(proxy=f"http://{USER}:{PASSWORD}@{host_port}", trust_env=False)
            with pytest.raises(httpx.ConnectError) as info:
                await send(transport, f"https://127.0.0.1:{closed}/")
        for text in (str(info.value), repr(info.value), str(transport._proxy), repr(transport._proxy)):
            assert PASSWORD not in text and USER not in text
        assert "refused CONNECT with 5" in str(info.value)  # the proxy could not reach the endpoint

    async def test_environment_and_no_proxy(
        self, no_proxy_env: pytest.MonkeyPatch, ca: trustme.CA, tmp_path: Path
    ) -> None:
        srv = await tls_server(ca, "127.0.0.1", "localhost")
        try:
            base = srv.serve(answer_ok)
            port = base.rsplit(":", 1)[1]
            with tinyproxy(tmp_path) as proxy:
                no_proxy_env.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the lower-case one wins
                no_proxy_env.setenv("https_proxy", proxy.url)
                no_proxy_env.setenv("NO_PROXY", "localhost")
                async with HttpTransport(verify=client_context(ca)) as t:
                    assert (await send(t, f"https://127.0.0.1:{port}/via")).status_code == 200
                    assert (await send(t, f"https://localhost:{port}/direct")).status_code == 200
                assert proxy.lines(f"CONNECT 127.0.0.1:{port}")
                assert not proxy.lines("localhost")
                async with HttpTransport(verify=client_context(ca), trust_env=False) as t:  # env not read
                    assert (await send(t, f"https://127.0.0.1:{port}/off")).status_code == 200
                assert len(proxy.lines("): CONNECT ")) == 1  # tinyproxy logs each request line
        finally:
            await srv.stop()


@pytest.mark.anyio
async def test_connect_refused_by_a_proxy_that_is_down(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("ALL_PROXY", f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}")
    async with HttpTransport() as transport:
        with pytest.raises(httpx.ConnectError) as info:
            await send(transport, "http://sluice.invalid/", timeouts=TIMEOUT)
    assert "proxy 127.0.0.1" in str(info.value) and PASSWORD not in str(info.value)
    assert classify_transport_error(info.value).outcome is Outcome.RETRY


def test_environment_read_as_httpx_reads_it() -> None:
    env = {"HTTP_PROXY": "http://a:1", "http_proxy": "http://b:2", "ALL_PROXY": "c:3", "no_proxy": "x.org"}
    assert environment_proxies(env) == {"http": "http://b:2", "all": "c:3", "no": "x.org"}
    assert str(Proxy("c:3")) == "c:3"
    assert bypasses_proxy("api.x.org", ".x.org, y") and bypasses_proxy("x.org", "x.org")
    assert not bypasses_proxy("notx.org", "x.org") and bypasses_proxy("anything", "*")
    assert bypasses_proxy("::1", "[::1]") and not bypasses_proxy("127.0.0.2", "127.0.0.1")
    secrets = proxy_secrets({"HTTPS_PROXY": "http://u:p%40ss@h:1", "SLUICE_PROXY_AUTH": "v:w"})
    assert {"p@ss", "w", "v:w"} <= set(secrets)
    with pytest.raises(ValueError, match="socks5"):
        Proxy("socks5://h:1")


@needs_tinyproxy
def test_campaign_reaches_an_https_endpoint_through_an_authenticating_proxy(
    tmp_path: Path, ca: trustme.CA, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """The issue's "done when": the CLI, the simulator over TLS, tinyproxy with Basic auth."""
    n = 2000
    phones = write_recipients(tmp_path / "recipients.csv", n)
    with (
        tinyproxy(tmp_path, auth=True) as proxy,
        simulator(tmp_path, *tls_files(tmp_path, ca, "127.0.0.1")) as sim,
    ):
        c = write_campaign(tmp_path / "c.toml", sim.url, concurrency=8)
        text = c.read_text().replace(
            "timeout = 2.0", f'timeout = 5.0\nproxy = "{proxy.url}"\nca_file = "ca.pem"'
        )
        c.write_text(text)
        p = sluice("run", str(c), env={"SLUICE_PROXY_AUTH": f"{USER}:{PASSWORD}"})
        _, err = p.communicate(timeout=120)
        sim.stop()
        connects = proxy.lines(f"): CONNECT {sim.url.removeprefix('https://')} HTTP/1.1")
    assert p.returncode == 0, err.decode()
    accepted = accepted_by_number(tmp_path / "receipts.jsonl")
    assert sum(accepted.values()) == n and all(accepted[phone] == 1 for phone in phones.values())
    assert 1 <= len(connects) <= 8  # one tunnel per connection, kept alive: 40 batches over them
    for name in ("run.json", "ledger.jsonl", "log.jsonl"):
        assert PASSWORD.encode() not in (tmp_path / "run" / name).read_bytes(), name
    assert PASSWORD.encode() not in err


def test_campaign_proxy_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    from pipeline.app.campaign import load_campaign
    from pipeline.errors import CampaignError

    write_recipients(tmp_path / "recipients.csv", 1)
    c = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
    c.write_text(c.read_text().replace("timeout = 2.0", f'proxy = "http://{USER}:{PASSWORD}@127.0.0.1:3128"'))
    with pytest.raises(CampaignError) as info:
        load_campaign(c)
    assert "SLUICE_PROXY_AUTH" in str(info.value) and PASSWORD not in str(info.value)
    c.write_text(
        c.read_text().replace(f"{USER}:{PASSWORD}@", "").replace("proxy =", 'ca_file = "none.pem"\nproxy =')
    )
    with pytest.raises(CampaignError, match="ca_file"):
        load_campaign(c)


def test_verify_tls_false_warns_at_start(tmp_path: Path) -> None:
    write_recipients(tmp_path / "recipients.csv", 20)
    with simulator(tmp_path) as sim:
        c = write_campaign(tmp_path / "c.toml", sim.url)
        c.write_text(c.read_text().replace("timeout = 2.0", "timeout = 2.0\nverify_tls = false"))
        p = sluice("run", str(c))
        _, err = p.communicate(timeout=120)
        sim.stop()
    assert p.returncode == 0, err.decode()
    assert b"verify_tls = false: the provider's certificate is not checked" in err
    assert b"tls_not_verified" in (tmp_path / "run" / "log.jsonl").read_bytes()


@pytest.mark.anyio
@pytest.mark.parametrize("status", ["403 Forbidden", "407 Proxy Authentication Required", "502 Bad Gateway"])
async def test_a_refused_connect_is_a_connect_error_naming_the_status(server: Server, status: str) -> None:
    # A loopback server playing a proxy that refuses: the request itself never leaves.
    proxy_url = server.serve(answer_with(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode()))
    async with HttpTransport(proxy=proxy_url, trust_env=False) as transport:
        with pytest.raises(httpx.ConnectError) as info:
            await send(transport, "https://sms.example.test/send")
    assert f"refused CONNECT with {status}" in str(info.value)
    assert classify_transport_error(info.value).outcome is Outcome.RETRY
    assert [r.request_line for r in server.requests] == [b"CONNECT sms.example.test:443 HTTP/1.1"]
