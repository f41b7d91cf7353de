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

from pipeline.campaign import load_campaign
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

    def test_under_the_limit_sends_the_rest(self, tmp_path: Path) -> None:
        self._file(tmp_path / "recipients.csv", 400, 4)
        with simulator(tmp_path) as sim:
            campaign = write_campaign(tmp_path / "c.toml", sim.url, max_reject_ratio=0.3)
            code, out = _run("run", str(campaign))
            sim.stop()
            assert code == 0, out
            assert len(sim.accepted()) == 300

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
