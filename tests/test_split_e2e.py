"""Refused calls split end to end: sluice against the simulator refusing any call holding a bad
number (``--bad-number-rate``), then a kill in the middle of a split and a resume."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from providers.simulator.config import SimulatorConfig
from tests.helpers import final_statuses, simulator, sluice, write_recipients
from tests.test_providers_e2e import PROVIDERS, accepted_by_number, campaign

RATE = 0.01
CODES = {"aliyun": "isv.MOBILE_NUMBER_ILLEGAL", "aliyun-card": "isv.MOBILE_NUMBER_ILLEGAL"}


def fast_campaign(path: Path, url: str, name: str) -> Path:
    provider, message, _ = PROVIDERS[name]
    c = campaign(path, url, provider, message, 100)
    text = c.read_text().replace("requests_per_second = 200", "requests_per_second = 5000")
    c.write_text(text.replace("concurrency = 8", "concurrency = 32"))
    return c


def ledger_codes(ledger: Path) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"r":'):
                obj = orjson.loads(line)
                out[obj["r"]] = obj.get("c")
    return out


def check_outcomes(tmp: Path, phones: dict[int, str], code: str) -> dict[str, object]:
    """Every good recipient sent and accepted once, every bad one failed with ``code`` and never
    accepted; returns ``sluice status --json``."""
    cfg = SimulatorConfig(bad_number_rate=RATE)
    ledger = tmp / "run" / "ledger.jsonl"
    statuses = final_statuses(ledger)
    codes = ledger_codes(ledger)
    accepted = accepted_by_number(tmp / "receipts.jsonl")
    bad = {row for row, phone in phones.items() if cfg.is_bad_number(phone)}
    assert bad and len(bad) < len(phones) * 2 * RATE
    wrong = [row for row in phones if statuses.get(row) != ("failed" if row in bad else "sent")]
    assert not wrong, [(r, statuses.get(r), codes.get(r)) for r in wrong[:5]]
    assert all(codes[row] == code and accepted[phones[row]] == 0 for row in bad)
    assert all(accepted[phones[row]] == 1 for row in phones if row not in bad)
    assert sum(accepted.values()) == len(phones) - len(bad)
    p = sluice("status", "--json", str(tmp / "run"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    status: dict[str, object] = orjson.loads(out)
    assert status["failed"] == len(bad) and status["sent"] == len(phones) - len(bad)
    return status


@pytest.mark.parametrize(
    ("name", "n"), [("aliyun", 100_000), ("aliyun-card", 100_000), ("submail-batchsend", 100_000)]
)
def test_one_percent_bad_numbers(tmp_path: Path, name: str, n: int) -> None:
    phones = write_recipients(tmp_path / "recipients.csv", n)
    with simulator(tmp_path, "--bad-number-rate", str(RATE), "--seed", "1") as sim:
        c = fast_campaign(tmp_path / "c.toml", sim.url, name)
        started = time.monotonic()
        p = sluice("run", str(c))
        _, err = p.communicate(timeout=900)
        elapsed = time.monotonic() - started
        sim.stop()
    assert p.returncode == 0, err.decode()
    status = check_outcomes(tmp_path, phones, CODES.get(name, "252"))
    batches = n // 100
    requests, splits, parts = status["requests"], status["splits"], status["split_requests"]
    assert isinstance(requests, int) and isinstance(parts, int) and isinstance(splits, int)
    assert requests == batches + parts and splits > 0
    print(
        f"\n{name}: {n:,} recipients at {RATE:.0%} bad, {status['failed']:,} failed, "
        f"{status['sent']:,} sent: "
        f"{requests:,} requests instead of {batches:,} ({splits:,} refused calls split, "
        f"{parts:,} requests for parts), {elapsed:.1f} s"
    )


@pytest.mark.parametrize("name", ["aliyun", "submail-batchsend"])
def test_kill_during_a_split_then_resume(tmp_path: Path, name: str) -> None:
    phones = write_recipients(tmp_path / "recipients.csv", 5000)
    ledger = tmp_path / "run" / "ledger.jsonl"
    args = ("--bad-number-rate", str(RATE), "--latency-ms", "20", "--submail-log-interval", "0")
    with simulator(tmp_path, *args) as sim:
        provider, message, _ = PROVIDERS[name]
        c = campaign(tmp_path / "c.toml", sim.url, provider, message, 100)
        p = sluice("run", str(c))
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            # Killed once parts of refused batches are under way (some sent, some not yet).
            if ledger.exists() and ledger.read_bytes().count(b',"p":') >= 12:
                break
            time.sleep(0.005)  # polling a condition, bounded by the deadline
        p.kill()
        p.communicate()
        killed = ledger.read_bytes()
        assert b',"p":' in killed and b'"eof"' not in killed, "killed mid-run, during a split"
        r = sluice("resume", str(tmp_path / "run"))
        _, err = r.communicate(timeout=300)
        assert r.returncode in (0, 3), err.decode()
        statuses = final_statuses(ledger)
        assert set(statuses) == set(phones), "every recipient has a terminal line"
        accepted = accepted_by_number(tmp_path / "receipts.jsonl")
        unknown = [row for row, st in statuses.items() if st == "unknown"]
        assert len(unknown) <= 8 * 100  # at most the requests in flight at the kill (concurrency 8)
        assert all(accepted[phones[row]] <= 1 for row in unknown)  # never re-sent silently
        # The recipients in flight at the kill are settled through the provider, then resumed.
        for cmd in (("reconcile", str(tmp_path / "run"), "--settle-after", "0", "--qps", "500"),
                    ("resume", str(tmp_path / "run"))):  # fmt: skip
            q = sluice(*cmd)
            _, err = q.communicate(timeout=300)
            assert q.returncode == 0, (cmd, err.decode())
        sim.stop()
    check_outcomes(tmp_path, phones, CODES.get(name, "252"))  # all sent once, the bad ones failed
