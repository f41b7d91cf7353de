"""The whole pipeline against the simulator over real loopback sockets, in subprocesses."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import cut_ledger, final_statuses, simulator, sluice, write_campaign, write_recipients


def run_to_end(*args: str, timeout: float = 120) -> tuple[int, str]:
    p = sluice(*args)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode()


def status_json(run_dir: Path) -> dict[str, object]:
    p = sluice("status", str(run_dir), "--json")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    return dict(orjson.loads(out))


class TestEndToEnd:
    def test_all_sent_with_rejects(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 1000)
        with (tmp_path / "recipients.csv").open("a") as f:
            f.write("c1001,12345,x,1\n")  # bad phone
            f.write("c1002,13900009999,,2\n")  # missing first_name
            f.write("c1,13900008888,dup,3\n")  # duplicate key
        with simulator(tmp_path) as sim:
            write_campaign(tmp_path / "c.toml", sim.url)
            code, err = run_to_end("run", str(tmp_path / "c.toml"))
            sim.stop()
        assert code == 0, err
        st = status_json(tmp_path / "run")
        assert st["sent"] == 1000 and st["rejected"] == 3 and st["complete"] is True
        accepted = sim.accepted()
        assert all(accepted[p] == 1 for p in phones.values())
        assert sum(accepted.values()) == 1000

    def test_throttling_is_absorbed(self, tmp_path: Path) -> None:
        write_recipients(tmp_path / "recipients.csv", 2000)
        with simulator(tmp_path, "--qps", "20") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=60, batch_size=20)
            code, err = run_to_end("run", str(tmp_path / "c.toml"))
            sim.stop()
        assert code == 0, err
        lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
        throttled = [x for x in lines if x.get("c") == "Throttling.User" and "b" in x and "r" not in x]
        assert throttled, "the simulator should have throttled a run configured above its limit"
        st = status_json(tmp_path / "run")
        assert st["sent"] == 2000 and st["failed"] == 0 and st["deferred"] == 0
        assert sum(sim.accepted().values()) == 2000

    def test_faults_are_classified(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 3000)
        with simulator(tmp_path, "--fault-rate", "0.3", "--seed", "11", "--slow-ms", "3000") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=400, batch_size=20)
            code, err = run_to_end("run", str(tmp_path / "c.toml"))
            sim.stop()
        assert code == 3, err  # finished with unknown recipients
        statuses = final_statuses(tmp_path / "run" / "ledger.jsonl")
        accepted = sim.accepted()
        assert set(statuses) == set(phones)
        for row, phone in phones.items():
            s = statuses[row]
            if s == "sent":
                assert accepted[phone] == 1
            elif s == "unknown":
                assert accepted[phone] <= 1
            else:
                assert accepted[phone] == 0, (row, s)
        kinds = {s for s in statuses.values()}
        assert {"sent", "unknown"} <= kinds


@pytest.mark.slow
class TestCrashSafety:
    def test_sigkill_at_several_points_then_resume(self, tmp_path: Path) -> None:
        n = 6000
        phones = write_recipients(tmp_path / "recipients.csv", n)
        run_dir = tmp_path / "run"
        ledger = run_dir / "ledger.jsonl"
        kills = []
        with simulator(tmp_path, "--latency-ms", "5", "--fault-rate", "0.02", "--seed", "5") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=150, batch_size=20)
            for i, grow in enumerate([2, 40, 25, 60]):
                args = ("run", str(tmp_path / "c.toml")) if i == 0 else ("resume", str(run_dir))
                before = ledger.read_bytes().count(b'{"i":') if ledger.exists() else 0
                p = sluice(*args)
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline:
                    if ledger.exists() and ledger.read_bytes().count(b'{"i":') >= before + grow:
                        break
                    time.sleep(0.01)  # polling a condition, bounded by the deadline
                p.kill()
                p.communicate()
                kills.append(p.returncode)
            code, err = run_to_end("resume", str(run_dir))
            sim.stop()
        assert all(k == -9 for k in kills), kills
        assert code in (0, 3), err
        statuses = final_statuses(ledger)
        accepted = sim.accepted()
        assert set(statuses) == set(phones), "every recipient has a terminal line"
        dup_outside_unknown = [r for r, p in phones.items() if accepted[p] > 1 and statuses[r] != "unknown"]
        assert dup_outside_unknown == []
        for row, phone in phones.items():
            if statuses[row] == "sent":
                assert accepted[phone] == 1
            elif statuses[row] == "unknown":
                assert accepted[phone] <= 1
        st = status_json(run_dir)
        assert st["complete"] is True and st["pending"] == 0 and st["deferred"] == 0


class TestLedgerCut:
    """A ledger cut at arbitrary byte offsets (a crash mid-write) resumes correctly."""

    def test_resume_from_cut_ledgers(self, tmp_path: Path) -> None:
        import random
        import shutil

        n = 600
        write_recipients(tmp_path / "recipients.csv", n)
        with simulator(tmp_path) as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=1000, batch_size=20)
            code, err = run_to_end("run", str(tmp_path / "c.toml"))
            assert code == 0, err
            full = (tmp_path / "run" / "ledger.jsonl").read_bytes()
            rng = random.Random(42)
            offsets = sorted(rng.randrange(1, len(full)) for _ in range(6))
            for off in offsets:
                cut_dir = tmp_path / f"cut-{off}"
                shutil.copytree(tmp_path / "run", cut_dir)
                prefix = full[:off]
                cut_ledger(cut_dir, prefix)
                complete_lines = prefix[: prefix.rfind(b"\n") + 1].splitlines()
                before: dict[int, str] = {}
                intended: set[int] = set()
                for line in complete_lines:
                    obj = orjson.loads(line)
                    if "i" in obj:
                        intended.update(obj["r"])
                    elif "r" in obj:
                        before[obj["r"]] = obj["s"]
                code, err = run_to_end("resume", str(cut_dir))
                assert code in (0, 3), err
                after = final_statuses(cut_dir / "ledger.jsonl")
                assert set(after) == set(range(1, n + 1)), off
                for row in range(1, n + 1):
                    if row in before:
                        assert after[row] == before[row], (off, row)
                    elif row in intended:
                        assert after[row] == "unknown", (off, row)
                    else:
                        assert after[row] == "sent", (off, row)
                # The ledger is well formed again: every line parses.
                for line in (cut_dir / "ledger.jsonl").read_bytes().splitlines():
                    orjson.loads(line)
            sim.stop()


class TestGracefulStop:
    @pytest.mark.parametrize(("signum", "exit_code"), [(2, 130), (15, 143)])
    def test_signal_stops_cleanly_then_resume_completes(
        self, tmp_path: Path, signum: int, exit_code: int
    ) -> None:
        import signal as _signal

        n = 3000
        phones = write_recipients(tmp_path / "recipients.csv", n)
        ledger = tmp_path / "run" / "ledger.jsonl"
        with simulator(tmp_path, "--latency-ms", "100") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=50, batch_size=10)
            p = sluice("run", str(tmp_path / "c.toml"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                if ledger.exists() and ledger.read_bytes().count(b'"s":"sent"') >= 50:
                    break
                time.sleep(0.01)  # polling a condition, bounded by the deadline
            p.send_signal(_signal.Signals(signum))
            _, err = p.communicate(timeout=60)
            assert p.returncode == exit_code, err.decode()
            mid = final_statuses(ledger)
            assert 50 <= len(mid) < n
            assert "unknown" not in mid.values()  # in-flight requests finished within the deadline
            code, err2 = run_to_end("resume", str(tmp_path / "run"))
            sim.stop()
        assert code == 0, err2
        accepted = sim.accepted()
        assert all(accepted[phone] == 1 for phone in phones.values())


class TestReconcile:
    def test_faults_then_reconcile_then_resume_sends_everyone_exactly_once(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 2000)
        mix = "drop_before=1,drop_after=1,http500=1,reset=1,garbage=1"
        with simulator(tmp_path, "--fault-rate", "0.25", "--fault-mix", mix, "--seed", "9") as sim:
            write_campaign(
                tmp_path / "c.toml", sim.url, requests_per_second=400, batch_size=20, breaker_threshold=0
            )
            code, err = run_to_end("run", str(tmp_path / "c.toml"))
            assert code == 3, err
            before = final_statuses(tmp_path / "run" / "ledger.jsonl")
            unknown = sum(1 for s in before.values() if s == "unknown")
            assert unknown > 0
            code, err = run_to_end("reconcile", str(tmp_path / "run"), "--settle-after", "0")
            assert code == 0, err
            mid = final_statuses(tmp_path / "run" / "ledger.jsonl")
            assert "unknown" not in mid.values()
            accepted_mid = sim.accepted()
            for row, phone in phones.items():
                if before[row] == "unknown":
                    assert mid[row] == ("sent" if accepted_mid[phone] else "deferred"), row
            code, err = run_to_end("resume", str(tmp_path / "run"))
            sim.stop()
        assert code in (0, 3), err
        after = final_statuses(tmp_path / "run" / "ledger.jsonl")
        accepted = sim.accepted()
        for row, phone in phones.items():
            if after[row] == "sent":
                assert accepted[phone] == 1, row
            else:
                assert after[row] == "unknown" and accepted[phone] <= 1
