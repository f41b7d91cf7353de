"""Garbage in never crashes a run and never loses a row (hypothesis over source rows)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest.mock import patch

import anyio
import httpx
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.ledger import Status, replay
from pipeline.source import Columns, CsvSource, record_offset
from tests.test_engine import make_campaign, ok, run

# Cells: arbitrary bytes including NUL, quotes, newlines, invalid UTF-8, and huge fields.
cell = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"13800000000", b"+86 138 0000 0001", b"0086 13800000002", b"", b"\x00", b'"', b"x" * 70000]
    ),
)
row = st.lists(cell, min_size=0, max_size=5)


def csv_bytes(rows: list[list[bytes]]) -> bytes:
    out = b"id,phone,first\n"
    for r in rows:
        out += b",".join(r) + b"\n"
    return out


class TestGarbageRows:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(row, max_size=25))
    def test_every_row_settled_and_nothing_crashes(self, rows: list[list[bytes]]) -> None:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            campaign = make_campaign(tmp, [], max_reject_ratio=1)
            (tmp / "r.csv").write_bytes(csv_bytes(rows))
            sent: list[str] = []

            def handler(request: httpx.Request) -> httpx.Response:
                sent.extend(orjson.loads(request.content)["phones"])
                return ok(request)

            result = anyio.run(run, campaign, tmp, handler)
            state = replay(tmp / "run" / "ledger.jsonl")
            assert state.eof_rows is not None
            settled = [state.get(r) for r in range(1, state.eof_rows + 1)]
            # Every row the CSV reader saw got exactly one terminal line: sent or rejected.
            assert all(s in (Status.SENT, Status.REJECTED) for s in settled), settled
            assert result.counts["sent"] == len(sent) == settled.count(Status.SENT)
            lines = [orjson.loads(x) for x in (tmp / "run" / "ledger.jsonl").read_bytes().splitlines()]
            assert all(x["e"] for x in lines if x.get("s") == "rejected")

    def test_empty_file_and_header_only(self, tmp_path: Path) -> None:
        for content in (b"", b"id,phone,first\n"):
            d = tmp_path / str(len(content))
            d.mkdir()
            campaign = make_campaign(d, [], max_reject_ratio=1)
            (d / "r.csv").write_bytes(content)
            result = anyio.run(run, campaign, d, ok)
            assert result.complete and sum(result.counts.values()) == 0


class TestJsonl:
    def test_bad_lines_are_rejected_with_reasons(self, tmp_path: Path) -> None:
        from pipeline.app.campaign import parse_campaign

        (tmp_path / "r.jsonl").write_bytes(
            b'{"id": "a", "phone": "13800000001", "first": "Li"}\n'
            b"not json\n"
            b"\n"
            b"[1, 2]\n"
            b'{"id": "b", "phone": 13800000002, "first": 7}\n'
            b'{"id": "c", "phone": "13800000003", "first": {"x": 1}}\n'
            b'{"id": "d", "phone": null, "first": "x"}\n'
            b'{"id": "a", "phone": "13800000004", "first": "dup"}\n'
            b'{"id": "e", "phone": "13800000005", "first": "\\u0000"}\n'
            b'{"id": "f", "phone": "13800000006", "first": "Wu"'
        )
        campaign = parse_campaign(
            {
                "source": {"kind": "jsonl", "path": "r.jsonl", "phone": "phone", "key": "id"},
                "provider": {"kind": "simulator", "endpoint": "http://fake.invalid"},
                "message": {"template_code": "T", "sign_name": "S", "params": {"n": "{first}"}},
                "limits": {"max_reject_ratio": 1.0},  # every line read, however many are bad
            },
            tmp_path,
        )
        result = anyio.run(run, campaign, tmp_path, ok)
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        rejected = {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"}
        assert rejected == {
            2: "invalid JSON: invalid literal, expected 'null'",
            4: "a line must hold a JSON object",
            6: "column 'first' is not text or a number",
            7: "missing column 'phone'",
            8: "duplicate key",
            9: "NUL byte in a field",
            10: rejected.get(10, "?"),
        }
        assert rejected[10].startswith("invalid JSON")
        assert result.counts["sent"] == 2  # rows 1 and 5 (a number is text enough)


class TestColumnarSource:
    """The engine reads CSV as columns where it can: the same records as row by row, always."""

    @settings(max_examples=80, deadline=None)
    @given(st.lists(row, max_size=40), st.integers(1, 7))
    def test_columns_hold_the_same_records(self, rows: list[list[bytes]], chunk_rows: int) -> None:
        async def read(source: CsvSource) -> list[tuple[int, object]]:
            out: list[tuple[int, object]] = []
            async for chunk in source.chunks():
                out.extend(chunk.records() if isinstance(chunk, Columns) else chunk)
            return out

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "r.csv"
            path.write_bytes(csv_bytes(rows))
            with patch("pipeline.source.CHUNK_ROWS", chunk_rows):
                by_rows = anyio.run(read, CsvSource(path))
                by_columns = anyio.run(read, CsvSource(path, columnar=True))
        assert by_columns == by_rows

    def test_a_clean_file_comes_as_columns(self, tmp_path: Path) -> None:
        path = tmp_path / "r.csv"
        path.write_text("id,phone\n" + "".join(f"{i},1380000{i:04d}\n" for i in range(1, 4001)))

        async def kinds() -> list[tuple[str, int, int]]:
            return [
                (type(c).__name__, c.first if isinstance(c, Columns) else c[0][0], len(c))
                async for c in CsvSource(path, columnar=True).chunks()
            ]

        assert anyio.run(kinds) == [("Columns", 1, 2000), ("Columns", 2001, 2000)]


class TestColumnarPrepare:
    """Duplicate keys, rejects and a resume's settled rows come out the same through columns."""

    def test_duplicates_and_bad_rows_in_a_columnar_chunk(self, tmp_path: Path) -> None:
        # rows 1-10 (i + 1): ids repeat from row 8, row 4 has no first name
        rows = [
            {"id": str(i % 7), "phone": f"1380000{i:04d}", "first": "" if i == 3 else "Li"} for i in range(10)
        ]
        campaign = make_campaign(tmp_path, rows, max_reject_ratio=1)
        sent: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        anyio.run(run, campaign, tmp_path, handler)
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        rejected = {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"}
        assert rejected == {
            4: "missing column 'first'",
            8: "duplicate key",
            9: "duplicate key",
            10: "duplicate key",
        }
        assert sorted(sent) == sorted(f"861380000{i:04d}" for i in range(7) if i != 3)

    def test_chinese_keys_and_names_take_the_column_path(self, tmp_path: Path) -> None:
        """Real data (CJK keys and names, a duplicate key) never goes row by row; a key of
        undecodable bytes sends its chunk row by row, where it is rejected with its reason."""
        rows = [
            {"id": f"客户{i % 9}", "phone": f"1380000{i:04d}", "first": "王小明"[: i % 3 + 1]}
            for i in range(10)
        ]
        campaign = make_campaign(tmp_path, rows)
        sent: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        with (
            patch("pipeline.render.Renderer.render", side_effect=AssertionError("row by row")),
            patch("pipeline.source.Columns.records", side_effect=AssertionError("a dict per row")),
        ):
            anyio.run(run, campaign, tmp_path, handler)
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        assert {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"} == {10: "duplicate key"}
        assert sorted(sent) == [f"861380000{i:04d}" for i in range(9)]

        bad = tmp_path / "bad"
        bad.mkdir()
        campaign = make_campaign(bad, [], max_reject_ratio=1)  # rejected one by one, not stopped
        (bad / "r.csv").write_bytes(
            "id,phone,first\n客1,13800000001,王\n".encode() + b"k\xff,13800000002,Li\n"
        )
        anyio.run(run, campaign, bad, ok)
        lines = [orjson.loads(x) for x in (bad / "run" / "ledger.jsonl").read_bytes().splitlines()]
        assert {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"} == {
            2: "invalid UTF-8 in key column 'id'"
        }


class TestRecordOffset:
    """A resume passes over settled records by counting lines: it must land where the CSV
    reader would be after them, or decline."""

    line = st.lists(st.sampled_from(["a", "1", ",", " ", '"', "\r", "é", "\x00", ""]), max_size=6).map(
        "".join
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(line, max_size=30), st.integers(1, 12), st.sampled_from([1 << 20, 5]))
    @example(lines=[""] * 8 + ["a\r"], n=1, block=5)  # a CRLF split across two blocks
    def test_lands_where_the_reader_would(self, lines: list[str], n: int, block: int) -> None:
        import csv
        import io

        data = ("id,phone\n" + "\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "r.csv"
            path.write_bytes(data)
            offset = record_offset(path, n, block_size=block)

        def records(text: str) -> list[list[str]]:
            try:
                return [r for r in csv.reader(io.StringIO(text, newline="")) if r]
            except csv.Error:
                return [["<error>"]]

        text = data.decode("utf-8", "surrogateescape")
        everything = records(text)[1:]
        if offset is None:
            assert '"' in text or "\x00" in text or "\r" in text.replace("\r\n", "") or len(everything) < n
        else:
            assert records(data[offset:].decode("utf-8", "surrogateescape")) == everything[n:]

    def test_quotes_decline(self, tmp_path: Path) -> None:
        path = tmp_path / "r.csv"
        path.write_text('id,phone\n1,"13800000000"\n2,13800000001\n')
        assert record_offset(path, 1) is None
        path.write_text("id,phone\n\n1,13800000000\n\r\n2,13800000001\n3,x\n")
        assert path.read_bytes()[record_offset(path, 2) or 0 :] == b"3,x\n"
