"""Issue 15, operator experience: source encodings, the reject threshold, schedule.start_at,
stopping while paused, and what status, export and the live display tell after a stop."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from pipeline.app.campaign import load_campaign
from pipeline.errors import CampaignError, SourceError
from pipeline.schedule import SendGate
from pipeline.source import CsvSource, check_decoded
from tests.helpers import simulator, sluice, write_campaign

NAMES = ["李雷", "韩梅梅", "王小明", "张伟", "刘洋"]


def _write_chinese(path: Path, n: int, encoding: str) -> None:
    """n recipients whose first names are Chinese, in ``encoding``."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "phone", "first_name", "code"])
    for i in range(1, n + 1):
        w.writerow([f"c{i}", f"139{i:08d}", NAMES[i % len(NAMES)], f"{i:06d}"])
    path.write_bytes(buf.getvalue().encode(encoding))


def _add_to(campaign: Path, section: str, line: str) -> None:
    text = campaign.read_text()
    campaign.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))


def _run(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = sluice(*args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode() + err.decode()


class TestEncoding:
    def test_gbk_file_is_sent_in_full_with_gb18030(self, tmp_path: Path) -> None:
        _write_chinese(tmp_path / "recipients.csv", 300, "gbk")
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            _add_to(campaign, "source", 'encoding = "gb18030"')
            code, out = _run("run", str(campaign))
            sim.stop()
            assert code == 0, out
            assert len(sim.accepted()) == 300
        code, out = _run("status", str(tmp_path / "run"), "--json")
        assert '"rejected":0' in out and '"sent":300' in out

    def test_gbk_file_without_encoding_is_refused_with_a_hint(self, tmp_path: Path) -> None:
        _write_chinese(tmp_path / "recipients.csv", 300, "gbk")
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            code, out = _run("run", str(campaign))
            sim.stop()
            assert code == 2, out
            assert 'encoding = "gb18030"' in out
            assert sim.accepted() == {}  # nothing sent

    @pytest.mark.anyio
    async def test_utf16_with_bom_reads_and_without_is_named(self, tmp_path: Path) -> None:
        path = tmp_path / "r.csv"
        _write_chinese(path, 5, "utf-16")  # Python's utf-16 writes a BOM
        rows = [
            rec for chunk in [c async for c in CsvSource(path, encoding="utf-16").chunks()] for rec in chunk
        ]
        assert [r[1]["first_name"] for r in rows] == [NAMES[i % 5] for i in range(1, 6)]  # type: ignore[index]
        with pytest.raises(Exception, match='encoding = "utf-16"'):
            CsvSource(path).columns()

    def test_decoding_check_passes_good_text(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone\n")
        campaign = load_campaign(write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9"))
        check_decoded([(1, {"name": "韩梅梅"})], campaign)  # no exception
        with pytest.raises(SourceError, match="gb18030"):
            gbk_as_utf8 = "韩梅梅".encode("gbk").decode("utf-8", "surrogateescape")
            check_decoded([(1, {"name": gbk_as_utf8})], campaign)

    def test_unknown_encoding_is_a_campaign_error(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone\n")
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        _add_to(campaign, "source", 'encoding = "latin-1"')
        with pytest.raises(CampaignError, match=r"source\.encoding"):
            load_campaign(campaign)

    def test_new_keys_at_their_defaults_keep_the_campaign_digest(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone\n")
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        before = load_campaign(campaign).digest()
        _add_to(campaign, "source", 'encoding = "utf-8"')
        assert load_campaign(campaign).digest() == before
        _add_to(campaign, "source", 'encoding = "gbk"')
        campaign.write_text(campaign.read_text().replace('encoding = "utf-8"\n', ""))
        assert load_campaign(campaign).source.encoding == "gb18030"
        assert load_campaign(campaign).digest() != before


class TestRejectRatio:
    def _file(self, path: Path, n: int, bad_every: int) -> None:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "phone", "first_name", "code"])
            for i in range(1, n + 1):
                phone = "12" if i % bad_every == 0 else f"139{i:08d}"
                w.writerow([f"c{i}", phone, "n", "000001"])

    def test_a_quarter_bad_stops_before_sending(self, tmp_path: Path) -> None:
        self._file(tmp_path / "recipients.csv", 400, 4)  # 25 % bad, in the first chunk
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            code, out = _run("run", str(campaign))
            sim.stop()
            assert code == 2, out
            assert "max_reject_ratio" in out
            assert sim.accepted() == {}
        code, out = _run("run", str(tmp_path / "c.toml"), "--dry-run")
        assert code == 0 and "25% of the rows are rejected" in out and "a run would stop" in out

    def test_under_the_limit_sends_the_rest(self, tmp_path: Path) -> None:
        self._file(tmp_path / "recipients.csv", 400, 4)
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url, max_reject_ratio=0.3)
            code, out = _run("run", str(campaign))
            sim.stop()
            assert code == 0, out
            assert len(sim.accepted()) == 300
        code, out = _run("export", str(tmp_path / "run"))
        assert code == 0
        exported = list(csv.DictReader(io.StringIO(out.split("exported")[0])))
        rejected = [r for r in exported if r["status"] == "rejected"]
        assert len(exported) == 400 and len(rejected) == 100
        assert {r["phone"] for r in rejected} == {"12"} and all(r["message"] for r in rejected)
        assert next(r for r in exported if r["row"] == "1")["phone"] == "13900000001"

    def test_ratio_is_checked(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone\n")
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9", max_reject_ratio=0)
        with pytest.raises(CampaignError, match=r"limits\.max_reject_ratio"):
            load_campaign(campaign)


SH = ZoneInfo("Asia/Shanghai")


@pytest.mark.anyio
class TestStartAtAndStop:
    async def test_nothing_before_start_at(self) -> None:
        now = [dt.datetime(2026, 12, 5, 7, 0, tzinfo=SH)]
        slept: list[float] = []

        async def sleep(s: float) -> None:
            slept.append(s)
            now[0] += dt.timedelta(seconds=s)

        start = dt.datetime(2026, 12, 5, 9, 30, tzinfo=SH)
        gate = SendGate(start_at=start, now=lambda: now[0], sleep=sleep)
        await gate.wait(10)
        assert slept == [9000.0] and now[0] == start and gate.paused_until is None
        await gate.wait(10)
        assert slept == [9000.0]

    async def test_start_at_is_validated(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone\n")
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        campaign.write_text(campaign.read_text() + '[schedule]\nstart_at = "tomorrow 9am"\n')
        with pytest.raises(CampaignError, match=r"schedule\.start_at"):
            load_campaign(campaign)
        campaign.write_text(campaign.read_text().replace("tomorrow 9am", "2026-12-05 09:30"))
        campaign.write_text(
            campaign.read_text().replace("[schedule]\n", '[schedule]\ntimezone = "Asia/Shanghai"\n')
        )
        assert load_campaign(campaign).schedule.start_time() == dt.datetime(2026, 12, 5, 9, 30, tzinfo=SH)

    async def test_a_stop_while_paused_does_not_wait(self) -> None:
        gate = SendGate(start_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=5))
        started = time.monotonic()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gate.wait, 1)
                await anyio.wait_all_tasks_blocked()
                assert gate.paused_until is not None
                gate.abort()
        assert time.monotonic() - started < 5
        assert gate.sent_today == 0  # let go to see the stop, not counted as sent


def _wait_for_sends(ledger: Path, at_least: int, timeout: float = 60) -> None:
    """Poll the ledger (bounded) until ``at_least`` recipients have an outcome."""
    from pipeline.ledger import replay

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.exists() and replay(ledger).counts()["sent"] >= at_least:
            return
        time.sleep(0.05)  # polling a condition, bounded by the deadline
    raise AssertionError(f"fewer than {at_least} sends in {timeout} s")


class TestStatusAfterAStop:
    def test_after_ctrl_c(self, tmp_path: Path) -> None:
        import signal

        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 3000)
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=10, concurrency=2)
            proc = sluice("run", str(campaign))
            _wait_for_sends(tmp_path / "run" / "ledger.jsonl", 100)
            _, live = _run("status", str(tmp_path / "run"), "--json")
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
            assert proc.returncode == 130
            code, out = _run("status", str(tmp_path / "run"))
            assert code == 0, out
            code, js = _run("status", str(tmp_path / "run"), "--json")
        import orjson

        running = orjson.loads(live)  # while the run held the directory
        assert running["running"]["pid"] == proc.pid and running["next"] is None
        assert running["in_flight"] >= 0 and running["unknown"] == 0  # in flight is not unknown
        st = orjson.loads(js)
        assert st["running"] is None and "in_flight" not in st
        settled = st["sent"] + st["failed"] + st["rejected"] + st["unknown"] + st["deferred"]
        assert 100 <= st["sent"] < 3000
        assert st["source_rows"] == 3000 and st["source_rows_estimated"]  # counted: the end was not read
        assert st["pending"] == 3000 - settled > 0
        assert st["stopped"]["message"] == "stop requested"
        assert st["next"] == f"sluice resume {tmp_path / 'run'}"
        assert st["rates"]["last_session"] > 0
        assert "stop requested" in out and "next: sluice resume" in out and f"{st['pending']:,}" in out
        print(out)  # the note's `status` after a Ctrl-C (pytest -s shows it)

    def test_after_a_credential_refusal(self, tmp_path: Path) -> None:
        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 500)
        fault = ["--fault-rate", "1", "--fault-mix", "business_error=1"]
        with simulator(tmp_path, *fault, "--business-error-code", "InvalidAccessKeyId.NotFound") as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            code, out = _run("run", str(campaign))
            assert code == 4, out
            code, out = _run("status", str(tmp_path / "run"), "--json")
        import orjson

        st = orjson.loads(out)
        assert st["stopped"]["code"] == "InvalidAccessKeyId.NotFound"
        assert st["source_rows"] == 500 and st["pending"] == 500 - st["rejected"] - st["failed"] - st["sent"]
        assert st["pending"] > 0 and st["next"] == f"sluice resume {tmp_path / 'run'}"


class TestLiveDisplay:
    def _render(self, width: int, **kw: object) -> str:
        from rich.console import Console

        from pipeline.app.progress import ProgressReporter
        from pipeline.engine import Progress

        counts = {"sent": 1_234_567, "failed": 12_345, "rejected": 23_456, "unknown": 3_456, "deferred": 789}
        p = Progress(counts, 1_300_000, 2_000_000, 3725.0, 13_000, 0, 100.0, **kw)  # type: ignore[arg-type]
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        reporter = ProgressReporter(console, title="sluice run /data/run")
        console.print(reporter.render(p))
        return console.file.getvalue()  # type: ignore[attr-defined]

    @pytest.mark.parametrize("width", [80, 160])
    def test_nothing_cut(self, width: int) -> None:
        out = self._render(width)
        assert "…" not in out and max(map(len, out.splitlines())) <= width
        for value in ("1,234,567/2,000,000", "12,345", "23,456", "3,456", "789", "rejected", "1:02:05"):
            assert value in out
        assert "sluice run /data/run" in out
        # a row of columns when wide, a list when narrow
        assert (out.count("\n") >= 12) == (width == 80)

    def test_a_stopped_run_is_not_done(self) -> None:
        out = self._render(160, done=True, stopped="stop requested")
        assert "stopped" in out and "done" not in out
        out = self._render(160, done=True, earlier=1_000_000)
        assert "done" in out
        assert f"{(1_234_567 + 12_345 + 3_456 + 789 - 1_000_000) / 3725:,.0f}" in out  # this session's rate


class TestSubmailMode:
    def _campaign(self, path: Path, url: str, mode: str) -> Path:
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
protocol = "submail"
{mode}
[message]
sign_name = "Acme"
content = "Hi {{first_name}}, your code is {{code}}"
[limits]
requests_per_second = 200
batch_size = 100
[run]
dir = "run"
"""
        )
        return path

    def test_placeholders_choose_multisend(self, tmp_path: Path) -> None:
        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 500)
        with simulator(tmp_path, "--submail-log-interval", "0") as sim:
            c = load_campaign(self._campaign(tmp_path / "c.toml", sim.url, ""))
            assert c.provider.mode == "multisend"
            assert c.message.content == "Hi @var(first_name), your code is @var(code)"
            code, out = _run("run", str(tmp_path / "c.toml"))
            sim.stop()
            assert code == 0, out
            assert "one request per recipient" not in out
            assert len(sim.accepted()) == 500
        _, js = _run("status", str(tmp_path / "run"), "--json")
        import orjson

        st = orjson.loads(js)
        assert st["sent"] == 500 and st["requests"] <= 6  # 5 batches of 100 (+ nothing retried)
        texts = [orjson.loads(line) for line in (tmp_path / "receipts.jsonl").read_bytes().splitlines()]
        assert {t["content"] for t in texts if t["phone"] == "13900000007"} == {
            "【Acme】Hi n7, your code is 000007"
        }

    def test_a_set_batchsend_warns(self, tmp_path: Path) -> None:
        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 3)
        with simulator(tmp_path, "--submail-log-interval", "0") as sim:
            self._campaign(tmp_path / "c.toml", sim.url, 'mode = "batchsend"')
            code, out = _run("run", str(tmp_path / "c.toml"))
            sim.stop()
        assert code == 0, out
        assert "one request per recipient" in out


class TestDryRunPreview:
    def test_first_message_requests_and_time(self, tmp_path: Path) -> None:
        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 1000)
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9", requests_per_second=4)
        _add_to(campaign, "message", 'template_text = "Hello ${name}, your code is ${code}"')
        code, out = _run("run", str(campaign), "--dry-run")
        assert code == 0, out
        assert "first message (SMS_154950909, row 1, to 8613900000001, 1 segment):" in out
        assert "【Acme】Hello n1, your code is 000001" in out
        assert "20 (batches of up to 50)" in out  # 1 000 recipients, batch_size 50
        assert "0:00:05" in out  # 20 requests at 4 a second
        code, js = _run("run", str(campaign), "--dry-run", "--json")
        import orjson

        report = orjson.loads(js)
        assert report["requests"] == 20 and report["seconds"] == 5.0
        assert report["previews"][0]["text"] == "【Acme】Hello n1, your code is 000001"
        assert not (tmp_path / "run").exists()


class TestTestSend:
    def test_first_message_to_the_given_numbers_only(self, tmp_path: Path) -> None:
        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 1000)
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            code, out = _run("run", str(campaign), "--test-to", "13800000042, +8613800000043")
            sim.stop()
            assert code == 0, out
            accepted = sim.accepted()
        assert set(accepted) == {"13800000042", "13800000043"} and set(accepted.values()) == {1}
        receipts = [line for line in (tmp_path / "receipts.jsonl").read_text().splitlines() if line]
        assert len(receipts) == 2
        assert not (tmp_path / "run").exists()  # the campaign's own run is untouched
        [test_dir] = tmp_path.glob("run-test-*")
        assert "test send: the provider's answer" in out
        answered = [line for line in out.splitlines() if "1380000004" in line]
        assert len(answered) == 2 and all("│ sent " in line for line in answered), answered
        from pipeline.ledger import final_states

        assert {f.status for f in final_states(test_dir / "ledger.jsonl")} == {"sent"}

    def test_a_bad_number_is_refused_before_sending(self, tmp_path: Path) -> None:
        (tmp_path / "recipients.csv").write_text("id,phone,first_name,code\nc1,13800000001,Li,1\n")
        campaign = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        code, out = _run("run", str(campaign), "--test-to", "12345")
        assert code == 2 and "--test-to" in out and "'12345' is not a phone number" in out
        code, out = _run("run", str(campaign), "--test-to", "13800000001", "--dry-run")
        assert code == 2


class TestReconcileProgress:
    def test_unknowns_point_at_reconcile_which_shows_its_progress(self, tmp_path: Path) -> None:
        import orjson

        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 600)
        fault = ["--fault-rate", "0.3", "--fault-mix", "drop_after=1", "--seed", "3"]
        with simulator(tmp_path, *fault) as sim:
            write_campaign(tmp_path / "c.toml", sim.url, batch_size=20, breaker_threshold=0, max_attempts=2)
            code, out = _run("run", str(tmp_path / "c.toml"))
            assert code == 3, out
            _, js = _run("status", str(tmp_path / "run"), "--json")
            st = orjson.loads(js)
            assert st["unknown"] > 0 and st["next"] == f"sluice reconcile {tmp_path / 'run'}"
            code, out = _run("reconcile", str(tmp_path / "run"), "--settle-after", "0")
            assert code == 0, out
        assert f"checking {st['unknown']:,} unknown recipients at 50 queries/s" in out
        events = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
        done = [e for e in events if e.get("event") == "reconcile_progress"]
        assert done and done[-1]["checked"] == done[-1]["total"] == st["unknown"]


CHROMIUM = __import__("shutil").which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not __import__("os").environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it)",
)

# A page beside the report that opens it in a frame and writes down what the browser made of it:
# the heading, and for each image whether it loaded and decoded (naturalWidth > 0).
_INSPECT = """<!doctype html><html><body><iframe id="f" src="report.html"></iframe><script>
window.onload = () => {
  const d = document.getElementById("f").contentDocument;
  document.body.dataset.title = d.querySelector("h1").textContent;
  const loaded = (i) => (i.complete && i.naturalWidth > 0 ? "ok" : "broken");
  document.body.dataset.images = [...d.images].map(loaded).join(",");
};
</script></body></html>"""


def _open_in_chromium(report_dir: Path) -> tuple[str, list[str]]:
    """(the inspecting page's DOM after load, the console lines the browser logged)."""
    import subprocess

    assert CHROMIUM is not None, "chromium must be installed under CI"
    (report_dir / "inspect.html").write_text(_INSPECT)
    profile = report_dir.parent / "chromium-profile"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--allow-file-access-from-files",  # the inspecting page reads the report's frame
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (report_dir / "inspect.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    console = [line for line in proc.stderr.decode().splitlines() if ":CONSOLE" in line]
    return proc.stdout.decode(), console


@pytest.mark.anyio
class TestReport:
    async def _short_run_with_retries(self, tmp_path: Path) -> Path:
        import httpx
        import orjson

        from tests.test_engine import make_campaign, ok, rows, run

        c = make_campaign(tmp_path, rows(60), max_attempts=3)
        calls = {"n": 0}

        def handler(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            if calls["n"] <= 2:
                return httpx.Response(200, json={"outcome": "throttled", "code": "Throttling.User"})
            if orjson.loads(request.content)["out_id"].startswith("t-3-"):
                return httpx.Response(200, json={"outcome": "failed", "code": "isv.MOBILE_NUMBER_ILLEGAL"})
            return ok(request)

        await run(c, tmp_path, handler)
        return tmp_path / "run"

    async def test_a_run_under_a_second_is_drawn_and_named(self, tmp_path: Path) -> None:
        from pipeline.ops.report import build_report, chart_step, collect_series

        run_dir = await self._short_run_with_retries(tmp_path)
        step = chart_step(run_dir / "ledger.jsonl")
        assert step < 1
        series = collect_series(run_dir / "ledger.jsonl", step=step)
        assert sum(series["settled_per_second"]["sent"]) == 50 and series["step"] == step
        page = build_report(run_dir).read_text()
        assert "run id</td><td>" in page and "simulator (aliyun)" in page and "T</td>" in page
        assert "first send</td><td>20" in page  # a date, not Unix time
        assert "1796" not in page.split("<h2>")[0]  # no raw timestamp in the table

    @needs_chromium
    async def test_the_report_opens_in_a_real_browser(self, tmp_path: Path) -> None:
        from pipeline.ops.report import build_report

        run_dir = await self._short_run_with_retries(tmp_path)
        report_dir = build_report(run_dir).parent
        dom, console = _open_in_chromium(report_dir)
        assert f'data-title="sluice run {run_dir}"' in dom
        assert 'data-images="ok,ok,ok,ok"' in dom
        assert console == [], console
        # The check can fail: an image that does not decode is seen as broken.
        page = (report_dir / "report.html").read_text()
        (report_dir / "report.html").write_text(page.replace("base64,iVBOR", "base64,AAAAiVBOR", 1))
        dom, _ = _open_in_chromium(report_dir)
        assert 'data-images="broken,ok,ok,ok"' in dom


class TestStopWhilePaused:
    def test_ctrl_c_before_start_at_exits_at_once(self, tmp_path: Path) -> None:
        import signal

        import orjson

        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 100)
        start_at = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)).strftime("%Y-%m-%d %H:%M")
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            campaign.write_text(
                campaign.read_text() + f'[schedule]\nstart_at = "{start_at}"\ntimezone = "UTC"\n'
            )
            proc = sluice("run", str(campaign))
            log = tmp_path / "run" / "log.jsonl"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # polling a condition, bounded by the deadline
                if log.exists() and b"waiting for schedule.start_at" in log.read_bytes():
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the run never said it waits for start_at")
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
            took = time.monotonic() - stopped_at
            sim.stop()
            assert proc.returncode == 130
            assert took < 5, took  # not the 10 s stop deadline: nothing was in flight
            assert sim.accepted() == {}
        _, js = _run("status", str(tmp_path / "run"), "--json")
        assert orjson.loads(js)["pending"] == 100


class TestResumeOfAFinishedRun:
    def test_rates_are_the_sessions_own(self, tmp_path: Path) -> None:
        import orjson

        from tests.helpers import write_recipients

        write_recipients(tmp_path / "recipients.csv", 300)
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url)
            assert _run("run", str(campaign))[0] == 0
            code, out = _run("resume", str(tmp_path / "run"))
            sim.stop()
        assert code == 0, out
        summary = [line for line in out.splitlines() if "recipients/s" in line or "requests" in line]
        assert any(line.split("│")[2].strip() == "0" for line in summary if "recipients/s" in line), summary
        _, js = _run("status", str(tmp_path / "run"), "--json")
        rates = orjson.loads(js)["rates"]
        assert rates["sessions"] == 2 and rates["last_session"] is None and rates["all_sessions"] > 0
