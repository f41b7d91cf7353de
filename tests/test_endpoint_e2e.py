"""Endpoint and certificate errors, and a restarted simulator, end to end.

The ``sluice`` CLI and the simulator run as subprocesses on 127.0.0.1; TLS uses a test CA
(trustme) whose certificate files the simulator serves with ``--tls-cert``/``--tls-key``.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import orjson
import pytest
import trustme

from tests.helpers import final_statuses, simulator, sluice, write_campaign, write_recipients
from tests.test_providers_e2e import PROVIDERS, accepted_by_number, campaign


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    p = sluice(*args, env=env)
    _, err = p.communicate(timeout=120)
    return p.returncode, err.decode()


def status(run_dir: Path) -> tuple[dict[str, object], str]:
    """``sluice status --json`` and the table ``sluice status`` prints."""
    p = sluice("status", str(run_dir), "--json")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    t = sluice("status", str(run_dir))
    text, _ = t.communicate(timeout=60)
    return dict(orjson.loads(out)), text.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def intents(run_dir: Path) -> int:
    return (run_dir / "ledger.jsonl").read_bytes().count(b'{"i":')


def tls_files(tmp_path: Path, ca: trustme.CA, *hosts: str) -> tuple[str, ...]:
    """The simulator's --tls-cert/--tls-key arguments for a certificate for ``hosts``; the CA file."""
    cert = ca.issue_cert(*hosts)
    chain, key, ca_file = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return "--tls-cert", str(chain), "--tls-key", str(key)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class TestCertificate:
    @pytest.mark.parametrize(
        ("hosts", "trusted", "reason"),
        [
            pytest.param(("127.0.0.1",), False, "unable to get local issuer certificate", id="untrusted-ca"),
            pytest.param(("sluice.invalid",), True, "IP address mismatch", id="wrong-host"),
        ],
    )
    def test_stops_at_once_with_the_reason_and_sends_nothing(
        self, tmp_path: Path, ca: trustme.CA, hosts: tuple[str, ...], trusted: bool, reason: str
    ) -> None:
        write_recipients(tmp_path / "recipients.csv", 500)
        env = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")} if trusted else {}
        with simulator(tmp_path, *tls_files(tmp_path, ca, *hosts)) as sim:
            c = write_campaign(tmp_path / "c.toml", sim.url, concurrency=8)
            code, err = run_cli("run", str(c), env=env)
            sim.stop()
        assert code == 4, err
        assert reason in err and "CERTIFICATE_VERIFY_FAILED" in err  # the SSL library's words
        assert sum(sim.accepted().values()) == 0  # the provider received nothing
        run_dir = tmp_path / "run"
        assert intents(run_dir) <= 8  # no retry: only the requests already on their way
        st, text = status(run_dir)
        assert st["sent"] == st["unknown"] == st["deferred"] == 0
        assert set(final_statuses(run_dir / "ledger.jsonl").values()) <= {"pending"}  # none settled
        stopped = st["stopped"]
        assert isinstance(stopped, dict) and stopped["code"] == "CertificateVerifyFailed"
        assert reason in stopped["message"] and reason in text
        stops = [
            orjson.loads(line)
            for line in (run_dir / "log.jsonl").read_bytes().splitlines()
            if b"run_stopping" in line
        ]
        assert stops and reason in stops[0]["reason"]

    def test_a_trusted_certificate_for_the_host_sends_everyone_once(
        self, tmp_path: Path, ca: trustme.CA
    ) -> None:
        # The control: the same set-up with a certificate that is right is not stopped.
        phones = write_recipients(tmp_path / "recipients.csv", 500)
        with simulator(tmp_path, *tls_files(tmp_path, ca, "127.0.0.1")) as sim:
            assert sim.url.startswith("https://")
            c = write_campaign(tmp_path / "c.toml", sim.url)
            code, err = run_cli("run", str(c), env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
            sim.stop()
        assert code == 0, err
        accepted = sim.accepted()
        assert sum(accepted.values()) == 500 and all(accepted[p] == 1 for p in phones.values())


class TestRefusedEndpoint:
    def test_stops_after_the_bounded_tries_then_a_resume_sends_everyone_once(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 1000)
        port = free_port()  # nothing listens there
        c = write_campaign(tmp_path / "c.toml", f"http://127.0.0.1:{port}", concurrency=8, connect_failures=5)
        code, err = run_cli("run", str(c))
        assert code == 4, err
        assert f"127.0.0.1:{port}" in err and "Errno 111" in err  # the endpoint and the OS error
        assert "5 failed connects in a row" in err
        run_dir = tmp_path / "run"
        assert intents(run_dir) <= 8 + 5 - 1  # those on their way at the first failure, then the probes
        st, text = status(run_dir)
        assert st["sent"] == st["unknown"] == st["deferred"] == 0
        assert f"127.0.0.1:{port}" in text
        with simulator(tmp_path, "--port", str(port)) as sim:  # the endpoint is back
            code, err = run_cli("resume", str(run_dir))
            sim.stop()
        assert code == 0, err
        accepted = sim.accepted()
        assert sum(accepted.values()) == 1000 and all(accepted[p] == 1 for p in phones.values())


class TestSimulatorRestart:
    @pytest.mark.parametrize("name", ["aliyun", "submail-batchsend", "nxcloud"])
    def test_reconcile_after_a_restart_sends_no_one_twice(self, tmp_path: Path, name: str) -> None:
        provider, message, batch = PROVIDERS[name]
        phones = write_recipients(tmp_path / "recipients.csv", 1000)
        ledger = tmp_path / "run" / "ledger.jsonl"
        # Accepted and recorded, then the connection dropped: the sender cannot know (unknown).
        faults = ("--fault-rates", "drop_after=0.4", "--seed", "5")
        with simulator(tmp_path, *faults) as sim:
            c = campaign(tmp_path / "c.toml", sim.url, provider, message, min(batch, 50))
            code, err = run_cli("run", str(c))
            sim.stop()
        assert code == 3, err
        before = final_statuses(ledger)
        unknown = [row for row, s in before.items() if s == "unknown"]
        assert len(unknown) >= 50
        port = sim.url.rsplit(":", 1)[1]
        with simulator(tmp_path, "--port", port, "--submail-log-interval", "0") as again:  # same receipts
            code, err = run_cli("reconcile", str(tmp_path / "run"), "--settle-after", "0", "--qps", "500")
            assert code == 0, err
            mid = final_statuses(ledger)
            assert all(mid[row] == "sent" for row in unknown)  # found at the provider: not resendable
            code, err = run_cli("resume", str(tmp_path / "run"))
            again.stop()
        assert code == 0, err
        accepted = accepted_by_number(tmp_path / "receipts.jsonl")
        assert Counter(accepted[p] for p in phones.values()) == Counter({1: 1000})  # 0 accepted twice


class TestServerTimeRequest:
    """SUBMAIL signing with md5 asks the server's time before the first send: the same stop rules."""

    def test_untrusted_certificate_stops_before_sending(self, tmp_path: Path, ca: trustme.CA) -> None:
        provider, message, batch = PROVIDERS["submail-batchsend"]
        write_recipients(tmp_path / "recipients.csv", 200)
        with simulator(tmp_path, *tls_files(tmp_path, ca, "127.0.0.1")) as sim:
            c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
            code, err = run_cli("run", str(c))
            sim.stop()
        assert code == 4, err
        assert "unable to get local issuer certificate" in err
        assert sum(sim.accepted().values()) == 0 and intents(tmp_path / "run") == 0
        st, _ = status(tmp_path / "run")
        stopped = st["stopped"]
        assert isinstance(stopped, dict) and stopped["code"] == "CertificateVerifyFailed"

    def test_refused_stops_after_the_bounded_tries(self, tmp_path: Path) -> None:
        provider, message, batch = PROVIDERS["submail-batchsend"]
        write_recipients(tmp_path / "recipients.csv", 200)
        port = free_port()
        c = campaign(tmp_path / "c.toml", f"http://127.0.0.1:{port}", provider, message, batch)
        code, err = run_cli("run", str(c))
        assert code == 4, err
        assert "5 failed connects in a row" in err and f"127.0.0.1:{port}" in err
        st, _ = status(tmp_path / "run")
        assert st["sent"] == st["deferred"] == 0
        assert isinstance(st["stopped"], dict) and st["stopped"]["code"] == "ConnectError"
