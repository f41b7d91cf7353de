"""Database sources: SQLite and PostgreSQL (a real server, started by tests/pg.py).

In-process tests cover paging, checkpoints and the checks before a run; end-to-end
tests run ``sluice`` against the simulator: resume after a kill, a lost connection,
shards, unicode and NULLs, and a million-row table.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from pipeline.admit import open_source, resume_checkpoint
from pipeline.app.api import check_source
from pipeline.app.campaign import Campaign, parse_campaign
from pipeline.db import (
    CHECKPOINTS,
    Checkpoint,
    DbSource,
    compare_fingerprints,
    read_checkpoints,
)
from pipeline.db import source as db_source_module
from pipeline.errors import CampaignError, SourceError
from pipeline.ledger import Status, StatusArray
from pipeline.source import Rows
from tests.conftest import REPO
from tests.helpers import final_statuses, simulator, sluice
from tests.pg import PgServer, pg_fixture  # noqa: F401  (the session-wide server)

DSN_ENV = "SLUICE_TEST_DSN"


# -- helpers --------------------------------------------------------------------------
def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_db_campaign(
    path: Path,
    endpoint: str,
    source: Mapping[str, object],
    *,
    sign: str = "Acme",
    run_dir: str = "run",
    **limits: object,
) -> Path:
    lim = {
        "requests_per_second": 2000,
        "concurrency": 8,
        "batch_size": 50,
        "backoff_base_ms": 10,
        "backoff_max_ms": 100,
        **limits,
    }
    src = "\n".join(f"{k} = {_toml(v)}" for k, v in source.items() if v is not None)
    path.write_text(
        f"""
[source]
{src}
[provider]
kind = "simulator"
endpoint = "{endpoint}"
timeout = 5.0
[message]
template_code = "SMS_154950909"
sign_name = {_toml(sign)}
params = {{ name = "{{first_name}}", code = "{{code}}" }}
[limits]
{chr(10).join(f"{k} = {v}" for k, v in lim.items())}
[run]
dir = "{run_dir}"
""",
        encoding="utf-8",
    )
    return path


def make_campaign(tmp: Path, source: Mapping[str, object]) -> Campaign:
    return parse_campaign(
        {
            "source": source,
            "provider": {"kind": "simulator", "endpoint": "http://127.0.0.1:9"},
            "message": {"template_code": "T", "sign_name": "S", "params": {"n": "{first_name}"}},
        },
        tmp,
    )


def db_source(campaign: Campaign, **kwargs: Any) -> DbSource:
    """The campaign's database source, opened as a run opens it (admission's open_source)."""
    source = open_source(campaign, **kwargs)
    assert isinstance(source, DbSource)
    return source


async def read_all(source: DbSource) -> Rows:
    out: Rows = []
    async for chunk in source.chunks():
        out.extend(chunk)
    return out


def phone(i: int) -> str:
    return f"139{i:08d}"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    p = sluice(*args, env=env)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode()


def kill_after(args: Sequence[str], ledger: Path, intents: int, env: dict[str, str]) -> None:
    """Start ``sluice``; SIGKILL it once the ledger holds ``intents`` more intent lines."""
    before = ledger.read_bytes().count(b'{"i":') if ledger.exists() else 0
    p = sluice(*args, env=env)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        if ledger.exists() and ledger.read_bytes().count(b'{"i":') >= before + intents:
            break
        time.sleep(0.01)  # polling a condition, bounded by the deadline
    p.kill()
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, err.decode()


def log_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_bytes().splitlines()
    return [obj for obj in map(orjson.loads, lines) if obj.get("event") == event]


def assert_sent_once(statuses: dict[int, str], accepted: Counter[str], phones: dict[int, str]) -> None:
    """Nothing sent twice; every row sent exactly once unless it is unknown."""
    assert set(statuses) == set(phones)
    for row, ph in phones.items():
        if statuses[row] == "sent":
            assert accepted[ph] == 1, (row, ph, accepted[ph])
        else:
            assert statuses[row] == "unknown" and accepted[ph] <= 1, (row, statuses[row])
    assert sum(accepted.values()) == sum(accepted[p] for p in phones.values())


def make_sqlite(path: Path, rows: Sequence[tuple[object, ...]], *, key_type: str = "INTEGER") -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(f"CREATE TABLE people (id {key_type}, phone TEXT, first_name TEXT, code TEXT)")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)
    conn.close()


# -- campaign keys -------------------------------------------------------------------------
class TestCampaign:
    BASE: ClassVar[dict[str, object]] = {
        "kind": "postgres",
        "table": "t",
        "key": "id",
        "phone": "p",
        "dsn_env": "X",
    }

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"table": None}, "source.table"),
            ({"query": "SELECT 1"}, "source.table"),
            ({"key": None}, "source.key"),
            ({"dsn_env": None}, "source.dsn_env"),
            ({"dsn_env": "postgresql://u:pw@h/db"}, "source.dsn_env"),
            ({"path": "x.db"}, "source.path"),
            ({"row_number": "position"}, "source.row_number"),
            ({"shard": "3/2"}, "source.shard"),
            ({"shard": "0/2"}, "source.shard"),
            ({"key_from": 10, "key_to": 5}, "source.key_to"),
            ({"key_from": 1, "key_to": "z"}, "source.key_to"),
            ({"key_from": True}, "source.key_from"),
            ({"snapshot": "yes"}, "source.snapshot"),
        ],
    )
    def test_bad_postgres_source(self, tmp_path: Path, change: dict[str, object], field: str) -> None:
        src = {k: v for k, v in {**self.BASE, **change}.items() if v is not None}
        with pytest.raises(CampaignError) as exc:
            make_campaign(tmp_path, src)
        assert exc.value.field == field

    @pytest.mark.parametrize("key", ["table", "dsn_env", "key_from"])  # shard: files too (test_shards)
    def test_db_keys_refused_for_files(self, tmp_path: Path, key: str) -> None:
        with pytest.raises(CampaignError) as exc:
            make_campaign(tmp_path, {"kind": "csv", "path": "r.csv", "phone": "p", key: "1/2"})
        assert exc.value.field == f"source.{key}"

    def test_sqlite_needs_path_and_no_dsn(self, tmp_path: Path) -> None:
        with pytest.raises(CampaignError, match=r"source\.path"):
            make_campaign(tmp_path, {"kind": "sqlite", "table": "t", "key": "id", "phone": "p"})
        with pytest.raises(CampaignError, match=r"source\.dsn_env"):
            make_campaign(
                tmp_path,
                {"kind": "sqlite", "path": "a.db", "table": "t", "key": "id", "phone": "p", "dsn_env": "X"},
            )

    def test_resolved_and_normalised(self, tmp_path: Path) -> None:
        c = make_campaign(
            tmp_path,
            {"kind": "sqlite", "path": "a.db", "query": " SELECT * FROM t ; ", "key": "id", "phone": "p",
             "shard": " 2 / 3 ", "key_from": "a", "key_to": "m"},
        )  # fmt: skip
        assert c.source.path == str(tmp_path / "a.db")
        assert c.source.query == "SELECT * FROM t"
        assert c.source.shard == "2/3"


# -- checkpoints and fingerprints ----------------------------------------------------------
def statuses(*pairs: tuple[int, Status]) -> StatusArray:
    out = StatusArray()
    out.reserve(max(r for r, _ in pairs))
    for r, s in pairs:
        out[r] = s
    return out


SKIP = bytes(
    1 if v in (Status.SENT, Status.FAILED, Status.REJECTED, Status.UNKNOWN) else 0 for v in range(256)
)


class TestResumePoint:
    def test_rank_stops_below_the_first_open_row(self) -> None:
        st = statuses(*((r, Status.SENT) for r in range(1, 11)), (5, Status.DEFERRED))
        cks = [Checkpoint(2, 2, "b"), Checkpoint(4, 4, "d"), Checkpoint(6, 6, "f")]
        assert resume_checkpoint(st, SKIP, cks) == Checkpoint(4, 4, "d")

    def test_rank_needs_every_row_settled(self) -> None:
        st = statuses((1, Status.SENT), (2, Status.SENT), (4, Status.SENT))  # row 3 still pending
        assert resume_checkpoint(st, SKIP, [Checkpoint(2, 2, 2), Checkpoint(4, 4, 4)]) == Checkpoint(2, 2, 2)

    def test_unknown_is_open_with_resend_unknown(self) -> None:
        st = statuses((1, Status.SENT), (2, Status.UNKNOWN), (3, Status.SENT))
        cks = [Checkpoint(1, 1, 1), Checkpoint(3, 3, 3)]
        assert resume_checkpoint(st, SKIP, cks) == Checkpoint(3, 3, 3)
        resend = bytearray(SKIP)
        resend[Status.UNKNOWN] = 0
        assert resume_checkpoint(st, bytes(resend), cks) == Checkpoint(1, 1, 1)

    def test_key_rows_with_gaps(self) -> None:
        st = statuses((2, Status.SENT), (4, Status.REJECTED), (6, Status.SENT), (8, Status.SENT))
        cks = [Checkpoint(4, 2, 4), Checkpoint(8, 4, 8)]
        assert resume_checkpoint(st, SKIP, cks) == Checkpoint(8, 4, 8)
        st[6] = 0  # key 6 was read but not sent when the process died
        assert resume_checkpoint(st, SKIP, cks) == Checkpoint(4, 2, 4)

    def test_nothing_settled(self) -> None:
        assert resume_checkpoint(StatusArray(), SKIP, [Checkpoint(2, 2, 2)]) is None
        assert resume_checkpoint(statuses((1, Status.SENT)), SKIP, []) is None

    def test_torn_checkpoint_file(self, tmp_path: Path) -> None:
        p = tmp_path / CHECKPOINTS
        p.write_bytes(b'{"row":2,"n":2,"key":"b"}\n{"row":4,"n":4,"key"')
        assert read_checkpoints(p) == [Checkpoint(2, 2, "b")]
        assert read_checkpoints(tmp_path / "missing") == []

    def test_compare_fingerprints(self) -> None:
        base = {"kind": "postgres", "table": "t", "key": "id", "row_number": "rank", "rows": 3, "key_min": 1,
                "key_max": 3}  # fmt: skip
        assert compare_fingerprints(base, dict(base)) == (None, None)
        refusal, _ = compare_fingerprints(base, {**base, "rows": 4})
        assert refusal is not None and "--force" in refusal
        keyed = {**base, "row_number": "key"}
        assert compare_fingerprints(keyed, {**keyed, "rows": 4, "key_max": 9})[0] is None
        assert "changed" in (compare_fingerprints(keyed, {**keyed, "rows": 4})[1] or "")
        refusal, _ = compare_fingerprints(base, {**base, "table": "u"})
        assert refusal is not None and "table" in refusal


# -- SQLite, in process ----------------------------------------------------------------
class TestSqlitePaging:
    KEYS: ClassVar[list[int]] = [1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11]

    @pytest.fixture
    def db(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        monkeypatch.setattr(db_source_module, "PAGE_ROWS", 3)
        rows = [(k, phone(i), f"n{i}", str(i)) for i, k in enumerate(self.KEYS, 1)]
        make_sqlite(tmp_path / "r.db", list(reversed(rows)))
        return tmp_path / "r.db"

    @pytest.mark.anyio
    @pytest.mark.parametrize("snapshot", [False, True])
    async def test_ties_never_split_or_skipped(self, tmp_path: Path, db: Path, snapshot: bool) -> None:
        c = make_campaign(
            tmp_path,
            {
                "kind": "sqlite",
                "path": "r.db",
                "table": "people",
                "key": "id",
                "phone": "phone",
                "snapshot": snapshot,
            },
        )
        source = db_source(c, run_dir=tmp_path)
        rows = await read_all(source)
        assert [r for r, _ in rows] == list(range(1, len(self.KEYS) + 1))
        got = [(rec["id"], str(rec["first_name"])) for _, rec in rows if not isinstance(rec, str)]
        assert [k for k, _ in got] == self.KEYS
        assert sorted(n for _, n in got) == sorted(f"n{i}" for i in range(1, len(self.KEYS) + 1))
        cks = read_checkpoints(tmp_path / CHECKPOINTS)
        assert cks, "checkpoints are written"
        for ck in cks:  # every checkpoint sits at a key boundary
            assert ck.n == sum(1 for k in self.KEYS if k <= ck.key) == ck.row

    @pytest.mark.anyio
    async def test_resume_reads_after_the_checkpoint(self, tmp_path: Path, db: Path) -> None:
        c = make_campaign(
            tmp_path, {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone"}
        )
        await read_all(db_source(c, run_dir=tmp_path))
        st = statuses(*((r, Status.SENT) for r in range(1, 13)))  # rows 1..12 settled
        source = db_source(c, run_dir=tmp_path, status=st, skip=SKIP)
        assert source.start is not None and source.rows_before == source.start.n <= 12
        rows = await read_all(source)
        assert rows[0][0] == source.rows_before + 1
        assert [r for r, _ in rows][-1] == len(self.KEYS)
        assert all(not isinstance(rec, str) and rec["id"] > source.start.key for _, rec in rows)

    @pytest.mark.anyio
    async def test_bounds_and_shards_partition(self, tmp_path: Path, db: Path) -> None:
        seen: list[str] = []
        shards: list[dict[str, object]] = [{"shard": "1/3"}, {"shard": "2/3"}, {"shard": "3/3"}]
        for extra in shards:
            c = make_campaign(
                tmp_path,
                {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone", **extra},
            )
            seen += [
                str(rec["first_name"]) for _, rec in await read_all(db_source(c)) if not isinstance(rec, str)
            ]
        assert sorted(seen) == sorted(f"n{i}" for i in range(1, len(self.KEYS) + 1))
        seen = []
        bounds: list[dict[str, object]] = [{"key_to": 4}, {"key_from": 4, "key_to": 8}, {"key_from": 8}]
        for extra in bounds:
            c = make_campaign(
                tmp_path,
                {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone", **extra},
            )
            seen += [
                str(rec["first_name"]) for _, rec in await read_all(db_source(c)) if not isinstance(rec, str)
            ]
        assert sorted(seen) == sorted(f"n{i}" for i in range(1, len(self.KEYS) + 1))


class TestSqliteChecks:
    def sqlite_campaign(self, tmp_path: Path, **src: object) -> Campaign:
        return make_campaign(
            tmp_path,
            {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone", **src},
        )

    def test_fingerprint(self, tmp_path: Path) -> None:
        make_sqlite(tmp_path / "r.db", [(i, phone(i), "x", "1") for i in (3, 1, 7)])
        fp = check_source(self.sqlite_campaign(tmp_path))
        assert fp == {"kind": "sqlite", "path": str(tmp_path / "r.db"), "table": "people", "key": "id",
                      "row_number": "rank", "rows": 3, "key_min": 1, "key_max": 7}  # fmt: skip

    @pytest.mark.parametrize(
        ("src", "error", "field"),
        [
            ({"path": "missing.db"}, SourceError, None),
            ({"table": "nobody"}, CampaignError, "source.table"),
            ({"phone": "mobile"}, CampaignError, "source.phone"),
            ({"key": "uid"}, CampaignError, "source.key"),
            ({"table": None, "query": "SELEC id FROM people"}, CampaignError, "source.query"),
            ({"table": None, "query": "SELECT id, phone FROM people"}, CampaignError, "message.params.n"),
            ({"row_number": "key"}, CampaignError, "source.row_number"),
        ],
    )
    def test_errors_before_sending(
        self, tmp_path: Path, src: dict[str, object], error: type[Exception], field: str | None
    ) -> None:
        make_sqlite(tmp_path / "r.db", [(i, phone(i), "x", "1") for i in (1, 2)] + [(-5, phone(9), "x", "1")])
        base = {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone"}
        c = make_campaign(tmp_path, {k: v for k, v in {**base, **src}.items() if v is not None})
        with pytest.raises(error) as exc:
            check_source(c)
        if field is not None:
            assert isinstance(exc.value, CampaignError) and exc.value.field == field

    def test_null_and_blob_keys_refused(self, tmp_path: Path) -> None:
        make_sqlite(tmp_path / "r.db", [(1, phone(1), "x", "1"), (None, phone(2), "x", "1")])
        with pytest.raises(CampaignError, match="NULL"):
            check_source(self.sqlite_campaign(tmp_path))
        (tmp_path / "r.db").unlink()
        make_sqlite(tmp_path / "r.db", [(1, phone(1), "x", "1"), (b"\x01", phone(2), "x", "1")], key_type="")
        with pytest.raises(CampaignError, match="BLOB"):
            check_source(self.sqlite_campaign(tmp_path))

    def test_not_a_database(self, tmp_path: Path) -> None:
        (tmp_path / "r.db").write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(SourceError, match="not a database"):
            check_source(self.sqlite_campaign(tmp_path))


# -- SQLite, end to end ----------------------------------------------------------------------
class TestSqliteEndToEnd:
    def test_run_with_unicode_nulls_bad_bytes(self, tmp_path: Path) -> None:
        rows: list[tuple[object, ...]] = [(i, phone(i), f"名字{i} 😀", f"{i:06d}") for i in range(1, 1001)]
        rows += [(1001, None, "x", "1"), (1002, phone(1002), None, "2"), (1003, "12345", "x", "3")]
        make_sqlite(tmp_path / "r.db", rows)
        conn = sqlite3.connect(tmp_path / "r.db")
        with conn:  # a TEXT value that is not UTF-8
            conn.execute("INSERT INTO people VALUES (1004, ?, CAST(X'ff41' AS TEXT), '4')", (phone(1004),))
        conn.close()
        src = {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone"}
        with simulator(tmp_path) as sim:
            write_db_campaign(tmp_path / "c.toml", sim.url, src)
            code, err = run_cli("run", str(tmp_path / "c.toml"))
            sim.stop()
        assert code == 0, err
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        reasons = {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"}
        assert reasons == {
            1001: "missing column 'phone'",
            1002: "missing column 'first_name'",
            1003: "invalid phone number in column 'phone'",
            1004: "invalid UTF-8 or control characters in a field",
        }
        accepted = sim.accepted()
        assert sum(accepted.values()) == 1000 and all(accepted[phone(i)] == 1 for i in range(1, 1001))

    def test_kill_then_keyset_resume(self, tmp_path: Path) -> None:
        n = 12_000
        make_sqlite(tmp_path / "r.db", [(i * 3, phone(i), f"n{i}", f"{i:06d}") for i in range(1, n + 1)])
        phones = {i: phone(i) for i in range(1, n + 1)}
        run_dir = tmp_path / "run"
        src = {"kind": "sqlite", "path": "r.db", "table": "people", "key": "id", "phone": "phone"}
        with simulator(tmp_path, "--latency-ms", "5") as sim:
            write_db_campaign(tmp_path / "c.toml", sim.url, src, requests_per_second=300, batch_size=20)
            kill_after(("run", str(tmp_path / "c.toml")), run_dir / "ledger.jsonl", 160, {})
            code, err = run_cli("resume", str(run_dir))
            sim.stop()
        assert code in (0, 3), err
        [resumed] = log_events(run_dir, "source_resume")
        assert resumed["rows_before"] >= 2000
        assert_sent_once(final_statuses(run_dir / "ledger.jsonl"), sim.accepted(), phones)


# -- PostgreSQL ------------------------------------------------------------------------------
def pg_table(pg: PgServer, name: str, n: int, *, ids: str = "i", extra: str = "") -> None:
    pg.execute(
        f"DROP TABLE IF EXISTS {name}",
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, phone text, first_name text, code text{extra})",
        f"INSERT INTO {name} SELECT {ids}, '139' || lpad(i::text, 8, '0'), 'n' || i, lpad(i::text, 6, '0') "
        f"FROM generate_series(1, {n}) AS i",
    )


def pg_src(table: str | None, **extra: object) -> dict[str, object]:
    return {"kind": "postgres", "table": table, "key": "id", "phone": "phone", "dsn_env": DSN_ENV, **extra}


@pytest.fixture
def dsn_env(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv(DSN_ENV, pg.dsn())
    return {DSN_ENV: pg.dsn()}


def no_secret_in(run_dir: Path, *texts: str) -> None:
    from tests.pg import PASSWORD

    for text in texts:
        assert PASSWORD not in text
    if run_dir.exists():
        for f in run_dir.iterdir():
            assert PASSWORD.encode() not in f.read_bytes(), f


class TestPostgresChecks:
    def campaign(self, tmp_path: Path, table: str | None = "chk", **src: Any) -> Campaign:
        return make_campaign(tmp_path, {k: v for k, v in pg_src(table, **src).items() if v is not None})

    def test_fingerprint(self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
        pg_table(pg, "chk", 10, ids="i * 10")
        fp = check_source(self.campaign(tmp_path))
        assert fp == {"kind": "postgres", "dsn_env": DSN_ENV, "table": "chk", "key": "id",
                      "row_number": "rank", "rows": 10, "key_min": 10, "key_max": 100}  # fmt: skip
        q = check_source(
            self.campaign(tmp_path, table=None, query="SELECT * FROM chk WHERE id > 50", shard="2/3")
        )
        assert q["rows"] == 2 and q["shard"] == "2/3" and "query_sha256" in q  # 70, 100

    @pytest.mark.parametrize(
        ("src", "field", "match"),
        [
            ({"table": "missing_table"}, "source.table", "missing_table"),
            ({"phone": "mobile"}, "source.phone", "mobile"),
            ({"key": "uid"}, "source.key", "uid"),
            ({"table": None, "query": "SELEC * FROM chk"}, "source.query", "syntax error"),
            ({"table": None, "query": "SELECT *, 1 / (id - id) AS boom FROM chk"},
             "source.query", "division"),
            ({"table": None, "query": "SELECT id::text AS id, phone, first_name FROM chk", "shard": "1/2"},
             "source.shard", "integer"),
            ({"row_number": "key", "table": None,
              "query": "SELECT id * 1000000 AS id, phone, first_name FROM chk"},
             "source.row_number", "spans"),
        ],
    )  # fmt: skip
    def test_clear_errors(
        self,
        pg: PgServer,
        tmp_path: Path,
        dsn_env: dict[str, str],
        src: dict[str, Any],
        field: str,
        match: str,
    ) -> None:
        pg_table(pg, "chk", 10)
        with pytest.raises(CampaignError, match=match) as exc:
            check_source(self.campaign(tmp_path, **src))
        assert exc.value.field == field

    def test_null_key(self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
        pg_table(pg, "chk", 10)
        c = self.campaign(
            tmp_path, table=None, query="SELECT NULLIF(id, 3) AS id, phone, first_name FROM chk"
        )
        with pytest.raises(CampaignError, match="1 rows have a NULL") as exc:
            check_source(c)
        assert exc.value.field == "source.key"

    @pytest.mark.parametrize(
        ("override", "match"),
        [
            ({"password": "wrong-password"}, "password authentication failed"),
            ({"port": 1}, "Connection refused"),
            ({"dbname": "no_such_db"}, "does not exist"),
        ],
    )
    def test_connection_errors(
        self,
        pg: PgServer,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        override: dict[str, object],
        match: str,
    ) -> None:
        monkeypatch.setenv(DSN_ENV, pg.dsn(**override))
        with pytest.raises(SourceError, match=match) as exc:
            check_source(self.campaign(tmp_path))
        assert DSN_ENV in str(exc.value)
        no_secret_in(tmp_path, str(exc.value))

    def test_dsn_missing_or_malformed(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(DSN_ENV, raising=False)
        with pytest.raises(SourceError, match=f"{DSN_ENV} .* is not set"):
            check_source(self.campaign(tmp_path))
        monkeypatch.setenv(DSN_ENV, "host=db password=hunter2-secret garbage")
        with pytest.raises(SourceError, match="not a valid connection string") as exc:
            check_source(self.campaign(tmp_path))
        assert "hunter2" not in str(exc.value)

    def test_cli_refuses_before_sending(self, pg: PgServer, tmp_path: Path) -> None:
        pg_table(pg, "chk", 10)
        with simulator(tmp_path) as sim:
            for i, (src, env) in enumerate(
                [
                    (pg_src("missing_table"), {DSN_ENV: pg.dsn()}),
                    (pg_src("chk"), {DSN_ENV: pg.dsn(password="wrong-password")}),
                    (pg_src("chk", phone="mobile"), {DSN_ENV: pg.dsn()}),
                ]
            ):
                write_db_campaign(tmp_path / f"c{i}.toml", sim.url, src, run_dir=f"run{i}")
                code, err = run_cli("run", str(tmp_path / f"c{i}.toml"), env=env)
                assert code == 2, err
                assert "error" in err
                no_secret_in(tmp_path / f"run{i}", err)
                assert not (tmp_path / f"run{i}" / "ledger.jsonl").exists()
            sim.stop()
        assert sum(sim.accepted().values()) == 0


class TestPostgresEndToEnd:
    def test_unicode_nulls_and_types(self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
        pg.execute(
            "DROP TABLE IF EXISTS uni",
            "CREATE TABLE uni (id text PRIMARY KEY, phone text, first_name text, code numeric, sign text)",
            "INSERT INTO uni VALUES ('a-1', '13900000001', '张伟 😀', 12.50, '阿里云'),"
            " ('a-2', '13900000002', 'Zoë', 7, 'Ünïcødé'), ('a-3', NULL, 'x', 1, 'S'),"
            " ('a-4', '13900000004', NULL, 1, 'S'), ('a-5', '+8613900000005', 'y', NULL, 'S'),"
            " ('b-6', '13900000006', 'ok', 3, NULL)",
        )
        src = pg_src("uni")
        with simulator(tmp_path) as sim:
            write_db_campaign(tmp_path / "c.toml", sim.url, src, sign="{sign}", max_reject_ratio=1)
            code, err = run_cli("run", str(tmp_path / "c.toml"), env=dsn_env)
            sim.stop()
        assert code == 0, err
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        by_key = {x["k"]: x for x in lines if "s" in x and "r" in x}
        assert {k: v["s"] for k, v in by_key.items()} == {
            "a-1": "sent", "a-2": "sent", "a-3": "rejected", "a-4": "rejected", "a-5": "rejected",
            "b-6": "rejected",
        }  # fmt: skip
        assert by_key["a-3"]["e"] == "missing column 'phone'"
        assert by_key["a-4"]["e"] == "missing column 'first_name'"
        assert by_key["a-5"]["e"] == "missing column 'code'"
        assert by_key["b-6"]["e"] == "missing column 'sign'"
        receipts = [orjson.loads(x) for x in sim.receipts.read_bytes().splitlines()]
        assert sorted(r["sign"] for r in receipts) == sorted(["阿里云", "Ünïcødé"])
        no_secret_in(tmp_path / "run", err)

    def test_kill_then_keyset_resume(self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
        n = 15_000
        pg_table(pg, "killme", n, ids="i * 2")
        phones = {i: phone(i) for i in range(1, n + 1)}
        run_dir = tmp_path / "run"
        with simulator(tmp_path, "--latency-ms", "5") as sim:
            write_db_campaign(
                tmp_path / "c.toml", sim.url, pg_src("killme"), requests_per_second=300, batch_size=20
            )
            kill_after(("run", str(tmp_path / "c.toml")), run_dir / "ledger.jsonl", 150, dsn_env)
            kill_after(("resume", str(run_dir)), run_dir / "ledger.jsonl", 150, dsn_env)
            code, err = run_cli("resume", str(run_dir), env=dsn_env)
            sim.stop()
        assert code in (0, 3), err
        resumed = log_events(run_dir, "source_resume")
        assert len(resumed) == 2 and 2000 <= resumed[0]["rows_before"] < resumed[1]["rows_before"]
        assert_sent_once(final_statuses(run_dir / "ledger.jsonl"), sim.accepted(), phones)
        no_secret_in(run_dir, err)

    def test_connection_lost_stops_cleanly_then_resume(
        self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]
    ) -> None:
        n = 20_000
        pg_table(pg, "lost", n)
        run_dir = tmp_path / "run"
        ledger = run_dir / "ledger.jsonl"
        with simulator(tmp_path, "--latency-ms", "20") as sim:
            write_db_campaign(
                tmp_path / "c.toml", sim.url, pg_src("lost"), requests_per_second=250, batch_size=20
            )
            p = sluice("run", str(tmp_path / "c.toml"), env=dsn_env)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                if ledger.exists() and ledger.read_bytes().count(b'"s":"sent"') >= 500:
                    break
                time.sleep(0.01)  # polling a condition, bounded by the deadline
            with pg.connect() as conn:
                backends = conn.execute(
                    "SELECT pid, backend_xmin FROM pg_stat_activity WHERE application_name = 'sluice'"
                ).fetchall()
                assert len(backends) == 1, backends
                assert backends[0][1] is None, "no snapshot is held between pages"
                conn.execute("SELECT pg_terminate_backend(%s)", (backends[0][0],))
            _, err = p.communicate(timeout=60)
            assert p.returncode == 4, err.decode()
            assert "the source failed" in err.decode()
            mid = final_statuses(ledger)
            assert 500 <= len(mid) < n and "unknown" not in mid.values()
            for line in ledger.read_bytes().splitlines():
                orjson.loads(line)  # flushed whole
            code, err2 = run_cli("resume", str(run_dir), env=dsn_env)
            sim.stop()
        assert code == 0, err2
        accepted = sim.accepted()
        assert all(accepted[phone(i)] == 1 for i in range(1, n + 1)) and sum(accepted.values()) == n

    def test_shards_and_ranges_cover_every_row_once(
        self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]
    ) -> None:
        n = 3000
        pg_table(pg, "sharded", n, ids="i * 7 - 20")  # negative keys too
        parts: list[dict[str, object]] = [{"shard": f"{i}/3"} for i in (1, 2, 3)]
        parts += [{"key_to": 5000}, {"key_from": 5000, "key_to": 12000}, {"key_from": 12000}]
        with simulator(tmp_path) as sim:
            for i, extra in enumerate(parts):
                write_db_campaign(
                    tmp_path / f"c{i}.toml", sim.url, pg_src("sharded", **extra), run_dir=f"run{i}"
                )
            for group in (range(3), range(3, 6)):  # three workers at once, twice
                procs = [sluice("run", str(tmp_path / f"c{i}.toml"), env=dsn_env) for i in group]
                for p in procs:
                    _, err = p.communicate(timeout=120)
                    assert p.returncode == 0, err.decode()
            sim.stop()
        accepted = sim.accepted()
        assert all(accepted[phone(i)] == 2 for i in range(1, n + 1))  # once per partition scheme
        assert sum(accepted.values()) == 2 * n
        rows = [len(final_statuses(tmp_path / f"run{i}" / "ledger.jsonl")) for i in range(6)]
        assert sum(rows[:3]) == sum(rows[3:]) == n and all(rows)

    def test_snapshot_mode(self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
        pg_table(pg, "snap", 5000)
        query = "SELECT * FROM snap WHERE code LIKE '%5'"
        src = {**pg_src("snap"), "table": None, "query": query, "snapshot": True}
        with simulator(tmp_path) as sim:
            write_db_campaign(tmp_path / "c.toml", sim.url, src)
            code, err = run_cli("run", str(tmp_path / "c.toml"), env=dsn_env)
            sim.stop()
        assert code == 0, err
        accepted = sim.accepted()
        assert set(accepted) == {phone(i) for i in range(5, 5001, 10)} and set(accepted.values()) == {1}

    @pytest.mark.parametrize("row_number", ["key", "rank"])
    def test_changed_table_on_resume(
        self, pg: PgServer, tmp_path: Path, dsn_env: dict[str, str], row_number: str
    ) -> None:
        n = 8000
        table = f"changing_{row_number}"
        pg_table(pg, table, n, ids="i * 2")
        run_dir = tmp_path / "run"
        with simulator(tmp_path, "--latency-ms", "5") as sim:
            write_db_campaign(
                tmp_path / "c.toml", sim.url, pg_src(table, row_number=row_number),
                requests_per_second=300, batch_size=20,
            )  # fmt: skip
            kill_after(("run", str(tmp_path / "c.toml")), run_dir / "ledger.jsonl", 150, dsn_env)
            # Below the resume point a row goes; past it, new rows arrive.
            pg.execute(
                f"DELETE FROM {table} WHERE id = 2",
                f"INSERT INTO {table} SELECT 2 * i + 1, '137' || lpad(i::text, 8, '0'), 'new', '1' "
                f"FROM generate_series({n - 100}, {n - 1}) AS i",
            )
            code, err = run_cli("resume", str(run_dir), env=dsn_env)
            if row_number == "rank":
                assert code == 2 and "row positions may have shifted" in err, err
                code, err = run_cli("resume", str(run_dir), "--force", env=dsn_env)
            sim.stop()
        assert code in (0, 3), err
        accepted = sim.accepted()
        assert max(accepted.values()) == 1, "nobody is sent twice"
        if row_number == "key":
            assert log_events(run_dir, "source_changed")
            new = [f"137{i:08d}" for i in range(n - 100, n)]
            assert all(accepted[p] == 1 for p in new)
            statuses = final_statuses(run_dir / "ledger.jsonl")
            assert all(statuses[2 * i] in ("sent", "unknown") for i in range(2, n + 1))


# -- a million rows ----------------------------------------------------------------------------
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from a big
# pytest process would report the parent's peak instead of its own.
RUNNER = (
    "import sys\n"
    "from pipeline.app.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
    "sys.stderr.write('PEAK_RSS_KB %s\\n' % hwm)\n"
    "sys.exit(code)\n"
)


def run_measured(args: Sequence[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in MiB, stderr) of one ``sluice`` process."""
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        timeout=300,
    )
    elapsed = time.monotonic() - t0
    err = p.stderr.decode()
    peak = next(int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KB"))
    return p.returncode, elapsed, peak / 1024, err


@pytest.mark.slow
def test_million_rows_stream_with_flat_memory(pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
    pg_table(pg, "big", 1_000_000)
    pg_table(pg, "small", 100_000)
    results = {}
    with simulator(tmp_path, "--minimal") as sim:
        for table in ("small", "big"):
            path = write_db_campaign(
                tmp_path / f"{table}.toml", sim.url, pg_src(table), run_dir=f"run-{table}",
                requests_per_second=20_000, concurrency=64, batch_size=100,
            )  # fmt: skip
            code, elapsed, peak, err = run_measured(("run", str(path)), dsn_env)
            assert code == 0, err
            results[table] = (elapsed, peak)
        sim.stop()
    accepted = sim.accepted()
    assert len(accepted) == 1_000_000 and sum(accepted.values()) == 1_100_000
    (_, rss_small), (t_big, rss_big) = results["small"], results["big"]
    print(
        f"\n1M-row PostgreSQL table through the simulator: {1_000_000 / t_big:,.0f} rows/s "
        f"({t_big:.1f} s wall, process start included), peak RSS {rss_big:.1f} MiB "
        f"(100k rows: {rss_small:.1f} MiB)"
    )
    assert rss_big < 200
    # Ten times the rows: the ledger's byte and the key set's 8 bytes per row (~9 MiB), little else.
    assert rss_big - rss_small < 40


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux); returns it in KiB, or 0 if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_kb()
    except OSError:
        return 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_million_rows_source_alone(pg: PgServer, tmp_path: Path, dsn_env: dict[str, str]) -> None:
    with pg.connect() as conn:
        exists = conn.execute("SELECT to_regclass('big') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        pg_table(pg, "big", 1_000_000)
    c = make_campaign(tmp_path, pg_src("big"))
    source = db_source(c, run_dir=tmp_path)
    base = _reset_peak_rss()
    t0 = time.monotonic()
    n = 0
    async for chunk in source.chunks():
        n += len(chunk)
    elapsed = time.monotonic() - t0
    growth = f"{(_peak_rss_kb() - base) / 1024:.1f} MiB" if base else "n/a"
    print(
        f"\n1M-row PostgreSQL source alone: {n / elapsed:,.0f} rows/s; peak RSS grew {growth} while streaming"
    )
    assert n == 1_000_000
    assert len(read_checkpoints(tmp_path / CHECKPOINTS)) == 500
