"""The engine with a fake provider over httpx.MockTransport (unit level).

End-to-end behaviour over real sockets against the simulator is in test_e2e.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Hashable
from pathlib import Path
from unittest.mock import patch

import httpx
import orjson
import pytest

from pipeline import source as source_module
from pipeline.app.api import run_status
from pipeline.app.campaign import Campaign, parse_campaign
from pipeline.app.rundir import RunDir
from pipeline.engine import run_campaign
from pipeline.ledger import Status, replay
from pipeline.ops.summary import summarize
from providers.base import Batch, BatchOutcome, Message, Outcome, WireRequest
from tests.helpers import cut_ledger


class FakeProvider:
    """Sends the batch's phones as JSON; the handler decides the answer."""

    name = "fake"
    max_batch_size = 10

    def batch_key(self, message: Message) -> Hashable:
        return None

    def build_request(self, batch: Batch) -> httpx.Request:
        body = orjson.dumps({"out_id": batch.out_id, "phones": [m.phone for m in batch.messages]})
        return httpx.Request("POST", "http://fake.invalid/send", content=body)

    def build_wire(self, batch: Batch) -> WireRequest:
        return WireRequest.from_httpx(self.build_request(batch))

    def parse_response(self, batch: Batch, response: httpx.Response) -> BatchOutcome:
        data = orjson.loads(response.content)
        return BatchOutcome(Outcome(data["outcome"]), code=data.get("code"), provider_id=data.get("id"))


def make_campaign(tmp_path: Path, rows: list[dict[str, str]], **limits: object) -> Campaign:
    src = tmp_path / "r.csv"
    cols = ["id", "phone", "first"]
    src.write_text(",".join(cols) + "\n" + "".join(",".join(r.get(c, "") for c in cols) + "\n" for r in rows))
    return parse_campaign(
        {
            "source": {"kind": "csv", "path": "r.csv", "phone": "phone", "key": "id"},
            "provider": {"kind": "simulator", "endpoint": "http://fake.invalid"},
            "message": {"template_code": "T", "sign_name": "S", "params": {"n": "{first}"}},
            "limits": {
                "requests_per_second": 10000,
                "concurrency": 4,
                "batch_size": 10,
                "backoff_base_ms": 1,
                "backoff_max_ms": 2,
                **limits,
            },
        },
        tmp_path,
    )


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"k{i}", "phone": f"138{i:08d}", "first": f"n{i}"} for i in range(1, n + 1)]


async def run(campaign: Campaign, tmp_path: Path, handler: object, **kw: object):  # type: ignore[no-untyped-def]
    rd = RunDir(tmp_path / "run")
    if not rd.exists():
        rd.create(campaign.to_dict(), campaign.digest(), {})
    return await run_campaign(
        campaign,
        rd,
        provider=FakeProvider(),
        run_id="t",
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"outcome": "sent", "id": "B1"})


@pytest.mark.anyio
class TestEngine:
    async def test_all_sent_and_rejects(self, tmp_path: Path) -> None:
        data = rows(95)
        data[4]["phone"] = "12"  # invalid
        data[9]["first"] = ""  # missing param column
        data[20]["id"] = "k1"  # duplicate key
        c = make_campaign(tmp_path, data)
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        result = await run(c, tmp_path, handler)
        assert result.complete
        assert result.counts["sent"] == 92 and result.counts["rejected"] == 3
        assert len(seen) == len(set(seen)) == 92
        status = run_status(tmp_path / "run")
        assert status["sent"] == 92 and status["complete"] and status["pending"] == 0
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        reasons = {x["r"]: x["e"] for x in lines if x.get("s") == "rejected"}
        assert reasons == {
            5: "invalid phone number in column 'phone'",
            10: "missing column 'first'",
            21: "duplicate key",
        }

    async def test_connect_errors_retry_and_read_timeouts_are_unknown(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(30))
        calls = {"n": 0}

        def handler(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            out_id = orjson.loads(request.content)["out_id"]
            if out_id.startswith("t-1-"):
                if out_id == "t-1-1":
                    raise httpx.ConnectError("refused", request=request)
                return ok(request)
            if out_id.startswith("t-2-"):
                raise httpx.ReadTimeout("slow", request=request)
            return ok(request)

        result = await run(c, tmp_path, handler)
        assert result.counts["sent"] == 20 and result.counts["unknown"] == 10
        assert result.complete  # unknown is settled; the exit code (3) says it is not clean
        state = replay(tmp_path / "run" / "ledger.jsonl")
        assert {state.get(r) for r in range(11, 21)} == {Status.UNKNOWN}

    async def test_retry_budget_spent_defers_then_resume_sends(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(10), max_attempts=2)

        def refuse(request: httpx.Request) -> httpx.Response:  # provably not processed, retryable
            return httpx.Response(200, json={"outcome": "retry", "code": "SignatureDoesNotMatch"})

        first = await run(c, tmp_path, refuse)
        assert first.counts["deferred"] == 10 and not first.complete
        second = await run(c, tmp_path, ok)
        assert second.counts["sent"] == 10 and second.counts["deferred"] == 0 and second.complete

    async def test_fatal_stops_the_run_and_leaves_rows_pending(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(100), concurrency=1)

        def fatal(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"outcome": "fatal", "code": "isv.AMOUNT_NOT_ENOUGH"})

        result = await run(c, tmp_path, fatal)
        assert result.stopped and result.stop_code == "isv.AMOUNT_NOT_ENOUGH"
        assert result.counts["sent"] == result.counts["failed"] == 0
        status = run_status(tmp_path / "run")
        assert status["sent"] == 0 and not status["complete"]
        again = await run(c, tmp_path, ok)
        assert again.complete and again.counts["sent"] == 100

    async def test_throttles_are_not_failures(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(20))
        state = {"n": 0}

        def throttle_twice(request: httpx.Request) -> httpx.Response:
            state["n"] += 1
            if state["n"] <= 2:
                return httpx.Response(200, json={"outcome": "throttled", "code": "Throttling.User"})
            return ok(request)

        result = await run(c, tmp_path, throttle_twice)
        assert result.complete and result.counts["sent"] == 20 and result.throttles == 2

    async def test_resume_skips_settled_and_settles_interrupted(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(30))
        await run(c, tmp_path, ok)
        ledger = tmp_path / "run" / "ledger.jsonl"
        # Simulate a crash: keep everything up to the second intent line.
        lines = ledger.read_bytes().splitlines(keepends=True)
        intents = [i for i, x in enumerate(lines) if x.startswith(b'{"i":')]
        cut_ledger(tmp_path / "run", b"".join(lines[: intents[1] + 1]))
        sent_before = sum(1 for x in lines[: intents[1]] if b'"s":"sent"' in x and x.startswith(b'{"r"'))
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        result = await run(c, tmp_path, handler)
        assert len(seen) == 30 - sent_before - 10  # the interrupted batch is unknown, not re-sent
        assert result.counts["unknown"] == 10 and result.counts["sent"] == 20


@pytest.mark.anyio
class TestStatusAndExport:
    async def test_codes_timing_and_final_outcomes(self, tmp_path: Path) -> None:
        import io

        from pipeline.ops.summary import export_rows, summarize

        data = rows(30)
        data[2]["phone"] = "1"
        c = make_campaign(tmp_path, data, max_attempts=1)

        def handler(request: httpx.Request) -> httpx.Response:
            out_id = orjson.loads(request.content)["out_id"]
            if out_id.startswith("t-2-"):
                return httpx.Response(200, json={"outcome": "failed", "code": "isv.MOBILE_NUMBER_ILLEGAL"})
            return httpx.Response(200, json={"outcome": "sent", "id": f"biz-{out_id}"})

        await run(c, tmp_path, handler)
        s = summarize(tmp_path / "run")
        assert (s["sent"], s["failed"], s["rejected"]) == (19, 10, 1)
        assert s["codes"] == {"failed:isv.MOBILE_NUMBER_ILLEGAL": 10}
        assert s["attempts"]["sent"] == 2 and s["attempts"]["failed:isv.MOBILE_NUMBER_ILLEGAL"] == 1
        assert s["first_send"] <= s["last_send"] and s["complete"]
        buf = io.BytesIO()
        assert export_rows(tmp_path / "run", "jsonl", buf) == 30
        recs = {r["key"]: r for r in map(orjson.loads, buf.getvalue().splitlines())}
        assert recs["k1"]["status"] == "sent" and recs["k1"]["provider_id"] == "biz-t-1-1"
        assert recs["k3"]["status"] == "rejected" and "invalid phone" in recs["k3"]["code"]
        assert recs["k15"]["code"] == "isv.MOBILE_NUMBER_ILLEGAL"
        csv_buf = io.BytesIO()
        assert export_rows(tmp_path / "run", "csv", csv_buf) == 30
        header = (
            b"row,key,phone,status,code,provider_id,batch,time,message,delivery,delivery_code,delivered_at"
        )
        assert csv_buf.getvalue().splitlines()[0] == header
        assert recs["k1"]["phone"] == "13800000001"

    async def test_export_keeps_only_the_last_outcome(self, tmp_path: Path) -> None:
        import io

        from pipeline.ops.summary import export_rows

        c = make_campaign(tmp_path, rows(10), max_attempts=1)

        def refuse(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"outcome": "retry", "code": "SignatureDoesNotMatch"})

        await run(c, tmp_path, refuse)  # all deferred
        await run(c, tmp_path, ok)  # then sent
        buf = io.BytesIO()
        assert export_rows(tmp_path / "run", "jsonl", buf) == 10
        assert {orjson.loads(x)["status"] for x in buf.getvalue().splitlines()} == {"sent"}


@pytest.mark.anyio
class TestCircuitBreaker:
    async def test_trips_on_a_run_of_unknowns_and_leaves_the_rest_pending(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(500), concurrency=1, breaker_window=5, breaker_threshold=0.6)

        def timeout(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        result = await run(c, tmp_path, timeout)
        assert result.stop_code == "CircuitBreaker" and "of the last 5 batches" in (result.stopped or "")
        assert result.counts["unknown"] == 50  # five batches of ten, then it stopped
        status = run_status(tmp_path / "run")
        assert not status["complete"] and status["sent"] == 0

    async def test_off_when_threshold_is_zero(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(100), breaker_window=2, breaker_threshold=0)

        def timeout(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        result = await run(c, tmp_path, timeout)
        assert result.stopped is None and result.counts["unknown"] == 100


class TestBreakerUnit:
    def test_window(self) -> None:
        from pipeline.dispatch import CircuitBreaker

        b = CircuitBreaker(window=4, threshold=0.5)
        assert [b.record(x) for x in (True, False, False)] == [False, False, False]  # window not full
        assert b.record(True) is True  # 2 of 4
        b2 = CircuitBreaker(window=4, threshold=0.5)
        assert not any(b2.record(x) for x in (True, False, False, False, False, True, False, False))


@pytest.mark.anyio
class TestDurability:
    # batch: at least one fsync; that each request waits for its intent's is tested in test_ledger_api.py
    @pytest.mark.parametrize(("mode", "min_syncs"), [("process", 0), ("batch", 1), ("interval", 1)])
    async def test_fsync_per_mode(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, min_syncs: int
    ) -> None:
        import os

        import pipeline.app.campaign as pc

        c = make_campaign(tmp_path, rows(100))
        c = pc.Campaign(
            c.source, c.provider, c.message, c.limits, pc.RunSpec(durability=mode, fsync_interval_ms=1)
        )
        RunDir(tmp_path / "run").create(c.to_dict(), c.digest(), {})  # run.json is always synced
        calls: list[int] = []
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
        await run(c, tmp_path, ok)
        if mode == "process":
            assert calls == []
        else:
            assert len(calls) >= min_syncs


@pytest.mark.anyio
class TestResendUnknown:
    async def test_unknown_kept_by_default_and_resent_on_request(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(20), breaker_threshold=0)
        state = {"n": 0}

        def first_batch_times_out(request: httpx.Request) -> httpx.Response:
            state["n"] += 1
            if orjson.loads(request.content)["out_id"].startswith("t-1-"):
                raise httpx.ReadTimeout("slow", request=request)
            return ok(request)

        first = await run(c, tmp_path, first_batch_times_out)
        assert first.counts["unknown"] == 10 and first.counts["sent"] == 10
        seen: list[str] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        again = await run(c, tmp_path, record)
        assert seen == [] and again.counts["unknown"] == 10  # never re-sent silently
        resent = await run(c, tmp_path, record, resend_unknown=True)
        assert len(seen) == 10 and resent.counts["sent"] == 20 and resent.counts["unknown"] == 0


class TestDryRun:
    def test_counts_rejects_segments_and_cost_and_sends_nothing(self, tmp_path: Path) -> None:
        import dataclasses

        import anyio

        from pipeline.ops.dryrun import dry_run

        data = rows(10)
        data[0]["first"] = "x" * 80  # long parameter: 2 segments
        data[1]["phone"] = "999"
        data[3]["id"] = "k3"  # row 4 repeats row 3's key
        c = make_campaign(tmp_path, data)
        c = dataclasses.replace(
            c,
            message=dataclasses.replace(c.message, template_text="Hi ${n}, welcome", price_per_segment=0.05),
        )
        report = anyio.run(dry_run, c)
        assert report.rows == 10 and report.rejected == 2 and report.sendable == 8
        assert report.reasons["duplicate key"] == 1
        assert report.segments == 9 and report.by_segments == {1: 7, 2: 1}
        assert abs(report.estimated_cost - 0.45) < 1e-9
        assert not (tmp_path / "run").exists()


@pytest.mark.anyio
class TestScheduleInTheEngine:
    async def test_outside_the_window_nothing_is_sent_and_progress_says_why(self, tmp_path: Path) -> None:
        import dataclasses
        import datetime as dt

        import anyio

        from pipeline.app.campaign import RunSpec, ScheduleSpec

        now = dt.datetime.now(dt.UTC)
        start = (now + dt.timedelta(hours=2)).strftime("%H:00")
        end = (now + dt.timedelta(hours=3)).strftime("%H:00")
        c = make_campaign(tmp_path, rows(20))
        c = dataclasses.replace(
            c,
            schedule=ScheduleSpec(window=f"{start}-{end}", timezone="UTC"),
            run=RunSpec(stop_deadline_s=0.05),
        )
        stop = anyio.Event()
        paused: list[str] = []

        def progress(p: object) -> None:
            text = getattr(p, "paused", None)
            if text:
                paused.append(text)
                stop.set()

        calls: list[int] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(1)
            return ok(request)

        result = await run(c, tmp_path, handler, stop=stop, on_progress=progress, progress_interval=0.01)
        assert calls == [] and result.counts["sent"] == 0 and result.stopped
        assert "outside the send window" in paused[0] and f"{start}" in paused[0]


@pytest.mark.anyio
class TestReport:
    async def test_files_and_series(self, tmp_path: Path) -> None:
        from pipeline.ops.report import build_report

        c = make_campaign(tmp_path, rows(60), max_attempts=3)
        state = {"n": 0}

        def handler(request: httpx.Request) -> httpx.Response:
            state["n"] += 1
            if state["n"] == 1:
                return httpx.Response(200, json={"outcome": "throttled", "code": "Throttling.User"})
            if orjson.loads(request.content)["out_id"].startswith("t-3-"):
                return httpx.Response(200, json={"outcome": "failed", "code": "isv.MOBILE_NUMBER_ILLEGAL"})
            return ok(request)

        await run(c, tmp_path, handler)
        html = build_report(tmp_path / "run")
        out = html.parent
        for name in ("report.html", "sends_per_second.png", "outcomes.png", "latency.png", "retries.png"):
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"<!doctype html>" in data
        report = orjson.loads((out / "report.json").read_bytes())
        series = report["series"]
        assert sum(series["settled_per_second"]["sent"]) == 50
        assert sum(series["settled_per_second"]["failed"]) == 10
        assert sum(series["throttles_per_second"]) == 1 == sum(series["retries_per_second"])
        assert len(series["latency_ms"]["p50"]) >= 1
        assert report["summary"]["codes"] == {"failed:isv.MOBILE_NUMBER_ILLEGAL": 10}
        assert b"data:image/png;base64," in html.read_bytes()


@pytest.mark.anyio
class TestSuppressionAndPhoneDedupe:
    async def test_suppressed_numbers_and_keys_and_duplicate_phones_are_rejected(
        self, tmp_path: Path
    ) -> None:
        import dataclasses

        data = rows(10)
        data[5]["phone"] = data[1]["phone"]  # k6 has k2's number
        (tmp_path / "suppress.txt").write_text("# do not contact\n+86 138 0000 0003\nk4\n\n")
        c = make_campaign(tmp_path, data, max_reject_ratio=1)
        c = dataclasses.replace(
            c,
            source=dataclasses.replace(c.source, suppress=str(tmp_path / "suppress.txt"), dedupe_phone=True),
        )
        sent: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        result = await run(c, tmp_path, handler)
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        reasons = {x["k"]: x["e"] for x in lines if x.get("s") == "rejected"}
        assert reasons == {"k3": "suppressed", "k4": "suppressed", "k6": "duplicate phone"}
        assert result.counts["sent"] == 7 and len(sent) == len(set(sent)) == 7


@pytest.mark.anyio
class TestResumePassesOverTheSettledPrefix:
    async def test_unkeyed_resume_skips_without_parsing_and_sends_the_rest_once(self, tmp_path: Path) -> None:
        data = rows(5000)
        (tmp_path / "r.csv").write_text(
            "phone,first\n" + "".join(f"{r['phone']},{r['first']}\n" for r in data)
        )
        c = parse_campaign(
            {  # no key column: keys are row numbers, nothing is read from settled rows
                "source": {"kind": "csv", "path": "r.csv", "phone": "phone"},
                "provider": {"kind": "simulator", "endpoint": "http://fake.invalid"},
                "message": {"template_code": "T", "sign_name": "S", "params": {"n": "{first}"}},
                "limits": {"requests_per_second": 10000, "concurrency": 4, "batch_size": 10},
            },
            tmp_path,
        )
        seen: list[str] = []

        def refuse_after_2000(request: httpx.Request) -> httpx.Response:
            if len(seen) >= 2000:
                return httpx.Response(200, json={"outcome": "fatal", "code": "Stop"})
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        first = await run(c, tmp_path, refuse_after_2000)
        assert first.stop_code == "Stop" and first.counts["sent"] == 2000
        offsets: list[int | None] = []
        real = source_module.record_offset

        def record_and_accept(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        def spy(path: Path, records: int, block_size: int = 1 << 20) -> int | None:
            offsets.append(real(path, records, block_size))
            return offsets[-1]

        with patch.object(source_module, "record_offset", spy):
            second = await run(
                c, tmp_path, lambda r: (seen.extend(orjson.loads(r.content)["phones"]), ok(r))[1]
            )
        assert offsets and offsets[0] is not None  # the fast path was taken
        assert second.complete and second.counts["sent"] == 5000
        assert sorted(seen) == sorted("86" + r["phone"] for r in data)  # everyone once
        assert replay(tmp_path / "run" / "ledger.jsonl").eof_rows == 5000


def refused(request: httpx.Request) -> httpx.Response:
    message = "cannot connect to fake.invalid:80: [Errno 111] Connection refused"
    raise httpx.ConnectError(message, request=request)


def untrusted(request: httpx.Request) -> httpx.Response:
    # As HttpTransport and httpx's own transports raise it: the ssl error is the cause.
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    raise httpx.ConnectError("cannot connect to fake.invalid:443: TLS", request=request) from cause


@pytest.mark.anyio
class TestEndpointStops:
    async def test_refused_connects_stop_the_run_after_the_limit_rows_pending(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(200), concurrency=4, connect_failures=3)
        calls = {"n": 0}

        def count_refused(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            return refused(request)

        result = await run(c, tmp_path, count_refused)
        assert result.stop_code == "ConnectError" and not result.complete
        assert "3 failed connects in a row" in (result.stopped or "")
        assert "fake.invalid:80" in (result.stopped or "") and "Connection refused" in (result.stopped or "")
        # The requests already on their way when the first failed, then the probes.
        assert 3 <= calls["n"] <= 4 + 3 - 1
        status = summarize(tmp_path / "run")
        assert status["deferred"] == status["sent"] == status["unknown"] == 0
        state = replay(tmp_path / "run" / "ledger.jsonl")
        assert {state.get(r) for r in range(1, 201)} == {Status.PENDING}
        assert status["stopped"]["code"] == "ConnectError"
        assert "Connection refused" in status["stopped"]["message"]
        seen: list[str] = []

        def accept(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return ok(request)

        again = await run(c, tmp_path, accept)  # the endpoint is back: a resume sends each once
        assert again.complete and again.counts["sent"] == 200
        assert sorted(p[-11:] for p in seen) == sorted(r["phone"] for r in rows(200))
        assert summarize(tmp_path / "run")["stopped"] is None

    async def test_a_short_outage_waits_for_the_prober_and_defers_nothing(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(200), concurrency=4, connect_failures=5)
        calls = {"n": 0}

        def down_then_up(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            return refused(request) if calls["n"] <= 4 else ok(request)  # one fewer than the limit

        result = await run(c, tmp_path, down_then_up)
        assert result.complete and result.stopped is None
        assert result.counts["sent"] == 200 and result.counts["deferred"] == 0
        assert result.requests == 20 + 4  # 20 batches, 4 failed connects: the others waited

    async def test_certificate_not_accepted_stops_at_once(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, rows(200), concurrency=4)
        calls = {"n": 0}

        def count_untrusted(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            return untrusted(request)

        result = await run(c, tmp_path, count_untrusted)
        assert result.stop_code == "CertificateVerifyFailed"
        assert "CERTIFICATE_VERIFY_FAILED" in (result.stopped or "")
        assert calls["n"] <= 4  # no retry: at most the requests already on their way
        status = summarize(tmp_path / "run")
        assert status["deferred"] == status["sent"] == status["unknown"] == 0 and not status["complete"]
        state = replay(tmp_path / "run" / "ledger.jsonl")
        assert {state.get(r) for r in range(1, 201)} == {Status.PENDING}  # tried rows went back too
        assert "certificate verify failed" in status["stopped"]["message"]
