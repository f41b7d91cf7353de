"""Shards of a run: ``source.shard`` for files, the sharded run directory, merged views, and
``sluice run --workers N`` as real processes against the simulator."""

from __future__ import annotations

import csv
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest

from pipeline.app.api import resume_run, start_run
from pipeline.app.campaign import Campaign, load_campaign
from pipeline.app.exits import EXIT_DISK, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, EXIT_UNSETTLED, EXIT_USAGE
from pipeline.app.rundir import RunDir
from pipeline.engine import Progress
from pipeline.errors import CampaignError, RunDirError
from pipeline.ledger import final_states
from pipeline.ops.dryrun import dry_run
from pipeline.ops.summary import summarize
from pipeline.scale.local import worst_exit
from pipeline.scale.shards import prepare_sharded_run, shard_campaign
from tests.helpers import simulator, sluice, write_campaign, write_recipients

pytestmark = [pytest.mark.timeout(240), pytest.mark.anyio]

N_ROWS = 4500  # three source chunks of up to 2000 rows


def _records(n: int) -> list[dict[str, str]]:
    """Recipients with what de-duplication and rejection look at spread over shards of 3:
    row 7 repeats row 2's key, row 20 row 3's number, row 11 has no valid number."""
    out = [
        {"id": f"c{i}", "phone": f"139{i:08d}", "first_name": f"n{i}", "code": f"{i % 10**6:06d}"}
        for i in range(1, n + 1)
    ]
    out[6]["id"] = "c2"
    out[19]["phone"] = out[2]["phone"]
    out[10]["phone"] = "12345"
    return out


def _write_source(tmp: Path, kind: str, n: int) -> dict[int, str]:
    """The source file; returns row (as the source numbers it) → phone."""
    records = _records(n)
    if kind == "csv":
        with (tmp / "recipients.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "phone", "first_name", "code"])
            for i, rec in enumerate(records, 1):
                # a short record (another width: the row path for its chunk)
                w.writerow(list(rec.values())[:2] if i == 2500 else list(rec.values()))
        return {i: rec["phone"] for i, rec in enumerate(records, 1)}
    phones = {}
    line = 0
    with (tmp / "recipients.jsonl").open("wb") as f:
        for i, rec in enumerate(records, 1):
            line += 1
            f.write(b"{not json\n" if i == 30 else orjson.dumps(rec) + b"\n")
            phones[line] = rec["phone"]
            if i % 997 == 0:
                line += 1
                f.write(b"\n")  # a blank line is no row, though it has a line number
    return phones


def _campaign(tmp: Path, kind: str, url: str, *, key: bool, dedupe_phone: bool, name: str) -> Campaign:
    source = tmp / ("recipients.csv" if kind == "csv" else "recipients.jsonl")
    key_line = 'key = "id"' if key else ""
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[source]
kind = "{kind}"
path = "{source.name}"
{key_line}
phone = "phone"
dedupe_phone = {str(dedupe_phone).lower()}
[provider]
kind = "simulator"
endpoint = "{url}"
[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ name = "{{first_name}}", code = "{{code}}" }}
[limits]
requests_per_second = 20
concurrency = 4
batch_size = 50
max_reject_ratio = 1
"""
    )
    return load_campaign(path)


def _finals(run_dir: Path) -> dict[int, tuple[str, str, str | None]]:
    out: dict[int, tuple[str, str, str | None]] = {}
    for f in final_states(RunDir(run_dir).ledger):
        assert f.row not in out
        out[f.row] = (f.key, f.status, f.code or f.reason)
    return out


class TestCampaign:
    def test_shard_accepted_for_files_and_checked(self, tmp_path: Path) -> None:
        _write_source(tmp_path, "csv", 30)
        c = _campaign(tmp_path, "csv", "http://127.0.0.1:9", key=True, dedupe_phone=False, name="c")
        assert shard_campaign(c, 2, 3).source.shard == "2/3"
        text = (tmp_path / "c.toml").read_text()
        for bad in ('"3/2"', '"0/2"', '"a/b"', "3"):
            (tmp_path / "bad.toml").write_text(text.replace("[provider]", f"shard = {bad}\n[provider]"))
            with pytest.raises(CampaignError) as exc:
                load_campaign(tmp_path / "bad.toml")
            assert exc.value.field == "source.shard"
        (tmp_path / "ok.toml").write_text(text.replace("[provider]", 'shard = " 2 / 3 "\n[provider]'))
        assert load_campaign(tmp_path / "ok.toml").source.shard == "2/3"
        with pytest.raises(RunDirError, match=r"leave source\.shard out"):
            shard_campaign(shard_campaign(c, 1, 2), 1, 2)

    def test_worst_exit_in_the_clis_order(self) -> None:
        assert worst_exit([]) == EXIT_OK
        assert worst_exit([EXIT_OK, EXIT_UNSETTLED, EXIT_OK]) == EXIT_UNSETTLED
        assert worst_exit([EXIT_UNSETTLED, EXIT_STOPPED]) == EXIT_STOPPED
        assert worst_exit([EXIT_STOPPED, 130, EXIT_OK]) == 130
        assert worst_exit([130, EXIT_USAGE]) == EXIT_USAGE
        assert worst_exit([EXIT_USAGE, EXIT_DISK]) == EXIT_DISK
        assert worst_exit([EXIT_DISK, EXIT_ERROR, 0]) == EXIT_ERROR
        assert worst_exit([0, -9]) == EXIT_ERROR  # a worker killed by a signal


class TestShardedRunDir:
    def test_created_checked_and_refused_where_it_would_send_twice(self, tmp_path: Path) -> None:
        _write_source(tmp_path, "csv", 30)
        c = _campaign(tmp_path, "csv", "http://127.0.0.1:9", key=True, dedupe_phone=False, name="c")
        fp = {"kind": "csv"}
        run = prepare_sharded_run(c, tmp_path / "run", 3, fp)
        assert [p.name for p in run.shards()] == ["1-of-3", "2-of-3", "3-of-3"]
        parent = RunDir(tmp_path / "run").load()
        assert parent["shards"] == 3 and parent["campaign_hash"] == c.digest()
        for i, path in enumerate(run.shards(), 1):
            doc = RunDir(path).load()
            assert doc["campaign"]["source"]["shard"] == f"{i}/3"
            assert doc["campaign_hash"] == shard_campaign(c, i, 3).digest()
        assert prepare_sharded_run(c, tmp_path / "run", 3, fp) == run  # a second run goes on in it
        with pytest.raises(RunDirError, match="--workers 3"):
            prepare_sharded_run(c, tmp_path / "run", 2, fp)
        # The parent has no ledger of its own: an unsharded run or resume there would send it all.
        with pytest.raises(RunDirError, match="in 3 shards"):
            anyio.run(lambda: start_run(c, tmp_path / "run"))
        with pytest.raises(RunDirError, match="in 3 shards"):
            anyio.run(lambda: resume_run(tmp_path / "run"))
        RunDir(tmp_path / "plain").create(c.to_dict(), c.digest(), fp)
        with pytest.raises(RunDirError, match="not sharded"):
            prepare_sharded_run(c, tmp_path / "plain", 2, fp)


class TestFileShards:
    @pytest.mark.parametrize(
        ("kind", "key", "dedupe_phone"),
        [
            ("csv", True, False),
            ("csv", True, True),
            ("csv", False, False),
            ("jsonl", True, True),
            ("jsonl", False, False),
        ],
    )
    async def test_shards_partition_the_rows_as_an_unsharded_run_settles_them(
        self, tmp_path: Path, kind: str, key: bool, dedupe_phone: bool
    ) -> None:
        phones = _write_source(tmp_path, kind, N_ROWS)
        with _sim(tmp_path, "whole") as whole_sim:
            whole = _campaign(tmp_path, kind, whole_sim.url, key=key, dedupe_phone=dedupe_phone, name="w")
            fast = _fast(whole)
            await start_run(fast, tmp_path / "whole")
        reference = _finals(tmp_path / "whole")
        assert len(reference) == N_ROWS
        assert ("c2", "rejected", "duplicate key") in reference.values() or not key

        n = 3
        with _sim(tmp_path, "shards") as sim:
            campaign = _campaign(tmp_path, kind, sim.url, key=key, dedupe_phone=dedupe_phone, name="s")
            for i in range(1, n + 1):
                part = shard_campaign(campaign, i, n)
                run_dir = tmp_path / f"shard{i}"
                if i == 1:  # stopped part-way, then resumed
                    stop = anyio.Event()

                    def halt(p: Progress, stop: anyio.Event = stop) -> None:
                        if p.counts["sent"] >= 100:
                            stop.set()

                    first = await start_run(part, run_dir, on_progress=halt, stop=stop)
                    assert first.stopped is not None and 100 <= first.counts["sent"] < N_ROWS // n
                    await resume_run(run_dir)
                else:
                    await start_run(_fast(part), run_dir)
            sim.stop()
            accepted = sim.accepted()
        parts = [_finals(tmp_path / f"shard{i}") for i in range(1, n + 1)]
        for i, rows in enumerate(parts, 1):
            assert all((row - i) % n == 0 for row in rows), i  # its own rows only
        assert sum(len(p) for p in parts) == len(reference)  # pairwise disjoint
        merged = {row: final for p in parts for row, final in p.items()}
        assert merged == reference  # every row, settled as the unsharded run settled it
        sent = [row for row, (_, status, _) in merged.items() if status == "sent"]
        assert accepted == Counter(phones[row] for row in sent)  # each sent row once
        statuses = [summarize(tmp_path / f"shard{i}") for i in range(1, n + 1)]
        assert all(s["complete"] for s in statuses)
        assert sum(s["source_rows"] for s in statuses) == summarize(tmp_path / "whole")["source_rows"]
        # The dry run counts a shard's rows the same way.
        reports = [await dry_run(shard_campaign(campaign, i, n)) for i in range(1, n + 1)]
        whole_report = await dry_run(campaign)
        assert sum(r.rows for r in reports) == whole_report.rows == N_ROWS
        assert sum(r.sendable for r in reports) == whole_report.sendable == len(sent)


def _fast(campaign: Campaign) -> Campaign:
    import dataclasses

    return dataclasses.replace(
        campaign, limits=dataclasses.replace(campaign.limits, requests_per_second=2000, concurrency=8)
    )


def _sim(tmp_path: Path, name: str) -> Any:
    where = tmp_path / f"sim-{name}"
    where.mkdir()
    return simulator(where)


# -- sluice run --workers N, as processes ------------------------------------------------------
def _poll(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)  # polling a condition, bounded by the deadline


def _run(*args: str, timeout: float = 180) -> tuple[int, str, str]:
    p = sluice(*args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode(), err.decode()


def _status(run_dir: Path) -> dict[str, Any]:
    code, out, err = _run("status", str(run_dir), "--json")
    assert code == 0, err
    return dict(orjson.loads(out))


def _export(run_dir: Path) -> set[tuple[str, ...]]:
    code, out, err = _run("export", str(run_dir))
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    return {tuple(r[k] for k in ("row", "key", "phone", "status", "code")) for r in rows}


def _sent_lines(ledger: Path) -> int:
    return ledger.read_bytes().count(b'"s":"sent"') if ledger.exists() else 0


def _progress_events(stderr: str) -> Iterator[dict[str, Any]]:
    for line in stderr.splitlines():
        if line.startswith("{") and '"event":"progress"' in line:
            yield orjson.loads(line)


class TestWorkers:
    def test_two_workers_send_each_recipient_once_and_merge_as_one_run(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 3000)
        with (tmp_path / "recipients.csv").open("a") as f:
            f.write("c5,13900009999,dup,1\n")  # a duplicate key (row 3001, shard 1 of 2; row 5 is shard 1)
            f.write("c3002,notaphone,x,1\n")
            f.write("c3003,13900000004,x,1\n")  # row 4's number again (no dedupe_phone: sent)
        with _sim(tmp_path, "whole") as whole_sim, _sim(tmp_path, "workers") as sim:
            write_campaign(tmp_path / "whole.toml", whole_sim.url, requests_per_second=200)
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=200)
            code, _, err = _run("run", str(tmp_path / "whole.toml"), "--run-dir", str(tmp_path / "whole"))
            assert code == 0, err
            code, _, err = _run("run", str(tmp_path / "c.toml"), "--workers", "2")
            assert code == 0, err
            sim.stop()
            accepted = sim.accepted()
        run_dir = tmp_path / "run"
        assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["1-of-2", "2-of-2"]
        assert accepted["13900000004"] == 2  # two rows carry it
        assert all(accepted[p] == 1 for r, p in phones.items() if r != 4)
        assert sum(accepted.values()) == 3001
        merged, whole = _status(run_dir), _status(tmp_path / "whole")
        for k in ("sent", "failed", "rejected", "unknown", "deferred", "pending", "source_rows", "complete"):
            assert merged[k] == whole[k], k
        assert merged["outcomes"] == whole["outcomes"]
        assert (merged["sent"], merged["rejected"], merged["source_rows"]) == (3001, 2, 3003)
        assert [s["state"] for s in merged["shards"]] == ["complete", "complete"]
        assert merged["running"] is None and merged["next"] is None
        assert _export(run_dir) == _export(tmp_path / "whole")
        # One progress display for the whole run: the parent's last snapshot adds both shards up.
        last = list(_progress_events(err))[-1]
        assert last["done"] and last["sent"] == 3001 and last["rejected"] == 2
        code, _, err = _run("report", str(run_dir))
        assert code == 0, err
        report = orjson.loads((run_dir / "report" / "report.json").read_bytes())
        assert report["summary"]["sent"] == 3001
        assert sum(sum(v) for v in report["series"]["settled_per_second"].values()) == 3001

    def test_the_workers_share_one_limit_measured_at_the_provider(self, tmp_path: Path) -> None:
        """Two workers, one lease limiter hosted by the parent: the simulator's busiest sliding
        second holds at most the campaign's 25 requests/s (each worker alone could send 25),
        and every request went out on a lease."""
        write_recipients(tmp_path / "recipients.csv", 1500)
        with _sim(tmp_path, "limit") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=25, batch_size=10, concurrency=4)
            code, _, err = _run("run", str(tmp_path / "c.toml"), "--workers", "2")
            assert code == 0, err
            peaks = httpx.get(sim.url + "/__stats", timeout=5).json()["peak_1s"]
            sim.stop()
            accepted = sim.accepted()
        assert len(accepted) == 1500 and set(accepted.values()) == {1}
        (peak,) = peaks.values()
        assert 20 <= peak["requests"] <= 25, peak
        # Each worker paced with leases from the parent's limiter: one per request it sent.
        used = []
        for shard in ("1-of-2", "2-of-2"):
            log = (tmp_path / "run" / "shards" / shard / "log.jsonl").read_bytes().splitlines()
            (counts,) = [e for e in map(orjson.loads, log) if e.get("event") == "lease_counts"]
            used.append(counts["used"])
        assert sum(used) == 150 and min(used) > 0, used

    def test_sigint_stops_all_then_one_shard_then_the_rest_resume_without_duplicates(
        self, tmp_path: Path
    ) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 3000)
        run_dir = tmp_path / "run"
        ledgers = [run_dir / "shards" / f"{i}-of-2" / "ledger.jsonl" for i in (1, 2)]
        with simulator(tmp_path, "--latency-ms", "30") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=40, batch_size=10)
            parent = sluice("run", str(tmp_path / "c.toml"), "--workers", "2")
            _poll(lambda: all(_sent_lines(x) >= 30 for x in ledgers) or parent.poll() is not None)
            assert parent.poll() is None
            # While the workers run, nothing else may send for the run or any of its shards.
            for args in (
                ("run", str(tmp_path / "c.toml"), "--workers", "2"),
                ("resume", str(run_dir)),
                ("resume", str(run_dir / "shards" / "1-of-2")),
            ):
                code, _, err = _run(*args)
                assert code == EXIT_USAGE, (args, err)
                assert "is in use by pid" in err, err
            assert f"pid {parent.pid} " in _run("resume", str(run_dir))[2]
            parent.send_signal(signal.SIGINT)
            _, err = parent.communicate(timeout=60)
            assert parent.returncode == 130, err.decode()
            # Both workers stopped with the parent: their shards are free, nothing is in flight.
            assert all(RunDir(x.parent).holder() is None for x in ledgers)
            mid = _status(run_dir)
            assert not mid["complete"] and mid["unknown"] == 0 and 60 <= mid["sent"] < 3000
            assert [s["state"] for s in mid["shards"]] == ["stopped", "stopped"]
            assert mid["next"] == f"sluice resume {run_dir}"
            code, _, err = _run("resume", str(run_dir / "shards" / "1-of-2"))  # one shard alone
            assert code == 0, err
            assert [s["state"] for s in _status(run_dir)["shards"]] == ["complete", "stopped"]
            code, _, err = _run("resume", str(run_dir), "--workers", "2")
            assert code == 0, err
            sim.stop()
        accepted = sim.accepted()
        assert all(accepted[p] == 1 for p in phones.values())
        assert sum(accepted.values()) == 3000
        done = _status(run_dir)
        assert done["complete"] and done["sent"] == 3000

    def test_workers_stop_when_the_parent_is_killed(self, tmp_path: Path) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 2000)
        run_dir = tmp_path / "run"
        ledgers = [run_dir / "shards" / f"{i}-of-2" / "ledger.jsonl" for i in (1, 2)]
        with simulator(tmp_path, "--latency-ms", "30") as sim:
            write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=40, batch_size=10)
            parent = sluice("run", str(tmp_path / "c.toml"), "--workers", "2")
            _poll(lambda: all(_sent_lines(x) >= 30 for x in ledgers) or parent.poll() is not None)
            parent.kill()  # no forwarding: the workers see their stdin close
            parent.communicate(timeout=60)
            _poll(lambda: all(RunDir(x.parent).holder() is None for x in ledgers))
            assert not _status(run_dir)["complete"]
            code, _, err = _run("resume", str(run_dir))
            assert code == 0, err
            sim.stop()
        accepted = sim.accepted()
        assert all(accepted[p] == 1 for p in phones.values()) and sum(accepted.values()) == 2000

    def test_resume_with_another_worker_count_is_refused(self, tmp_path: Path) -> None:
        write_recipients(tmp_path / "recipients.csv", 10)
        write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        c = load_campaign(tmp_path / "c.toml")
        prepare_sharded_run(c, tmp_path / "run", 2, {"kind": "csv"})
        code, _, err = _run("resume", str(tmp_path / "run"), "--workers", "3")
        assert code == EXIT_USAGE and "--workers 2" in err, err
        code, _, err = _run("run", str(tmp_path / "c.toml"))
        assert code == EXIT_USAGE and "in 2 shards" in err, err
        for command in ("reconcile", "receipts", "listen"):  # one ledger's commands: per shard
            code, _, err = _run(command, str(tmp_path / "run"))
            assert code == EXIT_USAGE and f"sluice {command} " in err and "I-of-2" in err, err
