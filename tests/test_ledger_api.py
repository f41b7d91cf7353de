"""The ledger as an API: its version line, typed readers, final states, throttles, grouped fsyncs."""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from pathlib import Path
from unittest.mock import patch

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.ledger as ledger_api
from pipeline.app.campaign import Campaign, RunSpec
from pipeline.app.rundir import RunDir
from pipeline.ledger import (
    VERSION,
    Attempt,
    Eof,
    Header,
    Intent,
    LedgerVersionError,
    LedgerWriter,
    Recipient,
    Status,
    events,
    final_outcomes,
    final_states,
    replay,
)
from pipeline.ops.report import build_report
from pipeline.ops.summary import summarize
from providers.base import Batch, BatchOutcome, Message, Outcome
from tests.conftest import REPO
from tests.test_engine import make_campaign, ok, rows, run
from tests.test_replay import WORDS, encode, line
from tests.test_replay import reference as replay_reference


def _batch(bid: int, first_row: int, n: int) -> Batch:
    b = Batch(bid, [Message(r, str(r), f"1380000{r:04d}", {}, "S") for r in range(first_row, first_row + n)])
    b.out_id = f"t-{bid}-1"
    return b


def test_exported_members() -> None:
    assert set(ledger_api.__all__) == {n for n in dir(ledger_api) if not n.startswith("_")} - {
        "annotations",
        "format",
        "readers",
        "state",
        "writer",
    }
    for name in ledger_api.__all__:
        assert getattr(ledger_api, name) is not None


class TestVersionLine:
    def test_a_new_ledger_begins_with_its_version(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        w.rejected([(1, "1", "bad")])
        w.close()
        assert path.read_bytes().splitlines()[0] == b'{"ledger":%d}' % VERSION
        assert replay(path).version == VERSION
        assert next(events(path)) == Header(VERSION)
        # Appending to it does not write a second version line.
        LedgerWriter(path).close()
        assert path.read_bytes().count(b'"ledger"') == 1

    def test_a_ledger_without_one_is_format_1_and_stays_so(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(b'{"i":1,"a":1,"o":"t-1-1","r":[1,2],"t":1.0}\n{"r":3,"s":"rejected","e":"x"}\n')
        state = replay(path)
        assert state.version == 1 and state.get(1) == Status.INFLIGHT and state.get(3) == Status.REJECTED
        assert not any(isinstance(e, Header) for e in events(path))
        w = LedgerWriter(path, state=state)
        w.attempt(_batch(1, 1, 2), BatchOutcome(Outcome.THROTTLED, code="Throttling"), "throttled", 1.0)
        w.close()
        last = orjson.loads(path.read_bytes().splitlines()[-1])
        assert last["s"] == "retry"  # format 1 has no "throttled": its readers would take it for a result
        assert b'"ledger"' not in path.read_bytes()
        assert replay(path).get(1) == Status.PENDING

    def test_a_newer_format_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(b'{"ledger":%d}\n{"r":1,"s":"sent"}\n' % (VERSION + 1))
        with pytest.raises(LedgerVersionError, match="upgrade"):
            replay(path)
        with pytest.raises(LedgerVersionError):
            list(events(path))

    def test_a_version_line_elsewhere_is_no_header(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(b'{"r":1,"s":"sent"}\n{"ledger":2}\n')
        assert replay(path).version == 1
        assert [type(e) for e in events(path)] == [Recipient]


class TestReaders:
    def test_events_in_order_as_typed_records(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path, keyed=True)
        b = _batch(1, 1, 2)
        b.messages[1].key = "cust-2"
        w.intent(b)
        w.attempt(
            b, BatchOutcome(Outcome.THROTTLED, code="Throttling.User", retry_after=2.0), "throttled", 3.0
        )
        w.intent(b)
        w.outcome(b, BatchOutcome(Outcome.SENT, code="OK", provider_id="biz-1"), 41.0)
        w.rejected([(3, "3", "invalid phone number")])
        w.eof(3)
        w.close()
        with path.open("ab") as f:
            f.write(b'{"r":4,"s":"se')  # torn: a kill mid-write
        got = list(events(path))
        assert [type(e) for e in got] == [
            Header,
            Intent,
            Attempt,
            Intent,
            Attempt,
            Recipient,
            Recipient,
            Recipient,
            Eof,
        ]
        intent = got[1]
        assert isinstance(intent, Intent) and (intent.batch, intent.rows, intent.out_id) == (
            1,
            [1, 2],
            "t-1-1",
        )
        assert intent.parent is None and intent.time is not None
        throttle = got[2]
        assert isinstance(throttle, Attempt)
        assert (throttle.status, throttle.code, throttle.retry_after) == ("throttled", "Throttling.User", 2.0)
        sent = got[4]
        assert isinstance(sent, Attempt) and (sent.status, sent.provider_id, sent.ms) == (
            "sent",
            "biz-1",
            41.0,
        )
        assert got[5] == Recipient(1, "sent", "1", 1, None, None, None)
        assert got[6] == Recipient(2, "sent", "cust-2", 1, None, None, None)
        assert got[7] == Recipient(3, "rejected", "3", None, None, None, "invalid phone number")
        assert got[8] == Eof(3)
        assert [type(e) for e in events(path, recipients=False)] == [
            Header,
            Intent,
            Attempt,
            Intent,
            Attempt,
            Eof,
        ]

    def test_final_state_is_each_row_once(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        first = _batch(1, 1, 3)
        w.intent(first)
        w.outcome(first, BatchOutcome(Outcome.UNKNOWN, code="InternalError"), 5.0)
        again = _batch(2, 1, 2)  # rows 1 and 2 sent again (--resend-unknown)
        w.intent(again)
        w.outcome(again, BatchOutcome(Outcome.SENT, provider_id="biz-2"), 5.0)
        in_flight = _batch(3, 3, 1)  # row 3 sent again, no result: in flight
        w.intent(in_flight)
        w.close()
        finals = {f.row: f for f in final_states(path)}
        assert set(finals) == {1, 2}
        assert finals[1].status == "sent" and finals[1].provider_id == "biz-2" and finals[1].batch == 2
        assert finals[1].time is not None and finals[1].code is None
        assert final_outcomes(path) == {("sent", None): 2}
        assert replay(path).get(3) == Status.INFLIGHT

    def test_a_row_with_hundreds_of_lines(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        lines = b"".join(b'{"r":5,"s":"deferred","c":"Busy"}\n' for _ in range(300))
        path.write_bytes(lines + b'{"r":5,"s":"sent"}\n{"r":6,"s":"failed","c":"Bad"}\n')
        assert [(f.row, f.status) for f in final_states(path)] == [(5, "sent"), (6, "failed")]
        assert final_outcomes(path) == {("sent", None): 1, ("failed", "Bad"): 1}

    def test_a_damaged_line_is_no_final_word(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(
            b'{"r":5,"s":"sent"}\n{"r":5,"s":"zz"}\n{"r":6,"s":"failed","c":"X"}\n{"r":6,"c":"Y"}\n'
        )
        assert [(f.row, f.status, f.code) for f in final_states(path)] == [
            (5, "sent", None),
            (6, "failed", "X"),
        ]
        assert final_outcomes(path) == {("sent", None): 1, ("failed", "X"): 1}

    def test_throttled_puts_rows_back_like_retry(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        b = _batch(1, 1, 2)
        w.intent(b)
        w.attempt(b, BatchOutcome(Outcome.THROTTLED, code="Throttling"), "throttled", 1.0)
        w.close()
        assert b'"s":"throttled"' in path.read_bytes()
        state = replay(path)
        assert state.get(1) == state.get(2) == Status.PENDING and not state.open_intents


def test_only_the_ledger_package_parses_ledger_lines() -> None:
    """Line starts of the format appear in pipeline/ only under pipeline/ledger/."""
    pattern = re.compile(rb"""b['"]\{\\?"(r|i|b|eof|ledger)\\?":""")
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "pipeline").rglob("*.py")
        if "ledger" not in p.relative_to(REPO / "pipeline").parts[:1] and pattern.search(p.read_bytes())
    ]
    assert offenders == []
    assert pattern.search((REPO / "pipeline" / "ledger" / "format.py").read_bytes())  # the check can fire


@pytest.mark.anyio
class TestOutcomesAddUp:
    async def test_final_states_after_retries_and_resends(self, tmp_path: Path) -> None:
        data = rows(30)
        data[2]["phone"] = "1"  # rejected
        c = make_campaign(tmp_path, data, max_attempts=2, breaker_threshold=0)
        calls = {"n": 0}

        def first_run(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            out_id = orjson.loads(request.content)["out_id"]
            if calls["n"] == 1:
                return httpx.Response(200, json={"outcome": "throttled", "code": "Throttling.User"})
            if out_id.startswith("t-1-"):
                return httpx.Response(200, json={"outcome": "unknown", "code": "InternalError"})
            if out_id.startswith("t-2-"):
                return httpx.Response(200, json={"outcome": "retry", "code": "ServiceUnavailable"})
            return httpx.Response(200, json={"outcome": "failed", "code": "isv.MOBILE_NUMBER_ILLEGAL"})

        await run(c, tmp_path, first_run)
        before = summarize(tmp_path / "run")
        assert before["codes"] == {
            "failed:isv.MOBILE_NUMBER_ILLEGAL": 9,
            "unknown:InternalError": 10,
            "deferred:ServiceUnavailable": 10,
        }
        await run(c, tmp_path, ok, resend_unknown=True)
        s = summarize(tmp_path / "run")
        assert (s["sent"], s["failed"], s["rejected"], s["unknown"], s["deferred"]) == (20, 9, 1, 0, 0)
        # Only final states: the unknown and deferred lines of the first run are history.
        assert s["codes"] == {"failed:isv.MOBILE_NUMBER_ILLEGAL": 9}
        assert s["outcomes"] == {"sent": 20, "failed:isv.MOBILE_NUMBER_ILLEGAL": 9, "rejected": 1}
        assert sum(s["outcomes"].values()) == s["source_rows"] == 30
        # Attempts still count every attempt, by outcome.
        assert s["attempts"]["throttled:Throttling.User"] == 1
        assert s["attempts"]["unknown:InternalError"] == 1
        assert s["attempts"]["retry:ServiceUnavailable"] == 2  # max_attempts = 2, then deferred
        assert s["attempts"]["deferred:ServiceUnavailable"] == 1
        assert s["attempts"]["sent"] == 2
        report = orjson.loads((build_report(tmp_path / "run").parent / "report.json").read_bytes())
        assert report["summary"]["outcomes"] == s["outcomes"]
        assert sum(report["series"]["throttles_per_second"]) == 1
        assert sum(report["series"]["retries_per_second"]) == 3  # the throttle and the two retries

    async def test_rows_in_flight_and_pending_are_counted(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(20))
        await run(c, tmp_path, ok)
        path = tmp_path / "run" / "ledger.jsonl"
        w = LedgerWriter(path)  # a resume that died with batch 9 (rows 1-3) out
        w.intent(_batch(9, 1, 3))
        w.close()
        s = summarize(tmp_path / "run")
        assert s["outcomes"] == {"sent": 17, "unknown:in flight": 3}
        assert sum(s["outcomes"].values()) == 20 and s["unknown"] == 3


@pytest.mark.anyio
class TestGroupedFsync:
    async def test_each_request_waits_for_its_intent_on_disk_and_fsyncs_are_shared(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        c = make_campaign(tmp_path, rows(100), concurrency=4)
        c = Campaign(c.source, c.provider, c.message, c.limits, RunSpec(durability="batch"))
        RunDir(tmp_path / "run").create(c.to_dict(), c.digest(), {})
        ledger = tmp_path / "run" / "ledger.jsonl"
        real_fsync = os.fsync
        synced: list[int] = []  # ledger bytes covered by each finished fsync
        threaded = 0
        intents = {"n": 0}
        third_intent = threading.Event()
        real_add = LedgerWriter._add_intent

        def add_intent(self: LedgerWriter, batch: Batch) -> None:
            real_add(self, batch)
            intents["n"] += 1
            if intents["n"] >= 3:
                third_intent.set()

        def fsync(fd: int) -> None:
            nonlocal threaded
            if not os.readlink(f"/proc/self/fd/{fd}").endswith("ledger.jsonl"):
                real_fsync(fd)
                return
            if threading.current_thread() is not threading.main_thread():
                threaded += 1
                # A slow disk: the first fsync lasts until two more intents were written meanwhile,
                # so the next fsync has two to cover.
                assert third_intent.wait(10), "no other intents while the first fsync ran"
            size = os.fstat(fd).st_size
            real_fsync(fd)
            synced.append(size)

        requests = 0
        early: list[str] = []  # requests that left before their intent was fsynced

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal requests
            requests += 1
            out_id = orjson.loads(request.content)["out_id"]
            data = ledger.read_bytes()
            end = data.index(b"\n", data.index(b'"o":"%s"' % out_id.encode())) + 1
            if max(synced, default=0) < end:
                early.append(out_id)
            return ok(request)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(LedgerWriter, "_add_intent", add_intent)
        result = await run(c, tmp_path, handler)
        assert result.counts["sent"] == 100 and requests == 10 and early == []
        assert 1 <= threaded < requests  # off the event loop, and shared by several intents


coded_line = st.tuples(
    st.just("coded"), st.integers(1, 40), st.sampled_from(list(WORDS)), st.sampled_from(["A", "B"])
)


def _encode(item: tuple[object, ...]) -> bytes:
    if item[0] == "coded":
        return b'{"r":%d,"s":"%s","b":1,"c":"%s"}' % (item[1], item[2], str(item[3]).encode())  # type: ignore[str-bytes-safe]
    return encode(item)


def _reference(data: bytes) -> tuple[dict[int, tuple[str, str | None]], Counter[tuple[str, str | None]]]:
    """Final states read line by line: each settled row's last recipient line (as replay accepts it)."""
    state = replay_reference(data)
    last: dict[int, bytes] = {}
    for raw in data.split(b"\n")[:-1]:
        if raw.startswith(b'{"r":'):
            comma = raw.find(b',"s":"', 5)
            if comma > 5 and raw[5:comma].isdigit() and raw[comma + 6 : comma + 7] in {w[:1] for w in WORDS}:
                last[int(raw[5:comma])] = raw
    finals: dict[int, tuple[str, str | None]] = {}
    outcomes: Counter[tuple[str, str | None]] = Counter()
    for row, raw in last.items():
        status = state[0].get(row, 0)
        if status in (Status.PENDING, Status.INFLIGHT):
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if obj is not None:
            finals[row] = (obj["s"], obj.get("c"))
        if b'"c":' not in raw:
            outcomes[Status(status).name.lower(), None] += 1
        elif obj is not None:
            outcomes[obj["s"], obj.get("c")] += 1
    return finals, outcomes


class TestFinalStatesMatchLineByLine:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.one_of(line, coded_line), max_size=60),
        st.binary(max_size=8),
        st.sampled_from([1 << 20, 40]),
    )
    def test_same_final_states(self, items: list[tuple[object, ...]], tail: bytes, block: int) -> None:
        import tempfile

        data = b"".join(_encode(i) + b"\n" for i in items) + tail.replace(b"\n", b"")
        finals, outcomes = _reference(data)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ledger.jsonl"
            path.write_bytes(data)
            with patch("pipeline.ledger.readers._BLOCK", block):
                got = {f.row: (f.status, f.code) for f in final_states(path)}
                assert got == finals
                assert final_outcomes(path) == outcomes
