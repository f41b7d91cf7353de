"""Shared benchmark plumbing: the responder process, synthetic recipients, child processes, reports."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = (
    "REPO",
    "RESULTS",
    "SIGN_NAME",
    "TEMPLATE_CODE",
    "TEST_ENV",
    "BenchError",
    "ForeignLoad",
    "Responder",
    "campaign_data",
    "child_result",
    "compile_bytecode",
    "git_state",
    "machine_busy_s",
    "machine_info",
    "markdown_table",
    "median",
    "params_of",
    "peak_rss_mib",
    "phone_of",
    "responder",
    "run_child",
    "wait_quiet",
    "write_csv",
    "write_json",
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TEMPLATE_CODE = "SMS_154950909"
SIGN_NAME = "Acme"
TEST_ENV = {"ALIYUN_ACCESS_KEY_ID": "testid", "ALIYUN_ACCESS_KEY_SECRET": "testsecret"}
CHILD_TIMEOUT = 1800.0  # seconds: no child runs longer, whatever the size


class BenchError(RuntimeError):
    """A benchmark did not do what it measured (lost recipients, a failed child...)."""


# -- the recipients every client sends: the same numbers and parameters -----------------
def phone_of(i: int) -> str:
    """Recipient ``i`` (1-based): a distinct mainland mobile number, as in the CSV."""
    return f"139{i:08d}"


def params_of(i: int) -> dict[str, str]:
    return {"name": f"n{i}", "code": f"{i % 1_000_000:06d}"}


def write_csv(path: Path, n: int) -> Path:
    """``phone,name,code`` for recipients 1..n (about 29 bytes a row; 10M rows ≈ 290 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", buffering=1 << 20) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["phone", "name", "code"])
        step = 100_000
        for lo in range(1, n + 1, step):
            w.writerows(
                (f"139{i:08d}", f"n{i}", f"{i % 1_000_000:06d}") for i in range(lo, min(n, lo + step - 1) + 1)
            )
    os.replace(tmp, path)
    return path


def campaign_data(
    csv_path: Path, endpoint: str, *, rate: float, concurrency: int, batch: int
) -> dict[str, Any]:
    """The campaign document every sluice run of the benchmarks uses."""
    return {
        "source": {"kind": "csv", "path": str(csv_path), "phone": "phone"},
        "provider": {"kind": "aliyun", "endpoint": endpoint, "signature": "v3"},
        "message": {
            "template_code": TEMPLATE_CODE,
            "sign_name": SIGN_NAME,
            "params": {"name": "{name}", "code": "{code}"},
        },
        "limits": {"requests_per_second": rate, "concurrency": concurrency, "batch_size": batch},
    }


# -- the responder --------------------------------------------------------------------
@dataclass
class Responder:
    url: str
    proc: subprocess.Popen[bytes]
    final: dict[str, Any] = field(default_factory=dict)

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:  # loopback only
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def stats(self) -> dict[str, Any]:
        return self._get("/__stats")

    def reset(self) -> dict[str, Any]:
        return self._get("/__reset")

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            _, err = self.proc.communicate(timeout=30)
            lines = err.decode().strip().splitlines()
            if lines:
                self.final = json.loads(lines[-1])
        return self.final


@contextmanager
def responder(*extra: str) -> Iterator[Responder]:
    """Start ``benchmarks.responder`` in its own process on 127.0.0.1; stop it on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.responder", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise BenchError(f"the responder did not start: {url!r} {proc.communicate()[1].decode()}")
    r = Responder(url, proc)
    try:
        yield r
    finally:
        if proc.poll() is None:
            try:
                r.stop()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- child processes ------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_result(**fields: Any) -> None:
    """A child's last stdout line: its figures as JSON, with its peak RSS and total CPU."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    fields.setdefault("peak_rss_mib", round(ru.ru_maxrss / 1024, 1))
    fields.setdefault("process_cpu_s", round(ru.ru_utime + ru.ru_stime, 4))
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def run_child(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = CHILD_TIMEOUT,
    preexec: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``python ARGS`` in the repo; return the JSON of its last stdout line, or raise BenchError.

    ``preexec`` runs in the child before Python starts (e.g. pinning it to a core).
    """
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            timeout=timeout,
            check=False,
            preexec_fn=preexec,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(args)} ran past {timeout} s") from exc
    out = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise BenchError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout.decode()[-2000:]}\n"
            f"{proc.stderr.decode()[-4000:]}"
        )
    result: dict[str, Any] = json.loads(out[-1])
    return result


# -- other people's load ----------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds spent busy by every process on the machine since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def wait_quiet(max_wait: float = 30.0, threshold: float = 0.15, window: float = 1.0) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) for a ``window`` in which the machine uses < ``threshold`` cores.

    The benchmarks share the machine with whatever else runs; a measurement taken while
    another process burns a core measures that process too. Returns the time waited and
    the load seen last (cores).
    """
    started = time.monotonic()
    load = math.nan
    while True:
        b0 = machine_busy_s()
        time.sleep(window)
        load = (machine_busy_s() - b0) / window
        waited = time.monotonic() - started
        if not load >= threshold or waited >= max_wait:  # nan: no /proc/stat, do not wait
            return {"waited_s": round(waited, 1), "load_cores": round(load, 3)}


class ForeignLoad:
    """CPU used by *other* processes while a measurement ran: machine busy time minus ours."""

    def __init__(self) -> None:
        self._b0 = machine_busy_s()
        self._t0 = time.monotonic()

    def cores(self, own_cpu_s: float) -> float:
        """Average cores used by others over the interval, given the CPU our processes used."""
        elapsed = time.monotonic() - self._t0
        other = machine_busy_s() - self._b0 - own_cpu_s
        return max(0.0, other) / elapsed if elapsed > 0 else math.nan


# -- reports ----------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def git_state() -> dict[str, Any]:
    """The commit measured, and the files of the engine that differ from it (others edit them)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "pipeline", "providers").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted": [line[3:] for line in dirty if len(line) > 3],
    }


def compile_bytecode() -> dict[str, Any]:
    """Byte-compile sluice's own modules, as ``pip install`` does for an installed package.

    An editable checkout under ``PYTHONDONTWRITEBYTECODE`` (this environment sets it) would
    otherwise compile every module from source in every process: ~0.15 s of CPU per start
    that no installed sluice pays. The peers' packages come from wheels, compiled at install.
    """
    import compileall

    ok = all(compileall.compile_dir(REPO / pkg, quiet=1) for pkg in ("pipeline", "providers"))
    return {"bytecode_compiled": ok, "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "git": git_state(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # nan
                return "–"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
