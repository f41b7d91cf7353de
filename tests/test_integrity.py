"""One run, one writer, one truth (issue 11): what a careless operator does to a run directory,
counted at the provider's side (the simulator's receipts)."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.app.api import pinned_campaign
from pipeline.app.rundir import RunDir
from pipeline.engine import run_campaign
from pipeline.errors import RunDirError
from tests.helpers import final_statuses, simulator, sluice, write_campaign, write_recipients
from tests.test_engine import FakeProvider, make_campaign


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll ``condition`` until it holds (bounded): the other process has no way to tell us."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def intents(run_dir: Path) -> int:
    try:
        return (run_dir / "ledger.jsonl").read_bytes().count(b'{"i":')
    except FileNotFoundError:
        return 0


def finish(p: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    """Wait for a sluice process; its stderr with the terminal's line folding undone."""
    _, err = p.communicate(timeout=timeout)
    return p.returncode, " ".join(err.decode().split(" \n"))


def status_json(run_dir: Path) -> dict[str, object]:
    p = sluice("status", str(run_dir), "--json")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return dict(orjson.loads(out))


def assert_once(accepted: Counter[str], phones: dict[int, str]) -> None:
    twice = [p for p, n in accepted.items() if n > 1]
    assert not twice, f"{len(twice)} numbers accepted twice"
    assert set(accepted) <= set(phones.values())


def killed_midway(tmp_path: Path, sim_url: str, n: int = 1500) -> tuple[Path, dict[int, str]]:
    """A run SIGKILLed after a few batches went out."""
    phones = write_recipients(tmp_path / "recipients.csv", n)
    write_campaign(tmp_path / "c.toml", sim_url, requests_per_second=20, batch_size=10, concurrency=2)
    run_dir = tmp_path / "run"
    p = sluice("run", str(tmp_path / "c.toml"))
    wait_for(lambda: intents(run_dir) >= 5)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    return run_dir, phones


class TestOneWriter:
    def test_second_run_is_refused_while_the_first_runs(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 800)
        with simulator(tmp_path) as sim:
            # Slow enough (40 s) that it is still running however loaded the machine; it is
            # stopped with SIGINT once checked.
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=2, batch_size=10)
            first = sluice("run", str(tmp_path / "c.toml"))
            run_dir = tmp_path / "run"
            wait_for(lambda: intents(run_dir) >= 2)
            code, err = finish(sluice("run", str(tmp_path / "c.toml")))
            assert code == 2, err
            assert f"in use by pid {first.pid} on" in " ".join(err.split()), err
            assert "sluice run" in err and "Traceback" not in err
            running = status_json(run_dir)["running"]
            assert isinstance(running, dict) and running["pid"] == first.pid
            first.send_signal(signal.SIGINT)
            code, err = finish(first)
            assert code == 130, err
            assert status_json(run_dir)["running"] is None
            sim.stop()
        accepted = sim.accepted()
        assert_once(accepted, phones)
        statuses = final_statuses(run_dir / "ledger.jsonl")
        assert {phones[r] for r, s in statuses.items() if s == "sent"} == set(accepted)

    def test_two_resumes_at_once_after_a_kill(self, tmp_path: Path) -> None:
        with simulator(tmp_path) as sim:
            run_dir, phones = killed_midway(tmp_path, sim.url)
            both = [sluice("resume", str(run_dir)), sluice("resume", str(run_dir))]
            results = [finish(p) for p in both]
            sim.stop()
        codes = sorted(code for code, _ in results)
        assert codes[0] == 2 and codes[1] in (0, 3), results
        refused = next(err for code, err in results if code == 2)
        assert "in use by pid" in " ".join(refused.split())
        accepted = sim.accepted()
        assert_once(accepted, phones)
        statuses = final_statuses(run_dir / "ledger.jsonl")
        sent = {phones[r] for r, s in statuses.items() if s == "sent"}
        assert sent <= set(accepted)
        # Only the batches in flight at the kill are unknown; everyone else is sent.
        assert len(sent) + sum(1 for s in statuses.values() if s == "unknown") == 1500

    def test_lock_is_released_by_a_kill(self, tmp_path: Path) -> None:
        with simulator(tmp_path) as sim:
            run_dir, phones = killed_midway(tmp_path, sim.url, n=300)
            assert RunDir(run_dir).holder() is None  # the kernel dropped the dead process's lock
            code, err = finish(sluice("resume", str(run_dir)))
            sim.stop()
        assert code in (0, 3), err
        assert_once(sim.accepted(), phones)


@pytest.fixture
def finished_run(tmp_path: Path) -> Iterator[tuple[Path, dict[int, str], Path]]:
    """A completed run of 300 recipients, its simulator still up (the run dir, phones, toml)."""
    phones = write_recipients(tmp_path / "recipients.csv", 300)
    with simulator(tmp_path) as sim:
        toml = write_campaign(tmp_path / "c.toml", sim.url, batch_size=20)
        code, err = finish(sluice("run", str(toml)))
        assert code == 0, err
        yield tmp_path / "run", phones, toml
        sim.stop()
        assert_once(sim.accepted(), phones)
        assert sum(sim.accepted().values()) == len(phones)


class TestLedgerCannotVanish:
    def test_deleted_ledger_is_refused(self, finished_run: tuple[Path, dict[int, str], Path]) -> None:
        run_dir, _, _ = finished_run
        (run_dir / "ledger.jsonl").unlink()
        code, err = finish(sluice("resume", str(run_dir)))
        assert code == 2, err
        flat = " ".join(err.split())
        assert "ledger.jsonl is missing" in flat and "--force" in flat and "Traceback" not in err
        assert "gone" in str(status_json(run_dir)["ledger_problem"])

    def test_ledger_cut_in_half_is_refused(self, finished_run: tuple[Path, dict[int, str], Path]) -> None:
        run_dir, _, toml = finished_run
        ledger = run_dir / "ledger.jsonl"
        data = ledger.read_bytes()
        ledger.write_bytes(data[: len(data) // 2 + 3])  # mid-line
        for args in (("resume", str(run_dir)), ("run", str(toml))):
            code, err = finish(sluice(*args))
            assert code == 2, err
            assert "the run had written" in " ".join(err.split())

    def test_damaged_line_is_refused_and_counted(
        self, finished_run: tuple[Path, dict[int, str], Path]
    ) -> None:
        run_dir, _, _ = finished_run
        ledger = run_dir / "ledger.jsonl"
        lines = ledger.read_bytes().splitlines(keepends=True)
        lines[10] = b"#" * (len(lines[10]) - 1) + b"\n"  # same length: only the content is wrong
        ledger.write_bytes(b"".join(lines))
        code, err = finish(sluice("resume", str(run_dir)))
        assert code == 2, err
        assert "1 damaged lines" in " ".join(err.split())
        assert status_json(run_dir)["ledger_damaged_lines"] == 1

    def test_torn_last_line_after_a_kill_is_still_repaired(self, tmp_path: Path) -> None:
        with simulator(tmp_path) as sim:
            run_dir, phones = killed_midway(tmp_path, sim.url, n=300)
            with (run_dir / "ledger.jsonl").open("ab") as f:
                f.write(b'{"r":7,"s":"se')  # a kill in the middle of a write
            code, err = finish(sluice("resume", str(run_dir)))
            sim.stop()
        assert code in (0, 3), err
        assert_once(sim.accepted(), phones)


class TestSourceCannotChange:
    def test_same_length_swap_is_refused_even_with_force(self, tmp_path: Path) -> None:
        with simulator(tmp_path) as sim:
            run_dir, phones = killed_midway(tmp_path, sim.url, n=600)
            src = tmp_path / "recipients.csv"
            lines = src.read_bytes().splitlines(keepends=True)
            lines[1], lines[2] = lines[2], lines[1]
            src.write_bytes(b"".join(lines))
            for extra in ((), ("--force",)):
                code, err = finish(sluice("resume", str(run_dir), *extra))
                assert code == 2, err
                assert "rows it had when the run began" in " ".join(err.split())
            sim.stop()
        assert_once(sim.accepted(), phones)

    def test_rows_inserted_mid_file_are_refused_even_with_force(self, tmp_path: Path) -> None:
        with simulator(tmp_path) as sim:
            run_dir, phones = killed_midway(tmp_path, sim.url, n=600)
            src = tmp_path / "recipients.csv"
            lines = src.read_bytes().splitlines(keepends=True)
            lines[100:100] = [f"x{i},1370000{i:04d},n,1\n".encode() for i in range(10)]
            src.write_bytes(b"".join(lines))
            ledger_before = (run_dir / "ledger.jsonl").read_bytes()
            for extra in ((), ("--force",)):
                code, err = finish(sluice("resume", str(run_dir), *extra))
                assert code == 2, err
            sim.stop()
        assert_once(sim.accepted(), phones)
        assert (run_dir / "ledger.jsonl").read_bytes() == ledger_before  # refused before anything

    def test_appended_rows_need_force_and_are_sent_once(
        self, finished_run: tuple[Path, dict[int, str], Path]
    ) -> None:
        run_dir, phones, _ = finished_run
        with (run_dir.parent / "recipients.csv").open("a") as f:
            for i in range(301, 351):
                f.write(f"c{i},139{i:08d},n{i},1\n")
        code, err = finish(sluice("resume", str(run_dir)))
        assert code == 2 and "--force sends the appended rows" in " ".join(err.split()), err
        code, err = finish(sluice("resume", str(run_dir), "--force"))
        assert code == 0, err
        # A second resume finds the new file pinned: nothing to refuse, nothing sent.
        code, err = finish(sluice("resume", str(run_dir)))
        assert code == 0, err
        assert status_json(run_dir)["sent"] == 350
        phones.update({i: f"139{i:08d}" for i in range(301, 351)})  # checked by the fixture: once each

    def test_unchanged_source_is_hashed_whole(self, tmp_path: Path) -> None:
        from pipeline.source import compare_file_fingerprints, file_fingerprint

        path = tmp_path / "r.csv"
        path.write_bytes(b"id,phone\n" + b"".join(b"%d,1390000%04d\n" % (i, i) for i in range(200_000)))
        pinned = file_fingerprint(path)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1  # one bit in the middle, where no sampled hash would look
        path.write_bytes(bytes(data))
        assert compare_file_fingerprints(pinned, file_fingerprint(path)) == "changed"


class TestRunJsonIsSealed:
    def test_template_edited_by_hand_is_refused(
        self, finished_run: tuple[Path, dict[int, str], Path]
    ) -> None:
        run_dir, _, _ = finished_run
        doc = orjson.loads((run_dir / "run.json").read_bytes())
        doc["campaign"]["message"]["template_code"] = "SMS_OTHER"
        (run_dir / "run.json").write_bytes(orjson.dumps(doc))
        code, err = finish(sluice("resume", str(run_dir)))
        assert code == 2, err
        assert "run.json was changed after the run started" in " ".join(err.split())
        assert status_json(run_dir)["sent"] == 300  # status still reads it

    def test_resealed_campaign_edit_is_caught_by_its_hash(self, tmp_path: Path) -> None:
        c = make_campaign(tmp_path, [{"id": "a", "phone": "13800000001", "first": "x"}])
        rd = RunDir(tmp_path / "run")
        doc = rd.create(c.to_dict(), c.digest(), {})
        doc["campaign"]["message"]["template_code"] = "OTHER"
        rd.save(doc)  # a valid seal, over an edited campaign
        with pytest.raises(RunDirError, match="edited after the run started"):
            pinned_campaign(rd)


def _run_until(campaign: object, run_dir: Path, stop_after: int | None, seen: list[str]) -> None:
    """Run in process; with ``stop_after``, stop (as Ctrl-C would) after that many requests."""
    stop = anyio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        phones = orjson.loads(request.content)["phones"]
        seen.extend(phones)
        if stop_after is not None and len(seen) >= stop_after:
            stop.set()
        return httpx.Response(200, json={"outcome": "sent", "id": "B"})

    async def main() -> None:
        rd = RunDir(run_dir)
        if not rd.exists():
            rd.create(campaign.to_dict(), campaign.digest(), {})  # type: ignore[attr-defined]
        await run_campaign(
            campaign,  # type: ignore[arg-type]
            rd,
            provider=FakeProvider(),
            run_id="t",
            transport=httpx.MockTransport(handler),
            stop=stop,
        )

    anyio.run(main)


class TestDedupePhoneAcrossResumes:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        layout=st.lists(st.one_of(st.integers(0, 11), st.none()), min_size=2, max_size=60),
        stop_after=st.integers(1, 60),
    )
    def test_first_valid_row_of_a_number_is_sent_exactly_once(
        self, layout: list[int | None], stop_after: int
    ) -> None:
        # None: a row with an invalid number; k: the k-th number of a small pool (repeats).
        rows = [
            {"id": f"k{i}", "phone": "12" if k is None else f"138{k:08d}", "first": f"n{i}"}
            for i, k in enumerate(layout)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            # Small batches sent one at a time: a stop leaves batches unsent behind rejected rows.
            c = make_campaign(Path(tmp), rows, batch_size=2, concurrency=1)
            c = dataclasses.replace(c, source=dataclasses.replace(c.source, dedupe_phone=True))
            seen: list[str] = []
            _run_until(c, Path(tmp) / "run", stop_after, seen)
            _run_until(c, Path(tmp) / "run", None, seen)
            statuses = final_statuses(Path(tmp) / "run" / "ledger.jsonl")
        counts = Counter(seen)
        valid = {f"86138{k:08d}" for k in layout if k is not None}
        assert {p: n for p, n in counts.items() if n != 1} == {}
        assert set(counts) == valid
        # The one sent is the first row of each number, in source order.
        first_row = {}
        for i, k in enumerate(layout, start=1):
            if k is not None:
                first_row.setdefault(k, i)
        assert {r for r, s in statuses.items() if s == "sent"} == set(first_row.values())


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 6 MiB (where the test may mount one)."""
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "6m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the injected-error test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class TestDiskFaults:
    def test_full_disk_stops_cleanly_and_resumes_without_loss(self, tmp_path: Path, small_disk: Path) -> None:
        n = 60_000  # the ledger outgrows the 2 MiB left beside the 4 MiB reserve
        phones = write_recipients(tmp_path / "recipients.csv", n)
        with simulator(tmp_path) as sim:
            toml = write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=2000, batch_size=100)
            run_dir = small_disk / "run"
            code, err = finish(sluice("run", str(toml), "--run-dir", str(run_dir)), timeout=300)
            assert code == 5, err
            assert "No space left on device" in err and "ledger.jsonl" in err
            assert "Traceback" not in err
            before = status_json(run_dir)
            assert before["unknown"] == 0  # the reserve held every result in flight
            subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
            code, err = finish(sluice("resume", str(run_dir)), timeout=300)
            assert code == 0, err
            sim.stop()
        accepted = sim.accepted()
        assert_once(accepted, phones)
        assert sum(accepted.values()) == n
        assert status_json(run_dir)["sent"] == n

    def test_read_only_run_directory_is_a_clear_error(self, tmp_path: Path, small_disk: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 100)
        with simulator(tmp_path) as sim:
            toml = write_campaign(tmp_path / "c.toml", sim.url)
            run_dir = small_disk / "run"
            code, err = finish(sluice("run", str(toml), "--run-dir", str(run_dir)))
            assert code == 0, err
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
            try:
                code, err = finish(sluice("resume", str(run_dir)))
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
            sim.stop()
        assert code == 2, err
        assert "Read-only file system" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3
        assert_once(sim.accepted(), phones)

    def test_injected_write_error_stops_and_resume_completes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        rows = [{"id": f"k{i}", "phone": f"138{i:08d}", "first": "n"} for i in range(500)]
        c = make_campaign(tmp_path, rows)
        real_write = os.write
        failures = {"left": 3, "after": 4}

        def flaky_write(fd: int, data: bytes) -> int:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("ledger.jsonl"):
                if failures["after"] > 0:
                    failures["after"] -= 1
                elif failures["left"] > 0:
                    failures["left"] -= 1
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_write(fd, data)

        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.extend(orjson.loads(request.content)["phones"])
            return httpx.Response(200, json={"outcome": "sent", "id": "B"})

        async def run_once() -> object:
            rd = RunDir(tmp_path / "run")
            if not rd.exists():
                rd.create(c.to_dict(), c.digest(), {})
            return await run_campaign(
                c, rd, provider=FakeProvider(), run_id="t", transport=httpx.MockTransport(handler)
            )

        monkeypatch.setattr(os, "write", flaky_write)
        first = anyio.run(run_once)
        assert first.stop_code == "DiskFault" and "Input/output error" in first.stopped  # type: ignore[attr-defined]
        monkeypatch.setattr(os, "write", real_write)
        second = anyio.run(run_once)
        assert second.complete  # type: ignore[attr-defined]
        assert sorted(Counter(seen).values()) == [1] * 500
