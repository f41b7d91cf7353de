"""Every provider end to end against the simulator: faults, a kill, a resume; none sent twice."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.helpers import final_statuses, simulator, sluice, write_recipients

PROVIDERS = {
    "aliyun": ('protocol = "aliyun"', 'template_code = "SMS_1"\nparams = { code = "{code}" }', 100),
    "aliyun-card": (
        'protocol = "aliyun-card"',
        'card_template_code = "CARD_1"\nfallback_type = "SMS"\ntemplate_code = "SMS_1"\n'
        'params = { code = "{code}" }',
        100,
    ),
    "submail-batchsend": (
        'protocol = "submail"\nmode = "batchsend"',
        'content = "【Acme】Spring sale: 20 % off until Sunday"',
        200,
    ),
    "submail-multixsend": (
        'protocol = "submail"\nmode = "multixsend"',
        'project = "ThJBE4"\nparams = { code = "{code}", name = "{first_name}" }',
        100,
    ),
    "nxcloud": (
        'protocol = "nxcloud"',
        'content = "Hi {first_name}, your code is {code}"',
        200,
    ),
}


def campaign(path: Path, url: str, provider: str, message: str, batch: int) -> Path:
    path.write_text(
        f"""
[source]
kind = "csv"
path = "recipients.csv"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{url}"
timeout = 2.0
{provider}
[message]
sign_name = "Acme"
{message}
[limits]
requests_per_second = 200
concurrency = 8
batch_size = {batch}
backoff_base_ms = 10
backoff_max_ms = 100
breaker_threshold = 0
[run]
dir = "run"
"""
    )
    return path


def accepted_by_number(receipts: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    with receipts.open("rb") as f:
        for line in f:
            counts[orjson.loads(line)["phone"][-11:]] += 1
    return counts


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_faults_kill_resume_none_twice(tmp_path: Path, name: str) -> None:
    provider, message, batch = PROVIDERS[name]
    phones = write_recipients(tmp_path / "recipients.csv", 3000)
    ledger = tmp_path / "run" / "ledger.jsonl"
    mix = "http500=1,drop_after=1,garbage=1,throttle=1,business_error=1"
    with simulator(
        tmp_path, "--fault-rate", "0.1", "--fault-mix", mix, "--seed", "4", "--latency-ms", "5"
    ) as sim:
        c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
        p = sluice("run", str(c))
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if ledger.exists() and ledger.read_bytes().count(b'{"i":') >= 4:
                break
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        p.kill()
        p.communicate()
        r = sluice("resume", str(tmp_path / "run"))
        _, err = r.communicate(timeout=120)
        sim.stop()
    assert r.returncode in (0, 3), err.decode()
    statuses = final_statuses(ledger)
    assert set(statuses) == set(phones), "every recipient has a terminal line"
    accepted = accepted_by_number(tmp_path / "receipts.jsonl")
    for row, phone in phones.items():
        if statuses[row] == "sent":
            assert accepted[phone] == 1, (row, accepted[phone])
        elif statuses[row] == "unknown":
            assert accepted[phone] <= 1
        else:
            assert accepted[phone] == 0, (row, statuses[row])
    assert Counter(statuses.values())["sent"] > len(phones) // 2


@pytest.mark.parametrize("name", ["aliyun", "aliyun-card", "nxcloud", "submail-batchsend"])
def test_faults_crash_resume_reconcile_resume_everyone_exactly_once(tmp_path: Path, name: str) -> None:
    provider, message, batch = PROVIDERS[name]
    phones = write_recipients(tmp_path / "recipients.csv", 1500)
    ledger = tmp_path / "run" / "ledger.jsonl"
    mix = "http500=1,drop_after=1,drop_before=1,garbage=1"
    args = ("--fault-rate", "0.3", "--fault-mix", mix, "--seed", "8", "--submail-log-interval", "0")
    with simulator(tmp_path, *args) as sim:
        c = campaign(tmp_path / "c.toml", sim.url, provider, message, min(batch, 100))
        p = sluice("run", str(c))
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if ledger.exists() and ledger.read_bytes().count(b'{"i":') >= 3:
                break
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        p.kill()  # a crash mid-run
        p.communicate()
        p = sluice("resume", str(tmp_path / "run"))
        _, err = p.communicate(timeout=120)
        assert p.returncode == 3, err.decode()
        before = final_statuses(ledger)
        assert "unknown" in before.values()
        r = sluice("reconcile", str(tmp_path / "run"), "--settle-after", "0", "--qps", "500")
        _, err = r.communicate(timeout=120)
        assert r.returncode == 0, err.decode()
        mid = final_statuses(ledger)
        assert "unknown" not in mid.values()
        accepted_mid = accepted_by_number(tmp_path / "receipts.jsonl")
        for row, phone in phones.items():
            if before[row] == "unknown":
                assert mid[row] == ("sent" if accepted_mid[phone] else "deferred"), row
        s = sluice("resume", str(tmp_path / "run"))
        s.communicate(timeout=120)
        sim.stop()
    after = final_statuses(ledger)
    accepted = accepted_by_number(tmp_path / "receipts.jsonl")
    for row, phone in phones.items():
        if after[row] == "sent":
            assert accepted[phone] == 1, row
        else:
            assert after[row] == "unknown" and accepted[phone] <= 1
