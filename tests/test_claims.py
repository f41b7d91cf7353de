"""Shard claims through a real redis-server (pipeline/scale/claims.py) and `sluice worker` processes
against the simulator: claims and epochs, the lock a newer claim takes over, two workers sharing
a run, a worker SIGKILLed mid-shard, a worker frozen past its lease."""

from __future__ import annotations

import collections
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from redis.asyncio import Redis

from pipeline.app.rundir import RunDir
from pipeline.errors import RunDirError
from pipeline.scale.claims import ALL_DONE, Claim, Lease, ShardClaims, Unregistered, Waiting
from tests.conftest import REPO
from tests.helpers import SimulatorProcess, simulator, sluice
from tests.redis_server import redis_server

pytestmark = pytest.mark.timeout(120)

ROWS = 2000
LEASE_TTL = 1.5


# -- a redis-server on loopback (tests/redis_server.py), one per module ---------------------
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


def wait_for(what: str, cond: Callable[[], object], timeout: float = 20.0, every: float = 0.01) -> None:
    """Poll ``cond`` until it holds (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


# -- the scripts, against real Redis ----------------------------------------------------
@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def _run_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.anyio
async def test_claims_give_distinct_shards_under_increasing_epochs(
    aclient: Redis, request: pytest.FixtureRequest
) -> None:
    run = _run_name(request)
    workers = [ShardClaims(aclient, run, f"w{i}", ttl=30) for i in range(4)]
    assert await workers[0].register(3) is True
    assert await workers[1].register(3) is False  # idempotent
    with pytest.raises(ValueError, match="3 shards"):
        await workers[2].register(4)
    got = [await w.claim() for w in workers[:3]]
    assert all(isinstance(c, Claim) for c in got)
    claims = [c for c in got if isinstance(c, Claim)]
    assert sorted(c.shard for c in claims) == [1, 2, 3]
    epochs = [c.epoch for c in claims]
    assert epochs == sorted(set(epochs)), epochs
    waiting = await workers[3].claim()
    assert isinstance(waiting, Waiting) and 25 < waiting.seconds <= 30
    assert await ShardClaims(aclient, run + "-other", "w", ttl=30).progress() == (0, 0)
    unregistered = ShardClaims(aclient, run + "-other", "w", ttl=30)
    with pytest.raises(Unregistered):
        await unregistered.claim()


@pytest.mark.anyio
async def test_an_expired_lease_is_reclaimed_and_the_stale_epoch_refused(
    aclient: Redis, request: pytest.FixtureRequest
) -> None:
    run = _run_name(request)
    old = ShardClaims(aclient, run, "old", ttl=0.3)
    new = ShardClaims(aclient, run, "new", ttl=30)
    await old.register(1)
    first = await old.claim()
    assert isinstance(first, Claim)
    assert await old.beat(first)
    assert isinstance(await new.claim(), Waiting)  # held
    deadline = time.monotonic() + 5
    second = await new.claim()
    while not isinstance(second, Claim):
        assert time.monotonic() < deadline, "the lease never expired"
        second = await new.claim()
    assert second.shard == first.shard and second.epoch > first.epoch
    # The old holder: every action refused, and none of them disturbs the new one.
    assert not await old.beat(first)
    assert not await old.release(first)
    assert not await old.done(first)
    assert await new.beat(second)
    assert isinstance(await old.claim(), Waiting)
    assert await new.done(second)
    assert await new.claim() == ALL_DONE
    assert await new.progress() == (1, 1)


@pytest.mark.anyio
async def test_a_lease_that_lapsed_unclaimed_cannot_be_beaten_back(
    aclient: Redis, request: pytest.FixtureRequest
) -> None:
    run = _run_name(request)
    claims = ShardClaims(aclient, run, "w", ttl=0.2)
    await claims.register(1)
    claim = await claims.claim()
    assert isinstance(claim, Claim)
    expiry = claim.expires_ms / 1000
    wait_for("the lease to lapse", lambda: time.time() > expiry + 0.05, timeout=5)
    assert not await claims.beat(claim)
    assert not await claims.done(claim)


@pytest.mark.anyio
async def test_done_shards_are_never_claimed_again(aclient: Redis, request: pytest.FixtureRequest) -> None:
    run = _run_name(request)
    claims = ShardClaims(aclient, run, "w", ttl=0.2)
    await claims.register(2)
    a, b = await claims.claim(), await claims.claim()
    assert isinstance(a, Claim) and isinstance(b, Claim)
    assert await claims.done(a)
    assert await claims.release(b)
    seen = []
    deadline = time.monotonic() + 1.0  # many lease lifetimes: a done shard would come back
    while time.monotonic() < deadline:
        c = await claims.claim()
        assert isinstance(c, Claim)
        seen.append(c.shard)
        assert await claims.release(c)
    assert set(seen) == {b.shard}
    assert await claims.register(2) is False  # registering again brings nothing back
    c = await claims.claim()
    assert isinstance(c, Claim) and c.shard == b.shard


@pytest.mark.anyio
async def test_the_fence_closes_without_heartbeats_and_at_once_on_a_refused_one(
    aclient: Redis, request: pytest.FixtureRequest
) -> None:
    import anyio

    run = _run_name(request)
    claims = ShardClaims(aclient, run, "w", ttl=0.4)
    await claims.register(1)
    t_req = time.monotonic()
    claim = await claims.claim()
    assert isinstance(claim, Claim)
    lease = Lease(claims, claim, t_req, margin=0.08)
    assert lease.fence()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lease.keep)
        # Beating, the fence stays open over several ttls.
        with anyio.move_on_after(1.2):
            while True:
                assert lease.fence()
                await anyio.sleep(0.01)
        assert lease.beats >= 3
        tg.cancel_scope.cancel()
    # No more beats: closed within ttl - margin of the last beat's request.
    closes_by = lease.valid_until
    assert closes_by <= time.monotonic() + 0.4 - 0.08
    await anyio.sleep(max(0.0, closes_by - time.monotonic()) + 0.01)  # the time it is about
    assert not lease.fence()
    # A new claim; another owner takes its shard over in Redis: the next beat closes the fence.
    t_req = time.monotonic()
    wait_until = time.monotonic() + 5
    again = await claims.claim()
    while not isinstance(again, Claim):
        assert time.monotonic() < wait_until
        again = await claims.claim()
    lease = Lease(claims, again, t_req, margin=0.08)
    await aclient.hset(claims.owners, str(again.shard), "thief:1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lease.keep)
        for _ in range(200):  # two seconds at most; a beat is due every 0.1 s
            if lease.lost is not None:
                break
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert lease.lost is not None
    assert not lease.fence() and time.monotonic() < lease.valid_until


# -- the shard's run lock, keyed on the epoch ----------------------------------------------
def test_a_newer_epoch_takes_the_lock_a_frozen_holder_keeps(tmp_path: Path) -> None:
    shard = tmp_path / "shards" / "1-of-2"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from pipeline.app.rundir import RunDir\n"
            f"with RunDir(Path({str(shard)!r})).lock('sluice worker', epoch=5):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline() == b"held\n"
        rd = RunDir(shard)
        with pytest.raises(RunDirError, match="in use"), rd.lock("sluice resume"):
            pass
        with pytest.raises(RunDirError, match="in use"), rd.lock("sluice worker", epoch=4):
            pass
        with rd.lock("sluice worker", epoch=6):
            now = rd.holder()
            assert now is not None and now.pid == os.getpid() and now.epoch == 6
            holder.stdin.close()  # the old holder ends: the newer claim takes the flock
            assert holder.wait(timeout=30) == 0
            wait_for("the flock to be retaken", lambda: rd.holder() is not None, timeout=5)
            manual = subprocess.run(  # a manual resume is still refused
                [
                    sys.executable,
                    "-c",
                    "from pathlib import Path; from pipeline.app.rundir import RunDir\n"
                    f"with RunDir(Path({str(shard)!r})).lock('sluice resume'): pass",
                ],
                cwd=REPO,
                capture_output=True,
                timeout=60,
            )
            assert manual.returncode == 1 and b"is in use by pid" in manual.stderr, manual.stderr
        assert rd.holder() is None
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stdin.close()


def test_a_live_worker_without_the_flock_still_holds_the_shard(tmp_path: Path) -> None:
    """A worker that went on past a frozen holder's flock has none of its own until it retakes
    it: a manual resume that finds the flock free is still refused while that worker lives."""
    shard = tmp_path / "shards" / "1-of-2"
    rd = RunDir(shard)
    with rd.lock("sluice run"):
        pass  # creates run.lock
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert alive.stdin is not None
    try:
        info = {"pid": alive.pid, "host": socket.gethostname(), "since": 1.0, "command": "sluice worker"}
        rd.lock_file.write_bytes(orjson.dumps({**info, "epoch": 7}))
        with pytest.raises(RunDirError, match=f"in use by pid {alive.pid}"), rd.lock("sluice resume"):
            pass
        with pytest.raises(RunDirError, match="in use"), rd.lock("sluice worker", epoch=7):
            pass
        with rd.lock("sluice worker", epoch=8):  # a newer claim goes on
            pass
        rd.lock_file.write_bytes(orjson.dumps({**info, "epoch": 7}))
        alive.stdin.close()
        alive.wait(timeout=30)
        with rd.lock("sluice resume"):  # that worker is gone
            pass
    finally:
        if alive.poll() is None:
            alive.kill()
            alive.wait()
        alive.stdin.close()
    # A worker that let go of the shard (and lives on, with other shards) does not hold it.
    moved_on = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from pipeline.app.rundir import RunDir\n"
            f"with RunDir(Path({str(shard)!r})).lock('sluice worker', epoch=9): pass\n"
            "print('released', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert moved_on.stdin is not None and moved_on.stdout is not None
    try:
        assert moved_on.stdout.readline() == b"released\n"
        with rd.lock("sluice resume"):
            pass
    finally:
        moved_on.stdin.close()
        moved_on.wait(timeout=30)
        moved_on.stdout.close()


# -- sluice worker processes against the simulator --------------------------------------
def make_run(tmp: Path, url: str, rows: int = ROWS) -> Path:
    """An SQLite source of ``rows`` recipients (integer keys 1..rows) and its campaign."""
    conn = sqlite3.connect(tmp / "r.db")
    with conn:
        conn.execute("CREATE TABLE people (id INTEGER, phone TEXT, first_name TEXT, code TEXT)")
        conn.executemany(
            "INSERT INTO people VALUES (?, ?, ?, ?)",
            [(i, f"139{i:08d}", f"n{i}", f"{i:06d}") for i in range(1, rows + 1)],
        )
    conn.close()
    campaign = tmp / "campaign.toml"
    campaign.write_text(
        f"""
[source]
kind = "sqlite"
path = "r.db"
table = "people"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{url}"
timeout = 2.0
[message]
template_code = "SMS_154950909"
sign_name = "Acme"
params = {{ name = "{{first_name}}", code = "{{code}}" }}
[limits]
requests_per_second = 50
concurrency = 4
batch_size = 10
max_attempts = 5
backoff_base_ms = 10
backoff_max_ms = 100
"""
    )
    return campaign


def worker(
    campaign: Path, redis_url: str, run_dir: Path, shards: int, *extra: str
) -> subprocess.Popen[bytes]:
    return sluice(
        "worker",
        str(campaign),
        "--coordinator",
        redis_url,
        "--run-dir",
        str(run_dir),
        "--shards",
        str(shards),
        "--lease-ttl",
        str(LEASE_TTL),
        *extra,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def ledger_rows(run_dir: Path) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], str]]:
    """(shard, row) → its last status, and → its key where a line names it, over every shard."""
    status: dict[tuple[str, int], str] = {}
    keys: dict[tuple[str, int], str] = {}
    for ledger in sorted(run_dir.glob("shards/*/ledger.jsonl")):
        for line in ledger.read_bytes().splitlines():
            if line.startswith(b'{"r":'):
                obj = orjson.loads(line)
                at = (ledger.parent.name, obj["r"])
                status[at] = obj["s"]
                if "k" in obj:
                    keys[at] = obj["k"]
    return status, keys


def ledger_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_once(sim: SimulatorProcess, run_dir: Path, max_unknown: int) -> collections.Counter[str]:
    """Every recipient settled in some shard's ledger, none accepted twice, every one the ledger
    calls sent accepted, and no more unknown than ``max_unknown``."""
    accepted = sim.accepted()
    assert max(accepted.values()) == 1, [p for p, n in accepted.items() if n > 1][:5]
    statuses, keys = ledger_rows(run_dir)
    assert len(statuses) == ROWS
    by_status = collections.Counter(statuses.values())
    assert set(by_status) <= {"sent", "unknown"}, by_status
    assert by_status["unknown"] <= max_unknown, by_status
    sent = {f"139{int(keys[at]):08d}" for at, s in statuses.items() if s == "sent"}
    assert len(sent) == by_status["sent"] and sent <= set(accepted)
    assert len(accepted) <= ROWS
    assert set(accepted) <= {f"139{i:08d}" for i in range(1, ROWS + 1)}
    return by_status


def shard_claims(run_dir: Path) -> dict[int, list[dict[str, object]]]:
    """Shard → its shard_claimed events, from its log.jsonl."""
    out: dict[int, list[dict[str, object]]] = {}
    for log in run_dir.glob("shards/*/log.jsonl"):
        for line in log.read_bytes().splitlines():
            event = orjson.loads(line)
            if event.get("event") == "shard_claimed":
                out.setdefault(int(event["shard"]), []).append(event)
    return out


def done_shards(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.scard(key)) for key in client.scan_iter("sluice:claims:*:done"))
    finally:
        client.close()


def owned_by(redis_url: str, pid: int) -> int | None:
    """The shard a worker process holds now, from the claims' owners (host/pid/random:epoch)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key in client.scan_iter("sluice:claims:*:owners"):
            for shard, owner in client.hgetall(key).items():
                if owner.split("/")[1] == str(pid):
                    return int(shard)
        return None
    finally:
        client.close()


@pytest.fixture
def isolated_redis(redis_url: str) -> str:
    """The module's Redis, emptied: one run's keys at a time."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


@pytest.mark.slow
@pytest.mark.parametrize("limiter", [None, "none"], ids=["shared-limit", "each-its-own"])
def test_two_workers_send_every_recipient_once(
    tmp_path: Path, isolated_redis: str, limiter: str | None
) -> None:
    """Two workers share the campaign's 50 requests/s through the coordinator's lease limiter:
    at the simulator, no sliding second holds more. With ``--limiter none`` each paces alone
    and together they go over (the check can fail)."""
    with simulator(tmp_path, "--latency-ms", "10") as sim:
        campaign = make_run(tmp_path, sim.url)
        run_dir = tmp_path / "run"
        extra = () if limiter is None else ("--limiter", limiter)
        procs = [worker(campaign, isolated_redis, run_dir, 4, *extra) for _ in range(2)]
        results = [finish(p) for p in procs]
        peaks = httpx.get(sim.url + "/__stats", timeout=5).json()["peak_1s"]
        sim.stop()
        for code, err in results:
            assert code == 0, err
            assert "every shard of" in err
        check_once(sim, run_dir, max_unknown=0)
    (peak,) = peaks.values()  # one account
    if limiter is None:
        assert peak["requests"] <= 50, peak
    else:
        assert peak["requests"] > 50, peak
    assert done_shards(isolated_redis) == 4
    claims = shard_claims(run_dir)
    assert sorted(claims) == [1, 2, 3, 4]
    assert all(len(events) == 1 for events in claims.values())
    owners = {str(events[0]["owner"]).split("/")[1] for events in claims.values()}
    assert owners <= {str(p.pid) for p in procs}
    doc = RunDir(run_dir).load()
    assert doc["shards"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("kill_at_lines", [3, 300], ids=["first-lines", "mid-shard"])
def test_a_worker_killed_mid_shard_is_finished_by_another(
    tmp_path: Path, isolated_redis: str, kill_at_lines: int
) -> None:
    with simulator(tmp_path, "--latency-ms", "30") as sim:
        campaign = make_run(tmp_path, sim.url)
        run_dir = tmp_path / "run"
        victim = worker(campaign, isolated_redis, run_dir, 4)
        wait_for("the victim's claim", lambda: owned_by(isolated_redis, victim.pid) is not None)
        shard = owned_by(isolated_redis, victim.pid)
        assert shard is not None
        ledger = run_dir / "shards" / f"{shard}-of-4" / "ledger.jsonl"
        wait_for(f"{kill_at_lines} ledger lines", lambda: ledger_lines(ledger) >= kill_at_lines)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        killed_at = ledger_lines(ledger)
        assert killed_at < 600, "the shard finished before the kill"  # 500 rows: ~600 lines
        survivor = worker(campaign, isolated_redis, run_dir, 4)
        code, err = finish(survivor)
        sim.stop()
        assert code in (0, 3), err  # 3: recipients in flight at the kill are unknown
        by_status = check_once(sim, run_dir, max_unknown=4 * 10)  # concurrency x batch size
        assert (code == 3) == bool(by_status["unknown"])
    assert done_shards(isolated_redis) == 4
    events = shard_claims(run_dir)[shard]
    assert len(events) == 2
    assert int(str(events[1]["epoch"])) > int(str(events[0]["epoch"]))
    assert str(events[1]["owner"]).split("/")[1] == str(survivor.pid)


@pytest.mark.slow
def test_a_worker_frozen_past_its_lease_sends_nothing_after_it(tmp_path: Path, isolated_redis: str) -> None:
    with simulator(tmp_path, "--latency-ms", "30") as sim:
        campaign = make_run(tmp_path, sim.url)
        run_dir = tmp_path / "run"
        stale = worker(campaign, isolated_redis, run_dir, 2)
        try:
            wait_for("the stale worker's claim", lambda: owned_by(isolated_redis, stale.pid) is not None)
            shard = owned_by(isolated_redis, stale.pid)
            assert shard is not None
            ledger = run_dir / "shards" / f"{shard}-of-2" / "ledger.jsonl"
            wait_for("its first sends", lambda: ledger_lines(ledger) >= 50)
            stale.send_signal(signal.SIGSTOP)
            frozen_at = time.time()
            assert ledger_lines(ledger) < 1000, "the shard finished before the freeze"
            # Another worker takes both shards (the frozen one once its lease lapsed) and ends.
            fresh = worker(campaign, isolated_redis, run_dir, 2)
            code, err = finish(fresh)
            fresh_ended = time.time()
            assert code in (0, 3), err
            assert f"shard {shard}/2" in err
            assert fresh_ended - frozen_at > LEASE_TTL
        finally:
            stale.send_signal(signal.SIGCONT)
        stale_code, stale_err = finish(stale)
        sim.stop()
        assert stale_code == 0, stale_err  # every shard is done: nothing left for it
        assert "lease lost" in stale_err
        # Only the stale worker was alive after the fresh one ended: the simulator got nothing
        # since, and nothing was accepted twice.
        late = [
            line for line in sim.receipts.read_bytes().splitlines() if orjson.loads(line)["t"] > fresh_ended
        ]
        assert late == []
        check_once(sim, run_dir, max_unknown=4 * 10)
    sessions = RunDir(run_dir / "shards" / f"{shard}-of-2").load_sessions()
    assert any(s.get("code") == "LeaseLost" for s in sessions), sessions
    events = shard_claims(run_dir)[shard]
    assert [str(e["owner"]).split("/")[1] for e in events] == [str(stale.pid), str(fresh.pid)]
    assert int(str(events[1]["epoch"])) > int(str(events[0]["epoch"]))


@pytest.mark.slow
def test_redis_restarted_empty_mid_shard_the_worker_stops_then_goes_on(tmp_path: Path) -> None:
    with redis_server() as server, simulator(tmp_path, "--latency-ms", "30") as sim:
        campaign = make_run(tmp_path, sim.url)
        run_dir = tmp_path / "run"
        proc = worker(campaign, server.url, run_dir, 2)
        wait_for("a claim", lambda: owned_by(server.url, proc.pid) is not None)
        shard = owned_by(server.url, proc.pid)
        shard_run = RunDir(run_dir / "shards" / f"{shard}-of-2")
        wait_for("its first sends", lambda: ledger_lines(shard_run.ledger) >= 50)
        server.kill()
        killed_at = time.time()
        wait_for(
            "the shard to stop on its lease",
            lambda: any(s.get("code") == "LeaseLost" for s in shard_run.load_sessions()),
            timeout=LEASE_TTL * 4,
        )
        restarted_at = time.time()
        server.start()  # empty: the worker registers the run again and finishes it
        code, err = finish(proc)
        (peak,) = httpx.get(sim.url + "/__stats", timeout=5).json()["peak_1s"].values()
        sim.stop()
        assert peak["requests"] <= 50, peak  # the limiter's state was lost too: its quiet span held
        assert code in (0, 3), err
        assert "lease lost" in err
        # Nothing sent from one lease ttl after Redis went away until it was back.
        receipts = [orjson.loads(line)["t"] for line in sim.receipts.read_bytes().splitlines()]
        assert not [t for t in receipts if killed_at + LEASE_TTL < t < restarted_at]
        check_once(sim, run_dir, max_unknown=4 * 10)


def test_the_parent_run_pins_the_campaign_and_its_shards(tmp_path: Path) -> None:
    import dataclasses

    from pipeline.app.campaign import load_campaign
    from pipeline.errors import CampaignError
    from pipeline.scale.worker import prepare_run, shard_campaign

    campaign = load_campaign(make_run(tmp_path, "http://127.0.0.1:9", rows=10))
    run_dir = tmp_path / "run"
    with pytest.raises(CampaignError, match="new run"):
        prepare_run(campaign, run_dir, None)
    doc, shards = prepare_run(campaign, run_dir, 3)
    assert shards == 3 and doc["shards"] == 3 and RunDir(run_dir).load()["run_id"] == doc["run_id"]
    again, shards = prepare_run(campaign, run_dir, None)  # a later worker: read, not created anew
    assert shards == 3 and again["run_id"] == doc["run_id"]
    with pytest.raises(CampaignError, match="in 3 shards, not 4"):
        prepare_run(campaign, run_dir, 4)
    with pytest.raises(CampaignError, match=r"source\.shard"):
        prepare_run(shard_campaign(campaign, 1, 2), run_dir, 3)
    other = dataclasses.replace(campaign, message=dataclasses.replace(campaign.message, sign_name="Other"))
    with pytest.raises(RunDirError, match="different campaign"):
        prepare_run(other, run_dir, 3)


@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_gives_its_shard_back(tmp_path: Path, isolated_redis: str) -> None:
    with simulator(tmp_path, "--latency-ms", "30") as sim:
        campaign = make_run(tmp_path, sim.url)
        run_dir = tmp_path / "run"
        first = worker(campaign, isolated_redis, run_dir, 2)
        wait_for("a claim", lambda: owned_by(isolated_redis, first.pid) is not None)
        shard = owned_by(isolated_redis, first.pid)
        ledger = run_dir / "shards" / f"{shard}-of-2" / "ledger.jsonl"
        wait_for("its first sends", lambda: ledger_lines(ledger) >= 50)
        first.send_signal(signal.SIGTERM)
        code, err = finish(first)
        assert code == 143, err
        assert "interrupted" in err
        client = redis.Redis.from_url(isolated_redis)
        try:  # given back: free at once, not after its lease
            (leases,) = list(client.scan_iter("sluice:claims:*:leases"))
            assert client.zscore(leases, str(shard)) == 0
        finally:
            client.close()
        second = worker(campaign, isolated_redis, run_dir, 2)
        code, err = finish(second)
        sim.stop()
        assert code == 0, err
        check_once(sim, run_dir, max_unknown=0)
    assert done_shards(isolated_redis) == 2
