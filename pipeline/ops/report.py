"""``sluice report``: a self-contained HTML page and PNG charts of a run.

Series, read from the ledger in one pass (memory: one entry per batch):

* recipients settled per second (sent, failed, unknown, deferred);
* recipients by final outcome and provider code (each row once: these add up to the rows read);
* request latency per batch: p50 / p90 / p99 per time bucket;
* retries, throttles and splits (calls refused because of some recipients) per second;
  throttles are the attempts the ledger says ``throttled`` (format 2: format-1 ledgers
  wrote them as ``retry``), and are counted in the retries too.

``report.json`` holds the same series for scripts and tests.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from pipeline.app.rundir import RunDir
from pipeline.ledger import Attempt, Intent, events
from pipeline.ops.receipts import delivery_report
from pipeline.ops.summary import summarize

__all__ = ("build_report", "collect_series")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def collect_series(ledger: Path, *, latency_buckets: int = 60) -> dict[str, Any]:
    """Per-second settled recipients, retries and throttles; latency percentiles over time."""
    rows_in_batch: dict[int, int] = {}
    settled: dict[str, Counter[int]] = defaultdict(Counter)
    retries: Counter[int] = Counter()
    throttles: Counter[int] = Counter()
    splits: Counter[int] = Counter()
    latencies: list[tuple[float, float]] = []
    for event in events(ledger, recipients=False):
        if isinstance(event, Intent):
            rows_in_batch[event.batch] = len(event.rows)
        elif isinstance(event, Attempt) and event.time is not None:
            second = int(event.time)
            if event.status in ("retry", "throttled"):  # sent again: a throttle is a retry too
                retries[second] += 1
                throttles[second] += event.status == "throttled"
            elif event.status == "split":  # nothing settled: its parts are batches of their own
                splits[second] += 1
            else:
                settled[event.status][second] += rows_in_batch.get(event.batch, 0)
            if event.ms and event.status != "deferred":
                latencies.append((event.time, event.ms))
    seconds = sorted({s for c in (*settled.values(), retries, splits) for s in c})
    start = seconds[0] if seconds else 0
    span = range(start, seconds[-1] + 1) if seconds else range(0)
    out: dict[str, Any] = {
        "start": start,
        "seconds": [s - start for s in span],
        "settled_per_second": {k: [c.get(s, 0) for s in span] for k, c in sorted(settled.items())},
        "retries_per_second": [retries.get(s, 0) for s in span],
        "throttles_per_second": [throttles.get(s, 0) for s in span],
        "splits_per_second": [splits.get(s, 0) for s in span],
        "latency_ms": {"t": [], "p50": [], "p90": [], "p99": []},
    }
    if latencies:
        latencies.sort()
        t0, t1 = latencies[0][0], latencies[-1][0]
        width = max((t1 - t0) / latency_buckets, 1.0)
        buckets: dict[int, list[float]] = defaultdict(list)
        for t, ms in latencies:
            buckets[int((t - t0) / width)].append(ms)
        lat = out["latency_ms"]
        for b in sorted(buckets):
            lat["t"].append(round(b * width + t0 - start, 3))
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                lat[name].append(_percentile(buckets[b], q))
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _charts(series: dict[str, Any], codes: dict[str, int]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: dict[str, bytes] = {}
    x = series["seconds"]

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, values in series["settled_per_second"].items():
        ax.plot(x, values, label=name, linewidth=1.2)
    ax.set(title="recipients settled per second", xlabel="seconds since first send", ylabel="recipients/s")
    ax.legend(loc="upper right", fontsize=8)
    charts["sends_per_second.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(codes) + 1)))
    labels = list(codes) or ["(none)"]
    ax.barh(labels, [codes.get(k, 0) for k in labels], color="#4477aa")
    ax.set(title="recipients by final outcome and code", xlabel="recipients")
    ax.invert_yaxis()
    charts["outcomes.png"] = _png(fig)
    plt.close(fig)

    lat = series["latency_ms"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name in ("p50", "p90", "p99"):
        ax.plot(lat["t"], lat[name], label=name, linewidth=1.2)
    ax.set(title="request latency per batch", xlabel="seconds since first send", ylabel="ms")
    ax.legend(loc="upper right", fontsize=8)
    charts["latency.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(x, series["retries_per_second"], label="retries", linewidth=1.2)
    ax.plot(x, series["throttles_per_second"], label="throttles", linewidth=1.2)
    ax.plot(x, series["splits_per_second"], label="splits", linewidth=1.2)
    ax.set(
        title="retries, throttles and splits per second",
        xlabel="seconds since first send",
        ylabel="requests/s",
    )
    ax.legend(loc="upper right", fontsize=8)
    charts["retries.png"] = _png(fig)
    plt.close(fig)
    return charts


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html``, the PNG charts and ``report.json``; return the HTML path."""
    rd = RunDir(run_dir)
    rd.load()
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    summary = summarize(run_dir)
    series = collect_series(rd.ledger)
    charts = _charts(series, summary["outcomes"])
    delivery, delivery_charts = delivery_report(run_dir, summary["sent"])
    summary.update(delivery)
    charts.update(delivery_charts)
    for name, data in charts.items():
        (out / name).write_bytes(data)
    (out / "report.json").write_bytes(
        orjson.dumps({"summary": summary, "series": series}, option=orjson.OPT_INDENT_2)
    )
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, dict)
    )
    images = "".join(
        f"<h2>{html.escape(name[:-4].replace('_', ' '))}</h2>"
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in charts.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>sluice run {html.escape(str(run_dir))}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td{padding:.2em 1em;border-bottom:1px solid #ddd}img{max-width:100%}</style></head><body>"
        f"<h1>sluice run {html.escape(str(run_dir))}</h1><table>{rows}</table>{images}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
