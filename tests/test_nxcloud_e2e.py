"""NXCloud end to end: sluice against the simulator answering in the seed's shapes.

Bad numbers get the seed's partial-failure answer (code 0, their item ``Failure``); a number over
its hourly limit gets 13007, which defers the call's recipients and never stops the run.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import orjson

from providers.simulator.config import SimulatorConfig
from tests.helpers import simulator, sluice, write_recipients

BAD_RATE = 0.02


def campaign(path: Path, url: str, *, batch_size: int, concurrency: int) -> Path:
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
timeout = 5.0
protocol = "nxcloud"
[message]
sign_name = "Acme"
content = "Hi {{first_name}}, your code is {{code}}"
[limits]
requests_per_second = 500
concurrency = {concurrency}
batch_size = {batch_size}
backoff_base_ms = 10
backoff_max_ms = 100
[run]
dir = "run"
"""
    )
    return path


def recipient_lines(ledger: Path) -> dict[int, dict[str, object]]:
    """Row → its last recipient line."""
    out: dict[int, dict[str, object]] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"r":'):
                obj = orjson.loads(line)
                out[obj["r"]] = obj
    return out


def test_bad_numbers_fail_with_the_reason_and_the_rest_are_sent_once(tmp_path: Path) -> None:
    phones = write_recipients(tmp_path / "recipients.csv", 3000)
    predict = SimulatorConfig(bad_number_rate=BAD_RATE)
    bad = {row for row, phone in phones.items() if predict.is_bad_number(phone)}
    assert 20 < len(bad) < 120  # about 2 % of 3000
    with simulator(tmp_path, "--bad-number-rate", str(BAD_RATE)) as sim:
        c = campaign(tmp_path / "c.toml", sim.url, batch_size=200, concurrency=4)
        p = sluice("run", str(c))
        _, err = p.communicate(timeout=120)
        sim.stop()
        accepted = sim.accepted()
    assert p.returncode == 0, err.decode()  # failed recipients are settled: the run is complete
    lines = recipient_lines(tmp_path / "run" / "ledger.jsonl")
    assert set(lines) == set(phones)
    for row, phone in phones.items():
        line = lines[row]
        if row in bad:
            assert (line["s"], line["c"], line["e"]) == ("failed", "Failure", "Incorrect phone number format")
            assert accepted["86" + phone] == 0, row
        else:
            assert line["s"] == "sent", (row, line)
            assert accepted["86" + phone] == 1, row
    assert sum(accepted.values()) == len(phones) - len(bad)

    status = sluice("status", str(tmp_path / "run"), "--json")
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err.decode()
    s = orjson.loads(out)
    assert (s["sent"], s["failed"], s["complete"]) == (len(phones) - len(bad), len(bad), True)
    assert s["codes"] == {"failed:Failure": len(bad)}
    exported = sluice("export", str(tmp_path / "run"), "--format", "csv")
    out, err = exported.communicate(timeout=60)
    assert exported.returncode == 0, err.decode()
    rows = list(csv.DictReader(out.decode().splitlines()))
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == len(bad)
    assert {(r["code"], r["message"]) for r in failed} == {("Failure", "Incorrect phone number format")}
    assert {r["message"] for r in rows if r["status"] == "sent"} == {""}


def test_a_number_over_its_hourly_limit_defers_its_batch_and_the_run_goes_on(tmp_path: Path) -> None:
    phones = write_recipients(tmp_path / "recipients.csv", 300)
    # Rows 150 and 250 repeat row 10's number: with a limit of one per hour their batches get 13007.
    text = (tmp_path / "recipients.csv").read_text().splitlines()
    for row in (150, 250):
        fields = text[row].split(",")
        fields[1] = phones[10]
        text[row] = ",".join(fields)
        phones[row] = phones[10]
    (tmp_path / "recipients.csv").write_text("\n".join(text) + "\n")
    with simulator(tmp_path, "--nxcloud-number-hourly-limit", "1") as sim:
        c = campaign(tmp_path / "c.toml", sim.url, batch_size=20, concurrency=1)
        p = sluice("run", str(c))
        _, err = p.communicate(timeout=120)
        sim.stop()
        accepted = sim.accepted()
    assert p.returncode == 3, err.decode()  # finished with some deferred: not stopped (4)
    lines = recipient_lines(tmp_path / "run" / "ledger.jsonl")
    assert set(lines) == set(phones)
    deferred = {row for row, line in lines.items() if line["s"] == "deferred"}
    assert deferred == set(range(141, 161)) | set(range(241, 261))  # the two batches, nothing more
    assert {lines[row].get("c") for row in deferred} == {"13007"}
    assert Counter(line["s"] for line in lines.values()) == {"sent": 260, "deferred": 40}
    assert accepted["86" + phones[10]] == 1
    for row in set(phones) - deferred:
        assert accepted["86" + phones[row]] == 1, row
    ledger = (tmp_path / "run" / "ledger.jsonl").read_bytes()
    assert b'"s":"fatal"' not in ledger


def test_refused_calls_fail_only_a_recipient_that_stands_alone(tmp_path: Path) -> None:
    """With --nxcloud-refuse-bad-numbers a call holding a bad number gets 13005 and data null
    (Outcome.SPLIT); a batch of one is the recipient at fault, so only bad numbers fail."""
    phones = write_recipients(tmp_path / "recipients.csv", 200)
    predict = SimulatorConfig(bad_number_rate=0.05)
    bad = {row for row, phone in phones.items() if predict.is_bad_number(phone)}
    assert 3 <= len(bad) <= 25
    with simulator(tmp_path, "--bad-number-rate", "0.05", "--nxcloud-refuse-bad-numbers") as sim:
        c = campaign(tmp_path / "c.toml", sim.url, batch_size=1, concurrency=4)
        p = sluice("run", str(c))
        _, err = p.communicate(timeout=120)
        sim.stop()
        accepted = sim.accepted()
    assert p.returncode == 0, err.decode()
    lines = recipient_lines(tmp_path / "run" / "ledger.jsonl")
    assert {row for row, line in lines.items() if line["s"] == "failed"} == bad
    assert {lines[row]["c"] for row in bad} == {"13005"}
    assert all(lines[row]["s"] == "sent" for row in set(phones) - bad)
    assert accepted == Counter("86" + phones[row] for row in set(phones) - bad)
