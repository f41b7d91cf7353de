"""Rate fidelity: sluice configured at R requests/s against the simulator enforcing R per second.

::

    .venv/bin/python -m benchmarks.bench_rate [--rates 50,200,1000] [--seconds 10] [--batch 100]
        [--latency-ms 50] [--concurrency 128] [--full-simulator] [--no-pin]

For each R: starts ``python -m providers.simulator --qps R --latency-ms 50 --port 0 --minimal``
(its own process, pinned to the last core; ``--minimal`` keeps the rate windows and the
latency but skips the signature, timestamp and nonce checks so that the simulator is
never the bottleneck; ``--full-simulator`` keeps them), writes a CSV of
``R × seconds × batch`` recipients (about ``seconds`` of sending at R), and runs sluice
(``pipeline.app.api.start_run``, ``requests_per_second = R``) in a child pinned to core 0.

Reported per R, from the ledger: requests per second over the steady part (every intent
line's ``t`` between one second after the first and one second before the last), as a
fraction of R; the most requests in any sliding one-second window; the throttles received
(attempt lines with ``"c":"Throttling…"``) and the simulator's own throttle count
(``GET /__stats``); sluice's CPU use; the simulator's CPU per request (from
``/proc/PID/stat``). Every run must deliver every recipient. JSON:
``benchmarks/results/rate.json``. Every run is bounded: at most 2 000 000 recipients and
a child time limit of ``max(120, 6 × seconds)`` seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    TEST_ENV,
    BenchError,
    ForeignLoad,
    machine_info,
    markdown_table,
    run_child,
    wait_quiet,
    write_csv,
    write_json,
)

__all__ = ("analyze_ledger", "main", "proc_cpu_s")

GOAL_FRACTION = 0.98
MAX_RECIPIENTS = 2_000_000
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """user+sys CPU seconds of a live process, from ``/proc/PID/stat`` (clock-tick resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


_NO_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; "
    "from providers.simulator.__main__ import main; sys.exit(main())"
)


def _start_simulator(args: list[str], core: int | None) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise BenchError(f"the simulator did not start: {url!r} {proc.communicate()[1].decode()[-2000:]}")
    if core is not None:
        os.sched_setaffinity(proc.pid, {core})
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    lines = err.decode().strip().splitlines()
    try:
        final: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {"stderr_tail": "\n".join(lines[-5:])}
    return final


@contextmanager
def simulator(rate: int, latency_ms: float, *, minimal: bool, core: int | None) -> Iterator[dict[str, Any]]:
    """The project's simulator on 127.0.0.1, port 0, in its own process.

    It runs on uvloop when installed; if that build does not answer a ``GET /__stats``
    (a simulator bug, not a benchmark choice), it is restarted on the default asyncio loop
    and ``loop`` in the returned info says so.
    """
    opts = ["--qps", str(rate), "--latency-ms", str(latency_ms), "--port", "0", "--host", "127.0.0.1"]
    if minimal:
        opts.append("--minimal")
    proc, url = _start_simulator(["-m", "providers.simulator", *opts], core)
    info: dict[str, Any] = {
        "url": url,
        "pid": proc.pid,
        "args": opts,
        "loop": "default (uvloop if installed)",
    }
    try:
        _get_json(url + "/__stats", timeout=3)
    except OSError as exc:
        info["uvloop_failure"] = (_stop(proc) or {}).get("stderr_tail") or repr(exc)
        proc, url = _start_simulator(["-c", _NO_UVLOOP, *opts], core)
        info.update(url=url, pid=proc.pid, loop="asyncio (uvloop blocked: the simulator failed on it)")
    try:
        yield info
    finally:
        info["final"] = _stop(proc)


def _get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
        data: dict[str, Any] = json.loads(resp.read())
    return data


def analyze_ledger(path: Path) -> dict[str, Any]:
    """Request times (intent ``t``) and throttles from a ledger."""
    times: list[float] = []
    throttles = 0
    with path.open("rb") as f:
        for line in f:
            if line.startswith(b'{"i":'):
                times.append(json.loads(line)["t"])
            elif line.startswith(b'{"b":') and b'"c":"Throttling' in line:
                throttles += 1
    times.sort()
    out: dict[str, Any] = {"requests": len(times), "throttles": throttles}
    if len(times) < 2:
        return out
    first, last = times[0], times[-1]
    out["span_s"] = last - first
    lo, hi = first + 1.0, last - 1.0
    if hi - lo >= 1.0:
        steady = sum(1 for t in times if lo <= t < hi)
        out["steady_s"] = hi - lo
        out["steady_requests_per_s"] = steady / (hi - lo)
    else:
        out["steady_s"] = out["span_s"]
        out["steady_requests_per_s"] = (len(times) - 1) / out["span_s"] if out["span_s"] else math.nan
    # The most intents in any sliding one-second window (timestamps have ms resolution).
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    out["max_requests_in_1s"] = best
    return out


def _pin(core: int | None) -> Callable[[], None] | None:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def run_rate(
    rate: int,
    *,
    seconds: float,
    batch: int,
    latency_ms: float,
    concurrency: int,
    minimal: bool,
    loop: str,
    max_wait_quiet: float,
    work: Path,
    client_core: int | None,
    server_core: int | None,
) -> dict[str, Any]:
    n = min(MAX_RECIPIENTS, max(batch, round(rate * seconds) * batch))
    csv_path = write_csv(work / f"rate-{rate}-{n}.csv", n)
    run_dir = work / f"run-rate-{rate}"
    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    with simulator(rate, latency_ms, minimal=minimal, core=server_core) as sim:
        cpu0 = proc_cpu_s(sim["pid"])
        foreign = ForeignLoad()
        out = run_child(
            [
                "-m", "benchmarks.run_sluice", "run", "--csv", str(csv_path), "--url", sim["url"],
                "--run-dir", str(run_dir), "--rate", str(rate), "--concurrency", str(concurrency),
                "--batch", str(batch), "--loop", loop,
            ],
            env=TEST_ENV,
            timeout=max(120.0, 6 * seconds),
            preexec=_pin(client_core),
        )  # fmt: skip
        sim_cpu = proc_cpu_s(sim["pid"]) - cpu0
        foreign_cores = foreign.cores(out["process_cpu_s"] + sim_cpu)
        stats = _get_json(sim["url"] + "/__stats")
    if out["counts"]["sent"] != n or not out["complete"]:
        raise BenchError(
            f"R={rate}: {n} recipients, sluice reports {out['counts']} complete={out['complete']}"
        )
    if stats.get("accepted_recipients", n) != n:
        raise BenchError(f"R={rate}: the simulator accepted {stats.get('accepted_recipients')} of {n}")
    led = analyze_ledger(run_dir / "ledger.jsonl")
    achieved = led.get("steady_requests_per_s", math.nan)
    return {
        "rate": rate,
        "recipients": n,
        "batch": batch,
        "concurrency": concurrency,
        "wall_s": out["wall_s"],
        "requests": led["requests"],
        "steady_s": led.get("steady_s"),
        "steady_requests_per_s": achieved,
        "fraction_of_rate": achieved / rate,
        "max_requests_in_1s": led.get("max_requests_in_1s"),
        "throttles_ledger": led["throttles"],
        "throttles_simulator": stats.get("throttled"),
        "sluice_throttles_seen": out["throttles"],
        "sluice_cpu_s": out["cpu_s"],
        "sluice_cpu_utilisation": out["cpu_s"] / out["wall_s"],
        "sluice_cpu_us_per_recipient": out["cpu_s"] * 1e6 / n,
        "sluice_peak_rss_mib": out["peak_rss_mib"],
        "sluice_loop": out["loop"],
        "simulator_requests": stats.get("requests"),
        "simulator_cpu_s": sim_cpu,
        "simulator_cpu_us_per_request": sim_cpu * 1e6 / stats["requests"] if stats.get("requests") else None,
        "foreign_load_cores": round(foreign_cores, 3),
        "quiet_wait": quiet,
        "simulator_args": sim["args"],
        "simulator_loop": sim["loop"],
        "simulator_uvloop_failure": sim.get("uvloop_failure"),
        "met": achieved / rate >= GOAL_FRACTION and led["throttles"] == 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_rate", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="50,200,1000", help="comma-separated requests/s")
    p.add_argument("--seconds", type=float, default=10.0, help="about this long at each rate")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=128, help="limits.concurrency of the sluice runs")
    p.add_argument("--full-simulator", action="store_true", help="keep signature/time/nonce checks on")
    p.add_argument(
        "--sluice-loop", choices=("uvloop", "asyncio"), default="uvloop", help="sluice's event loop"
    )
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--max-wait-quiet", type=float, default=30.0, help="wait up to N s for others to go quiet")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", default="rate.json", help="file name under benchmarks/results/")
    args = p.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r]
    if not rates or any(not 1 <= r <= 100_000 for r in rates) or not 1 <= args.seconds <= 120:
        p.error("rates must be 1..100000 and --seconds 1..120")
    if not 1 <= args.batch <= 100:
        p.error("--batch must be 1..100")
    cores = os.sched_getaffinity(0)
    pin = not args.no_pin and len(cores) >= 2
    client_core = min(cores) if pin else None
    server_core = max(cores) if pin else None

    results = []
    with tempfile.TemporaryDirectory(prefix="sluice-rate-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for rate in rates:
            r = run_rate(
                rate,
                seconds=args.seconds,
                batch=args.batch,
                latency_ms=args.latency_ms,
                concurrency=args.concurrency,
                minimal=not args.full_simulator,
                loop=args.sluice_loop,
                max_wait_quiet=args.max_wait_quiet,
                work=work,
                client_core=client_core,
                server_core=server_core,
            )
            results.append(r)
            print(
                f"R={rate}: {r['steady_requests_per_s']:.1f} requests/s steady "
                f"({100 * r['fraction_of_rate']:.1f} %), {r['throttles_ledger']} throttles; "
                f"others used {r['foreign_load_cores']:.2f} cores",
                file=sys.stderr,
            )
    doc = {
        "benchmark": "rate",
        "command": "python -m benchmarks.bench_rate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "goal": {"fraction_of_rate": f">= {GOAL_FRACTION}", "throttles": 0},
        "latency_ms": args.latency_ms,
        "simulator_mode": "full" if args.full_simulator else "minimal",
        "results": results,
    }
    path = write_json(args.out, doc)
    print(
        markdown_table(
            [
                "R (req/s)",
                "recipients",
                "steady req/s",
                "% of R",
                "max in 1 s",
                "throttles (ledger/sim)",
                "sluice CPU use",
                "simulator CPU µs/request",
                "goal met",
            ],
            [
                [
                    r["rate"],
                    r["recipients"],
                    r["steady_requests_per_s"],
                    f"{100 * r['fraction_of_rate']:.1f} %",
                    r["max_requests_in_1s"],
                    f"{r['throttles_ledger']}/{r['throttles_simulator']}",
                    f"{100 * r['sluice_cpu_utilisation']:.0f} %",
                    r["simulator_cpu_us_per_request"],
                    "yes" if r["met"] else "NO",
                ]
                for r in results
            ],
        )
    )
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
