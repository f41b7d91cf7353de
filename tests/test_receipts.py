"""Delivery receipts end to end: the simulator pushes to `sluice listen`; crash; bad input; pull."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import REPO
from tests.helpers import final_statuses, simulator, sluice, write_recipients
from tests.test_providers_e2e import PROVIDERS, campaign

SUBHOOK_KEY = "test-subhook-key"


@dataclass
class ListenerProcess:
    proc: subprocess.Popen[bytes]
    base: str
    urls: dict[str, str]

    @property
    def receipts_to(self) -> str:
        return self.urls["receipts-to"]

    def stats(self) -> dict[str, int]:
        answer: dict[str, int] = httpx.get(self.receipts_to + "/__stats", timeout=5).json()
        return answer

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err.decode()
        last: dict[str, int] = orjson.loads(err.decode().strip().splitlines()[-1])
        return last


@contextmanager
def listener(run_dir: Path, *args: str) -> Iterator[ListenerProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "listen", str(run_dir), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "SUBMAIL_SUBHOOK_KEY": SUBHOOK_KEY},
    )
    assert proc.stdout is not None
    base = proc.stdout.readline().decode().strip()
    assert base.startswith("http://127.0.0.1:"), (base, proc.stderr.read() if proc.stderr else b"")
    urls = dict(proc.stdout.readline().decode().split() for _ in range(4))
    try:
        yield ListenerProcess(proc, base, urls)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(condition: object, seconds: float) -> None:
    """Poll ``condition()`` until true, bounded by ``seconds``."""
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # polling a condition, bounded by the deadline


def push_stats(sim_url: str) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(sim_url + "/__stats", timeout=5).json()["receipts_push"]
    return stats


def receipt_rows(run_dir: Path) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for line in (run_dir / "receipts.jsonl").read_bytes().splitlines():
        rec = orjson.loads(line)
        assert rec["r"] not in out, "a recipient's receipt written twice"
        out[rec["r"]] = rec
    return out


def status_json(run_dir: Path) -> dict[str, object]:
    p = sluice("status", str(run_dir), "--json")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    status: dict[str, object] = orjson.loads(out)
    return status


PUSH = ("--undelivered-rate", "0.1", "--duplicate-rate", "0.2", "--out-of-order-rate", "0.1")


@pytest.mark.parametrize("name", ["aliyun", "aliyun-card", "submail-batchsend", "nxcloud"])
def test_push_end_to_end_and_pull_settles_the_same(tmp_path: Path, name: str) -> None:
    provider, message, batch = PROVIDERS[name]
    phones = write_recipients(tmp_path / "recipients.csv", 600)
    run_dir = tmp_path / "run"
    with listener(run_dir) as lis:
        with simulator(
            tmp_path,
            "--receipts-to",
            lis.receipts_to,
            "--subhook-key",
            SUBHOOK_KEY,
            "--receipt-delay-ms",
            "30",
            "--seed",
            "3",
            "--submail-log-interval",
            "0",
            *PUSH,
        ) as sim:
            c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
            p = sluice("run", str(c))
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
            wait_for(lambda: push_stats(sim.url)["pending"] == 0, 60)
            pushed = push_stats(sim.url)
            accepted = httpx.get(sim.url + "/__stats").json()["accepted_recipients"]
            counts = lis.stop()
            # pull mode: the same run without its receipts asks the status API instead
            pushed_rows = receipt_rows(run_dir)
            (run_dir / "receipts.jsonl").rename(tmp_path / "pushed.jsonl")
            q = sluice("receipts", str(run_dir), "--settle-after", "0", "--qps", "2000")
            out, err = q.communicate(timeout=120)
            assert q.returncode == 0, (out + err).decode()
        pulled_rows = receipt_rows(run_dir)
        assert {r: v["d"] for r, v in pulled_rows.items()} == {r: v["d"] for r, v in pushed_rows.items()}
        (run_dir / "receipts.jsonl").unlink()
        (tmp_path / "pushed.jsonl").rename(run_dir / "receipts.jsonl")
    assert accepted == len(phones) == pushed["scheduled"] == pushed["acked_unique"]
    assert pushed["duplicates"] > 0 and pushed["undelivered"] > 0
    rows = receipt_rows(run_dir)
    sent = {r for r, s in final_statuses(run_dir / "ledger.jsonl").items() if s == "sent"}
    assert set(rows) == sent, "every accepted recipient has exactly one receipt"
    delivered = sum(1 for r in rows.values() if r["d"])
    assert len(rows) - delivered == pushed["undelivered"]
    assert counts["matched"] == len(phones)
    assert counts["duplicate"] == pushed["duplicates"], "each duplicate push counted once, not stored"
    assert counts.get("unmatched", 0) == 0
    status = status_json(run_dir)
    assert status["delivered"] == delivered
    assert status["undelivered"] == pushed["undelivered"]
    assert status["awaiting_receipt"] == 0


def test_listener_killed_mid_stream_loses_no_acknowledged_receipt(tmp_path: Path) -> None:
    provider, message, batch = PROVIDERS["aliyun"]
    phones = write_recipients(tmp_path / "recipients.csv", 3000)
    run_dir = tmp_path / "run"
    with listener(run_dir) as lis:
        port = lis.base.rsplit(":", 1)[1]
        with simulator(
            tmp_path,
            "--receipts-to",
            lis.receipts_to,
            "--receipt-delay-ms",
            "400",
            "--receipt-retries",
            "0.5,1,1,2,2,4,4,8",
            "--duplicate-rate",
            "0.1",
            "--undelivered-rate",
            "0.05",
            "--seed",
            "5",
        ) as sim:
            c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
            p = sluice("run", str(c))
            # acknowledged (written, then answered), not only matched: under load the group
            # commit may lag behind matching
            wait_for(lambda: len(httpx.get(sim.url + "/__receipts_acked").json()) >= 300, 60)
            lis.proc.kill()  # SIGKILL: no chance to flush anything
            lis.proc.communicate()
            acked = httpx.get(sim.url + "/__receipts_acked").json()
            at_kill = receipt_rows(run_dir)
            # every receipt acknowledged before the kill is on the disk
            ledger = run_dir / "ledger.jsonl"
            out_id_of = {}
            for line in ledger.read_bytes().splitlines():
                if line.startswith(b'{"i":'):
                    obj = orjson.loads(line)
                    for r in obj["r"]:
                        out_id_of[r] = obj["o"]
            stored = {f"aliyun {out_id_of[r]}|{phones[r]}" for r in at_kill}
            assert acked and set(acked) <= stored, "an acknowledged receipt was lost"
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
            with listener(run_dir, "--port", port) as again:
                wait_for(lambda: push_stats(sim.url)["pending"] == 0, 90)
                pushed = push_stats(sim.url)
                again.stop()
    assert pushed["failed_pushes"] > 0, "the kill left pushes to retry"
    assert pushed["dropped"] == 0
    assert pushed["acked_unique"] == len(phones)
    rows = receipt_rows(run_dir)
    assert set(rows) == set(phones)
    assert len(at_kill) < len(rows)
    assert sum(1 for r in rows.values() if not r["d"]) == pushed["undelivered"]
    print(f"crash: {len(acked)} acknowledged before the kill, {len(at_kill)} on disk, {len(rows)} after")


def _signed(event: dict[str, str], key: str) -> dict[str, str]:
    token = "t0k3n"
    return {**event, "token": token, "signature": hashlib.md5((token + key).encode()).hexdigest()}


def test_bad_input_answered_and_nothing_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with listener(run_dir) as lis:
        u = lis.urls
        token = lis.receipts_to.rsplit("/", 1)[1]
        event = {"events": "delivered", "address": "13900000001", "send_id": "x" * 32, "tag": "t"}
        with httpx.Client(timeout=10) as client:
            assert client.post(u["aliyun"], content=b"[{not json").status_code == 400
            assert client.post(u["aliyun"], content=b'{"a":1}').status_code == 400
            assert client.post(u["aliyun"], content=b"[]").status_code == 400
            assert client.post(u["submail"], data=_signed(event, "wrong-key")).status_code == 403
            assert client.post(u["submail"], data={**event, "token": "a"}).status_code == 403
            assert client.post(u["nxcloud"], data={"phone": "1"}).status_code == 400
            no_token = lis.base + "/aliyun"
            assert client.post(no_token, content=b"[]").status_code == 404
            wrong = lis.base + "/" + token[:-1] + "x/nxcloud"
            assert client.post(wrong, data={"messageid": "m", "status": "2"}).status_code == 404
            try:
                big = client.post(u["aliyun"], content=b"[" + b" " * (10 << 20) + b"]")
                assert big.status_code == 413
            except httpx.TransportError:
                pass  # the server may close before the client has written 10 MB; then:
            assert client.get(lis.receipts_to + "/__stats").json()["requests"] >= 9
            # a well-formed receipt before the run exists: 503, so the provider retries later
            ok = [{"phone_number": "13900000001", "success": True, "out_id": "o", "biz_id": "b"}]
            assert client.post(u["aliyun"], json=ok).status_code == 503
            assert client.post(u["submail"], data=_signed(event, SUBHOOK_KEY)).status_code == 503
        counts = lis.stop()
    assert counts["bad_token"] == 2
    assert counts["bad_signature"] == 2
    assert counts["bad_request"] == 4
    assert (run_dir / "receipts.jsonl").stat().st_size == 0
    assert (run_dir / "receipts-unmatched.jsonl").stat().st_size == 0


def test_export_and_report_show_delivery(tmp_path: Path) -> None:
    provider, message, batch = PROVIDERS["nxcloud"]
    write_recipients(tmp_path / "recipients.csv", 300)
    run_dir = tmp_path / "run"
    with listener(run_dir) as lis:
        with simulator(
            tmp_path, "--receipts-to", lis.receipts_to, "--receipt-delay-ms", "20", "--seed", "9",
            "--undelivered-rate", "0.2",
        ) as sim:  # fmt: skip
            c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
            p = sluice("run", str(c))
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
            wait_for(lambda: push_stats(sim.url)["pending"] == 0, 60)
            undelivered = push_stats(sim.url)["undelivered"]
        # a DR in the query string (NXCloud's pre-2023 accounts) naming no recipient of the run:
        # answered, kept apart, counted; its repeat only counted
        stray = {"phone": "8613900000001", "messageid": "not-ours", "status": "2", "result": "DELIVRD"}
        for _ in range(2):
            answer = httpx.get(lis.urls["nxcloud"], params=stray, timeout=10)
            assert answer.status_code == 200 and answer.text == "success"
        counts = lis.stop()
    assert counts["unmatched"] == 1 and counts["duplicate"] == 1
    unmatched = (run_dir / "receipts-unmatched.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in unmatched] == ["not-ours"]
    assert status_json(run_dir)["unmatched_receipts"] == 1
    rows = receipt_rows(run_dir)
    e = sluice("export", str(run_dir), "--format", "jsonl")
    out, err = e.communicate(timeout=60)
    assert e.returncode == 0, err.decode()
    exported = [orjson.loads(line) for line in out.splitlines()]
    assert len(exported) == 300
    for rec in exported:
        r = rows[rec["row"]]
        assert rec["delivery"] == ("delivered" if r["d"] else "undelivered")
        assert rec["delivery_code"] == r["c"] and rec["delivered_at"] == r["t"]
    assert sum(rec["delivery"] == "undelivered" for rec in exported) == undelivered > 0
    assert {rec["delivery_code"] for rec in exported} == {"DELIVRD", "UNDELIV"}
    rp = sluice("report", str(run_dir))
    _, err = rp.communicate(timeout=120)
    assert rp.returncode == 0, err.decode()
    summary = orjson.loads((run_dir / "report" / "report.json").read_bytes())["summary"]
    assert summary["delivered"] == 300 - undelivered
    assert summary["delivery_rate"] == round((300 - undelivered) / 300, 4)
    assert summary["undelivered_reasons"] == {"UNDELIV": undelivered}
    assert 0 <= summary["delivery_p50_s"] <= summary["delivery_p90_s"] <= summary["delivery_p99_s"] < 60
    assert (run_dir / "report" / "deliveries_per_minute.png").stat().st_size > 1000
    assert (run_dir / "report" / "undelivered_reasons.png").exists()


def test_run_with_listen_serves_receipts_for_the_run(tmp_path: Path) -> None:
    provider, message, batch = PROVIDERS["aliyun"]
    write_recipients(tmp_path / "recipients.csv", 50)
    with simulator(tmp_path) as sim:
        c = campaign(tmp_path / "c.toml", sim.url, provider, message, batch)
        p = sluice("run", str(c), "--listen", "0")
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    token = (tmp_path / "run" / "listen-token").read_text().strip()
    shown = next(line for line in err.decode().splitlines() if line.startswith("receipts: "))
    assert f"/{token}/aliyun" in shown and f"/{token}/nxcloud" in shown
    assert (tmp_path / "run" / "receipts.jsonl").exists()
