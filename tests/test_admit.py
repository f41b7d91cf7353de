"""The admission stage: one set of columns read, and a dry run that counts what a run admits.

Every source kind (CSV, JSONL, SQLite, PostgreSQL) holds the same recipients: duplicated
keys and phones, suppressed numbers and keys, bad numbers, an over-long text, and a
content template naming columns that are neither the key nor the phone. The dry run and
a real run against the simulator must agree row for row, on the figures worked out here.
"""

from __future__ import annotations

import ast
import csv
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from pipeline.admit import columns_needed, source_columns
from pipeline.app.api import check_source, start_run
from pipeline.app.campaign import Campaign, load_campaign, parse_campaign
from pipeline.errors import CampaignError
from pipeline.ops.dryrun import dry_run
from pipeline.render import reason_group
from pipeline.tasks import Progress
from tests.helpers import simulator, write_campaign, write_recipients
from tests.pg import PgServer, pg_fixture  # noqa: F401  (the session-wide server)

DSN_ENV = "SLUICE_ADMIT_TEST_DSN"
COLUMNS = ("id", "phone", "first_name", "code")
CONTENT = "Hi {first_name}, your code is {code}"


def recipients() -> tuple[list[tuple[str, str, str, str]], dict[str, str]]:
    """The rows (in key order, as a database reads them) and key → what admission decides."""
    rows: list[tuple[str, str, str, str]] = []
    verdict: dict[str, str] = {}

    def add(key: str, phone: str, name: str, outcome: str, code: str = "1234") -> None:
        rows.append((key, phone, name, code))
        verdict.setdefault(key, outcome)

    for i in range(1, 13):
        add(f"k{i:02d}", f"1390000{i:04d}", f"n{i}", "sent")
    add("k13", "13900000001", "dup-phone", "duplicate phone")  # k01's number, another key
    add("k14", "13911112222", "suppressed-phone", "suppressed")
    add("k15", "13933334444", "suppressed-key", "suppressed")
    add("k16", "12345", "bad-number", "invalid phone number")
    add("k17", "13955556666", "x" * 1001, "text longer")  # NXCloud allows 1 000 characters
    add("k18", "+86 139-0000-0099", "formatted", "sent")
    rows.append(("k02", "13977778888", "dup-key", "1234"))  # a second k02: duplicate key
    rows.sort(key=lambda r: r[0])  # key order, so every kind numbers the rows alike
    return rows, verdict


def write_source(
    kind: str, tmp: Path, rows: list[tuple[str, str, str, str]], pg: PgServer | None
) -> dict[str, Any]:
    if kind == "csv":
        with (tmp / "r.csv").open("w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *rows])
        return {"kind": "csv", "path": "r.csv"}
    if kind == "jsonl":
        (tmp / "r.jsonl").write_text(
            "".join(json.dumps(dict(zip(COLUMNS, r, strict=True))) + "\n" for r in rows)
        )
        return {"kind": "jsonl", "path": "r.jsonl"}
    # A table with more columns than the campaign reads, the recipient key as its key.
    if kind == "sqlite":
        with sqlite3.connect(tmp / "r.db") as conn:
            conn.execute("CREATE TABLE people (id TEXT, phone TEXT, first_name TEXT, code TEXT, notes TEXT)")
            conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?, 'n/a')", rows)
        conn.close()
        return {"kind": "sqlite", "path": "r.db", "table": "people"}
    assert pg is not None
    pg.execute(
        "DROP TABLE IF EXISTS admit_people",
        "CREATE TABLE admit_people (id text, phone text, first_name text, code text, notes text)",
    )
    with pg.connect() as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO admit_people VALUES (%s, %s, %s, %s, 'n/a')", rows)
    return {"kind": "postgres", "table": "admit_people", "dsn_env": DSN_ENV}


def make_campaign(tmp: Path, source: dict[str, Any], endpoint: str) -> Campaign:
    (tmp / "suppress.txt").write_text("# do not text\n139 1111 2222\nk15\n")
    src = {**source, "phone": "phone", "key": "id", "suppress": "suppress.txt", "dedupe_phone": True}
    return parse_campaign(
        {
            "source": src,
            "provider": {"kind": "simulator", "endpoint": endpoint, "protocol": "nxcloud", "timeout": 5.0},
            "message": {"sign_name": "Acme", "content": CONTENT},
            "limits": {
                "batch_size": 5,
                "requests_per_second": 1000,
                "backoff_base_ms": 10,
                "max_reject_ratio": 1,
            },
        },
        tmp,
    )


def ledger_outcomes(ledger: Path) -> dict[int, tuple[str, str | None]]:
    out: dict[int, tuple[str, str | None]] = {}
    for line in ledger.read_bytes().splitlines():
        if line.startswith(b'{"r":'):
            obj = orjson.loads(line)
            out[obj["r"]] = (obj["s"], obj.get("e"))
    return out


@pytest.fixture
def pg_or_none(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> PgServer | None:
    if request.node.callspec.params["kind"] != "postgres":
        return None
    pg: PgServer = request.getfixturevalue("pg")
    monkeypatch.setenv(DSN_ENV, pg.dsn())
    return pg


@pytest.mark.parametrize("kind", ["csv", "jsonl", "sqlite", "postgres"])
def test_dry_run_counts_what_a_run_admits(tmp_path: Path, kind: str, pg_or_none: PgServer | None) -> None:
    rows, verdict = recipients()
    source = write_source(kind, tmp_path, rows, pg_or_none)
    expected = Counter(verdict.values())
    expected["duplicate key"] += 1  # the second k02 (the order of equal keys is the source's)
    with simulator(tmp_path, "--latency-ms", "1") as sim:
        campaign = make_campaign(tmp_path, source, sim.url)
        report = anyio.run(dry_run, campaign)
        result = anyio.run(lambda: start_run(campaign, tmp_path / "run"))
        sim.stop()
        accepted = sim.accepted()
    outcomes = ledger_outcomes(tmp_path / "run" / "ledger.jsonl")
    sent = sum(1 for s, _ in outcomes.values() if s == "sent")
    run_reasons = Counter(reason_group(e or "") for s, e in outcomes.values() if s == "rejected")
    assert result.complete and result.stopped is None
    # the figures worked out above: not zero, not everyone
    assert sent == expected["sent"] == sum(accepted.values()) == len(accepted)
    assert sent >= 12
    assert report.rows == len(rows) == len(outcomes)
    assert report.sendable == sent
    assert report.rejected == len(rows) - sent
    assert report.reasons == run_reasons
    groups = Counter({reason_group_prefix(r): n for r, n in run_reasons.items()})
    want = Counter({k: v for k, v in expected.items() if k != "sent"})
    assert groups == want, (groups, want)


def reason_group_prefix(group: str) -> str:
    """A reject group named by the prefix the test's verdicts use."""
    for prefix in ("duplicate phone", "duplicate key", "suppressed", "invalid phone number", "text longer"):
        if group.startswith(prefix):
            return prefix
    return group


def test_columns_needed_include_the_content_template(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("id,phone,first_name\nk1,13900000001,Ann\n")
    c = parse_campaign(
        {
            "source": {"kind": "csv", "path": "r.csv", "phone": "phone", "key": "id"},
            "provider": {"kind": "simulator", "endpoint": "http://127.0.0.1:9", "protocol": "nxcloud"},
            "message": {"sign_name": "{brand}", "content": CONTENT},
        },
        tmp_path,
    )
    assert columns_needed(c) == {
        "id": "source.key",
        "phone": "source.phone",
        "brand": "message.sign_name",
        "first_name": "message.content",
        "code": "message.content",
    }
    assert source_columns(c) == ["id", "phone", "brand", "first_name", "code"]
    with pytest.raises(CampaignError) as err:  # the header lacks brand and code
        check_source(c)
    assert err.value.field == "message.sign_name"
    (tmp_path / "r.csv").write_text("id,phone,first_name,brand\nk1,13900000001,Ann,Acme\n")
    with pytest.raises(CampaignError) as err:
        check_source(c)
    assert err.value.field == "message.content" and "'code'" in str(err.value)


# -- the run's streams in progress snapshots ---------------------------------------------------


def test_bottleneck_from_the_streams_fill() -> None:
    def snap(chunks: int, batches: int) -> Progress:
        return Progress(
            counts={},
            rows_read=0,
            total=None,
            elapsed=1.0,
            requests=0,
            throttles=0,
            rate_limit=1.0,
            chunks_queued=chunks,
            chunks_capacity=2,
            batches_queued=batches,
            batches_capacity=4,
        )

    assert snap(2, 4).bottleneck == "provider"  # batches wait for a worker
    assert snap(0, 0).bottleneck == "source"  # the workers wait for rows
    assert snap(1, 2).bottleneck is None
    assert (
        Progress(
            counts={}, rows_read=0, total=None, elapsed=0, requests=0, throttles=0, rate_limit=0
        ).bottleneck
        is None
    )  # no streams known


def test_a_slow_provider_shows_as_the_bottleneck(tmp_path: Path) -> None:
    """With a provider slower than the source, snapshots show full batch and chunk streams."""
    write_recipients(tmp_path / "recipients.csv", 3000)
    seen: list[Progress] = []
    stop = anyio.Event()

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.bottleneck == "provider" or len(seen) >= 200:  # bounded either way
            stop.set()

    with simulator(tmp_path, "--latency-ms", "200") as sim:
        write_campaign(tmp_path / "c.toml", sim.url, concurrency=2, batch_size=10)
        campaign = load_campaign(tmp_path / "c.toml")

        async def main() -> None:
            with anyio.fail_after(60):
                await start_run(campaign, tmp_path / "run", on_progress=on_progress, stop=stop)

        anyio.run(main)
    provider_bound = [p for p in seen if p.bottleneck == "provider"]
    assert provider_bound, [(p.chunks_queued, p.batches_queued) for p in seen]
    p = provider_bound[0]
    assert p.batches_queued == p.batches_capacity == 2  # the stream holds `concurrency` batches
    assert p.chunks_capacity == 2 and p.rows_read < 3000  # the source waits: memory stays flat


def test_sources_do_not_import_the_ledger() -> None:
    """Sources yield rows; what a resume skips is admission's decision, from the ledger."""
    repo = Path(__file__).resolve().parent.parent
    for path in [repo / "pipeline" / "source.py", *sorted((repo / "pipeline" / "db").glob("*.py"))]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        later = {
            m for m in imported if m.startswith(("pipeline.ledger", "pipeline.admit", "pipeline.engine"))
        }
        assert not later, (path.name, later)
