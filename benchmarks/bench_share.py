"""At a limit: how much of a provider account's ``requests_per_second`` the shards use, and that
no sliding second at the provider holds more, measured at the simulator::

    .venv/bin/python -m benchmarks.bench_share [--limit 1000] [--seconds 15] [--rounds 3]
        [--batch 10] [--concurrency 32] [--max-wait-quiet 10] [--workdir DIR]

Each run gets a fresh simulator process (``python -m providers.simulator --qps 0 --latency-ms 5``,
Aliyun SendBatchSms, every request's signature checked) and a campaign of ``limit × batch ×
seconds`` distinct recipients (about ``--seconds`` at the limit) with ``requests_per_second =
limit``, batches of ``--batch`` and ``--concurrency`` in flight per process, so the limiter, not
the latency, holds the senders back. The clients, in an order that rotates each round:

* ``workers-2``: ``sluice run CAMPAIGN --workers 2`` (the parent hosts the lease limiter);
* ``worker-x2``: two ``sluice worker CAMPAIGN --coordinator redis://… --shards 4`` on a fresh
  ``redis-server`` (127.0.0.1, a free port), pacing with the lease limiter on that Redis;
* ``run``: one ``sluice run CAMPAIGN``, its own in-process pacer (``pipeline/limit.py``, 99 % of
  the rate by design): the peer the shards are compared with.

Per run, from the simulator: the busiest sliding second (``peak_1s`` of ``/__stats``, and the
same computed from the receipts' times as a check): **it must be ≤ limit, else the benchmark
fails**; the steady rate, the accepted requests between 2 s after the first and 1 s before the
last accepted request divided by that span, as a % of the limit; every recipient accepted
exactly once (else it fails). Beside them, the busiest second by the send times (each request's
ledger intent line) and the delay from send to acceptance: the lease limiter's bound holds at the
provider while that trip stays within its jitter allowance (10 ms). For the sharded clients,
the lease counts each shard logs (``lease_counts`` in its ``log.jsonl``: leases, refused, tokens
granted, used, dropped unused). CPU of the other processes on the machine meanwhile
(``ForeignLoad``). The figures are written, then the benchmark exits 1 if any run's busiest
second went over the limit. Each run is bounded (``RUN_TIMEOUT``); medians over rounds.
JSON: ``benchmarks/results/share.json``.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_lease import redis_server
from benchmarks.common import (
    REPO,
    SIGN_NAME,
    TEMPLATE_CODE,
    TEST_ENV,
    BenchError,
    ForeignLoad,
    machine_info,
    markdown_table,
    median,
    wait_quiet,
    write_csv,
    write_json,
)
from pipeline.scale.lease import LeaseConfig

__all__ = ("main",)

CLIENTS = ("workers-2", "worker-x2", "run")
WORKER_SHARDS = 4
LATENCY_MS = 5
RUN_TIMEOUT = 120.0  # s: no run takes longer, whatever the figures
STEADY_FROM, STEADY_TO = 2.0, 1.0  # s after the first / before the last accepted request
_TICKS = os.sysconf("SC_CLK_TCK")


def campaign_toml(csv_path: Path, endpoint: str, *, limit: int, batch: int, concurrency: int) -> str:
    return (
        f'[source]\nkind = "csv"\npath = "{csv_path}"\nphone = "phone"\n\n'
        f'[provider]\nkind = "aliyun"\nendpoint = "{endpoint}"\nsignature = "v3"\n\n'
        f'[message]\ntemplate_code = "{TEMPLATE_CODE}"\nsign_name = "{SIGN_NAME}"\n'
        'params = { name = "{name}", code = "{code}" }\n\n'
        f"[limits]\nrequests_per_second = {limit}\nconcurrency = {concurrency}\nbatch_size = {batch}\n"
    )


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Simulator:
    def __init__(self, work: Path) -> None:
        self.receipts = work / "receipts.jsonl"
        self.receipts.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "providers.simulator", "--port", "0", "--qps", "0",
               "--latency-ms", str(LATENCY_MS), "--receipts", str(self.receipts)]  # fmt: skip
        with (work / "simulator.err").open("wb") as err:  # its final counters: /__stats has them
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise BenchError(f"the simulator did not start: {self.url!r}")

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(self.url + "/__stats", timeout=10).json()
        return answer

    def stop(self) -> None:
        """SIGTERM: it closes and fsyncs the receipts file."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def simulator(work: Path) -> Iterator[Simulator]:
    sim = Simulator(work)
    try:
        yield sim
    finally:
        sim.stop()


def read_receipts(path: Path) -> tuple[list[float], Counter[str]]:
    """(each accepted request's time, sorted; phone → times accepted) from the receipts file,
    one line per recipient, the recipients of one request sharing its ``out_id`` and ``t``."""
    requests: set[tuple[float, str]] = set()
    phones: Counter[str] = Counter()
    with path.open("rb") as f:
        for line in f:
            record = orjson.loads(line)
            requests.add((record["t"], record["out_id"]))
            phones[record["phone"]] += 1
    return sorted(t for t, _ in requests), phones


def busiest_second(times: list[float]) -> int:
    """The most of ``times`` (sorted) in any window [t, t + 1 s): it starts at one of them."""
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def steady_rate(times: list[float]) -> tuple[float, float]:
    """(requests/s, span in s) between STEADY_FROM after the first and STEADY_TO before the last."""
    lo, hi = times[0] + STEADY_FROM, times[-1] - STEADY_TO
    if hi <= lo:
        raise BenchError(f"the run lasted {times[-1] - times[0]:.1f} s: too short for a steady part")
    inside = bisect.bisect_left(times, hi) - bisect.bisect_left(times, lo)
    return inside / (hi - lo), hi - lo


def sender_times(receipts: Path, run_dir: Path) -> tuple[list[float], dict[str, float]]:
    """When each request was sent (its ledger intent line's wall time, written after the limiter
    let it go; to the ms, so a second of them may hold a request or two more than exactly), and
    the delay from there to the simulator accepting it (its receipt's time): p50, p99, max ms."""
    accepted = {}
    with receipts.open("rb") as f:
        for line in f:
            record = orjson.loads(line)
            accepted[record["out_id"]] = record["t"]
    sent = {}
    for ledger in run_dir.glob("**/ledger.jsonl"):
        for line in ledger.read_bytes().splitlines():
            if line.startswith(b'{"i":'):
                intent = orjson.loads(line)
                sent[intent["o"]] = intent["t"]
    delays = sorted(t - sent[o] for o, t in accepted.items() if o in sent)
    if len(delays) != len(accepted):
        raise BenchError(f"{len(accepted) - len(delays)} accepted requests have no intent line in {run_dir}")
    n = len(delays)
    figures = {"p50": delays[n // 2], "p99": delays[int(n * 0.99)], "max": delays[-1]}
    return sorted(sent.values()), {k: round(v * 1000, 1) for k, v in figures.items()}


def lease_counts(run_dir: Path) -> list[dict[str, int]]:
    """Each shard's ``lease_counts`` log events (one per shard session)."""
    found = []
    for log in sorted(run_dir.glob("shards/*/log.jsonl")):
        for line in log.read_bytes().splitlines():
            if b'"lease_counts"' in line:
                event = orjson.loads(line)
                found.append({k: int(event[k]) for k in ("leases", "refused", "tokens", "used", "dropped")})
    return found


def _wait_all(procs: list[subprocess.Popen[bytes]], deadline: float, name: str) -> float:
    """Wait for every process (bounded by ``deadline``); return their CPU seconds (wait4)."""
    cpu = 0.0
    for proc in procs:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu += ru.ru_utime + ru.ru_stime
                break
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise BenchError(f"{name} ran past {RUN_TIMEOUT:g} s")
            time.sleep(0.01)
    return cpu


def measure(name: str, work: Path, csv_path: Path, distinct: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of one client against a fresh simulator; checks it; returns its figures."""
    quiet = wait_quiet(args.max_wait_quiet) if args.max_wait_quiet > 0 else None
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, **TEST_ENV}
    with simulator(work) as sim, tempfile.TemporaryDirectory(prefix="bench-share-redis-") as redis_tmp:
        toml = work / "campaign.toml"
        toml.write_text(
            campaign_toml(csv_path, sim.url, limit=args.limit, batch=args.batch, concurrency=args.concurrency)
        )
        sluice = [sys.executable, "-m", "pipeline.app.cli"]
        out = work / f"{name}.out"
        sim_cpu0 = sim.stats()["cpu_s"]  # its start-up is not the run's
        foreign = ForeignLoad()
        with out.open("wb") as log, _redis_for(name, Path(redis_tmp)) as redis_url:
            redis_cpu0 = _proc_cpu_s(redis_url[1]) if redis_url else 0.0
            if name == "workers-2":
                cmds = [[*sluice, "run", str(toml), "--run-dir", str(run_dir), "--workers", "2"]]
            elif name == "worker-x2":
                assert redis_url is not None
                worker = [*sluice, "worker", str(toml), "--coordinator", redis_url[0],
                          "--run-dir", str(run_dir), "--shards", str(WORKER_SHARDS)]  # fmt: skip
                cmds = [worker, worker]
            else:
                cmds = [[*sluice, "run", str(toml), "--run-dir", str(run_dir)]]
            t0 = time.monotonic()
            procs = [
                subprocess.Popen(c, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) for c in cmds
            ]
            cpu = _wait_all(procs, t0 + RUN_TIMEOUT, name)
            wall = time.monotonic() - t0
            redis_cpu = _proc_cpu_s(redis_url[1]) - redis_cpu0 if redis_url else 0.0
        if any(p.returncode != 0 for p in procs):
            codes = [p.returncode for p in procs]
            raise BenchError(f"{name} exited {codes}:\n{out.read_text(errors='replace')[-3000:]}")
        stats = sim.stats()
        sim.stop()
    sim_cpu = stats["cpu_s"] - sim_cpu0
    own_cpu = cpu + sim_cpu + redis_cpu
    times, phones = read_receipts(sim.receipts)
    if len(phones) != distinct or max(phones.values()) != 1:
        twice = sum(1 for n in phones.values() if n > 1)
        raise BenchError(f"{name}: {len(phones)} of {distinct} recipients accepted, {twice} more than once")
    peaks = stats["peak_1s"]
    if len(peaks) != 1:
        raise BenchError(f"{name}: the simulator saw {len(peaks)} accounts, not one")
    (peak,) = peaks.values()
    rate, span = steady_rate(times)
    sent, delays = sender_times(sim.receipts, run_dir)
    return {
        "client": name,
        "peak_1s_requests": peak["requests"],
        "peak_1s_from_receipts": busiest_second(times),
        "peak_1s_at_sender": busiest_second(sent),
        "delay_ms": delays,
        "steady_rate": round(rate, 1),
        "steady_share": round(rate / args.limit, 4),
        "steady_span_s": round(span, 2),
        "first_to_last_s": round(times[-1] - times[0], 2),
        "requests": len(times),
        "recipients": len(phones),
        "wall_s": round(wall, 2),
        "clients_cpu_s": round(cpu, 2),
        "simulator_cpu_s": round(sim_cpu, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "foreign_load_cores": round(foreign.cores(own_cpu), 3),
        "lease_counts": lease_counts(run_dir),
        "quiet": quiet,
    }


@contextmanager
def _redis_for(name: str, tmp: Path) -> Iterator[tuple[str, int] | None]:
    """A fresh redis-server for the ``worker-x2`` client: (its URL, its pid); None for the others."""
    if name != "worker-x2":
        yield None
        return
    with redis_server(tmp) as url:
        pid = _redis_pid(url)
        yield url, pid


def _redis_pid(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info: dict[str, Any] = client.info("server")
        return int(info["process_id"])
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000, help="requests_per_second of the account")
    p.add_argument("--seconds", type=float, default=15.0, help="about how long each run lasts at the limit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=32, help="in flight per process")
    p.add_argument("--max-wait-quiet", type=float, default=10.0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 10 or not 5 <= args.seconds <= 60:
        p.error("--rounds must be 1..10 and --seconds 5..60 (every run is bounded)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-share-"))
    work.mkdir(parents=True, exist_ok=True)
    distinct = int(args.limit * args.batch * args.seconds)
    csv_path = write_csv(work / f"recipients-{distinct}.csv", distinct)
    runs: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        order = CLIENTS[round_no % len(CLIENTS) :] + CLIENTS[: round_no % len(CLIENTS)]
        for name in order:
            r = measure(name, work, csv_path, distinct, args)
            r["round"] = round_no
            r["over_limit"] = r["peak_1s_requests"] > args.limit or r["peak_1s_from_receipts"] > args.limit
            runs.append(r)
            dropped = sum(c["dropped"] for c in r["lease_counts"])
            granted = sum(c["tokens"] for c in r["lease_counts"])
            print(
                f"round {round_no} {name}: busiest second {r['peak_1s_requests']} (receipts "
                f"{r['peak_1s_from_receipts']}, at the sender {r['peak_1s_at_sender']}), "
                f"sent→accepted p99 {r['delay_ms']['p99']} ms max {r['delay_ms']['max']} ms, "
                f"steady {r['steady_rate']:.1f}/s = {r['steady_share']:.1%}, "
                f"{dropped} of {granted} leased tokens dropped, others {r['foreign_load_cores']:.2f} cores",
                flush=True,
            )
    ceiling = LeaseConfig(args.limit).ceiling
    summary: dict[str, Any] = {}
    for name in CLIENTS:
        mine = [r for r in runs if r["client"] == name]
        summary[name] = {
            "peak_1s_max": max(r["peak_1s_requests"] for r in mine),
            "peak_1s_rounds": [r["peak_1s_requests"] for r in mine],
            "peak_1s_at_sender_max": max(r["peak_1s_at_sender"] for r in mine),
            "runs_over_limit": sum(r["over_limit"] for r in mine),
            "delay_p99_ms_median": median([r["delay_ms"]["p99"] for r in mine]),
            "delay_max_ms_max": max(r["delay_ms"]["max"] for r in mine),
            "steady_rate_median": median([r["steady_rate"] for r in mine]),
            "steady_share_median": median([r["steady_share"] for r in mine]),
            "steady_share_rounds": [r["steady_share"] for r in mine],
            "foreign_load_cores_median": median([r["foreign_load_cores"] for r in mine]),
        }
    command = "python -m benchmarks.bench_share " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "benchmark": "share",
        "command": command.strip(),
        "machine": machine_info(),
        "limit": args.limit,
        "lease_ceiling": round(ceiling, 1),
        "batch": args.batch,
        "concurrency": args.concurrency,
        "recipients": distinct,
        "simulator_latency_ms": LATENCY_MS,
        "summary": summary,
        "runs": runs,
    }
    path = write_json("share.json", result)
    rows = [
        [
            name,
            " / ".join(str(x) for x in s["peak_1s_rounds"]),
            s["peak_1s_at_sender_max"],
            f"{s['delay_p99_ms_median']:.1f} / {s['delay_max_ms_max']:.1f}",
            f"{s['steady_rate_median']:.1f}",
            f"{s['steady_share_median']:.1%}",
            ", ".join(f"{x:.1%}" for x in s["steady_share_rounds"]),
            f"{s['foreign_load_cores_median']:.2f}",
        ]
        for name, s in summary.items()
    ]
    headers = ["client", "busiest second at the simulator (rounds)", "at the sender (max)",
               "sent→accepted ms p99 (median) / max", "steady req/s (median)", "% of limit", "rounds",
               "others' cores"]  # fmt: skip
    print(markdown_table(headers, rows))
    print(f"limit {args.limit}/s; the lease limiter's ceiling limit/S = {ceiling:.1f}/s")
    print(f"figures: {path}")
    over = [f"round {r['round']} {r['client']}: {r['peak_1s_requests']}" for r in runs if r["over_limit"]]
    if over:
        print(f"FAILED: a sliding second at the simulator held more than {args.limit}: {'; '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
