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
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.app.rundir import RunDir
from pipeline.ledger import Attempt, Event, Intent, events
from pipeline.ops.receipts import delivery_report
from pipeline.ops.summary import summarize
from pipeline.scale.shards import run_parts

__all__ = ("build_report", "chart_step", "collect_series")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _events(ledgers: Path | Sequence[Path]) -> Iterator[tuple[int, Event]]:
    """(which ledger, event) for the batch events of one ledger, or of a sharded run's ledgers
    one after the other (each numbers its batches from 1)."""
    for part, ledger in enumerate([ledgers] if isinstance(ledgers, Path) else ledgers):
        for event in events(ledger, recipients=False):
            yield part, event


def collect_series(
    ledger: Path | Sequence[Path], *, latency_buckets: int = 60, step: float = 1.0
) -> dict[str, Any]:
    """Settled recipients, retries and throttles per ``step`` seconds (counts per bucket, the
    bucket's start in ``seconds``); latency percentiles over time. Several ledgers (a sharded
    run's) add up."""
    rows_in_batch: dict[tuple[int, int], int] = {}  # (ledger, batch) → rows
    settled: dict[str, Counter[int]] = defaultdict(Counter)
    retries: Counter[int] = Counter()
    throttles: Counter[int] = Counter()
    splits: Counter[int] = Counter()
    latencies: list[tuple[float, float]] = []
    for part, event in _events(ledger):
        if isinstance(event, Intent):
            rows_in_batch[part, event.batch] = len(event.rows)
        elif isinstance(event, Attempt) and event.time is not None:
            second = math.floor(event.time / step)
            if event.status in ("retry", "throttled"):  # sent again: a throttle is a retry too
                retries[second] += 1
                throttles[second] += event.status == "throttled"
            elif event.status == "split":  # nothing settled: its parts are batches of their own
                splits[second] += 1
            else:
                settled[event.status][second] += rows_in_batch.get((part, event.batch), 0)
            if event.ms and event.status != "deferred":
                latencies.append((event.time, event.ms))
    seconds = sorted({s for c in (*settled.values(), retries, splits) for s in c})
    start = seconds[0] if seconds else 0
    span = range(start, seconds[-1] + 1) if seconds else range(0)
    out: dict[str, Any] = {
        "start": start * step,
        "step": step,
        "seconds": [round((s - start) * step, 3) for s in span],
        "settled_per_second": {k: [c.get(s, 0) for s in span] for k, c in sorted(settled.items())},
        "retries_per_second": [retries.get(s, 0) for s in span],
        "throttles_per_second": [throttles.get(s, 0) for s in span],
        "splits_per_second": [splits.get(s, 0) for s in span],
        "latency_ms": {"t": [], "p50": [], "p90": [], "p99": []},
    }
    if latencies:
        latencies.sort()
        t0, t1 = latencies[0][0], latencies[-1][0]
        width = max((t1 - t0) / latency_buckets, min(step, 1.0))
        buckets: dict[int, list[float]] = defaultdict(list)
        for t, ms in latencies:
            buckets[int((t - t0) / width)].append(ms)
        lat = out["latency_ms"]
        for b in sorted(buckets):
            lat["t"].append(round(b * width + t0 - start * step, 3))
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                lat[name].append(_percentile(buckets[b], q))
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def chart_step(ledger: Path | Sequence[Path]) -> float:
    """The bucket the charts use: a second, or finer for a run shorter than 30 s (so that a run
    under a second still draws a line, not one point)."""
    times = [e.time for _, e in _events(ledger) if isinstance(e, Attempt) and e.time is not None]
    span = max(times) - min(times) if times else 0.0
    for step in (0.05, 0.1, 0.25, 0.5):
        if span <= 30 * step:
            return step
    return 1.0


def _time_axis(ax: Any, x: list[float], step: float, ylabel: str) -> None:
    """Axes that start at 0 (no negative counts), span at least a second, a legend beside the plot."""
    ax.set_xlim(0, max([*x, 0.0]) + step if x else 1.0)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))  # all zero: an axis of 0..1, not of ±0.05
    ax.set(xlabel="seconds since first send", ylabel=ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _charts(series: dict[str, Any], codes: dict[str, int]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    charts: dict[str, bytes] = {}
    x = series["seconds"]
    step = series["step"]
    few = len(x) < 5  # markers, so a short run's points show
    style: dict[str, Any] = {"linewidth": 1.2, "marker": "o" if few else None, "markersize": 3}

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, values in series["settled_per_second"].items():
        ax.plot(x, [v / step for v in values], label=name, **style)
    ax.set_title("recipients settled per second")
    _time_axis(ax, x, step, "recipients/s")
    charts["sends_per_second.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(codes) + 1)))
    labels = list(codes) or ["(none)"]
    ax.barh(labels, [codes.get(k, 0) for k in labels], color="#4477aa")
    ax.set(title="recipients by final outcome and code", xlabel="recipients")
    ax.set_xlim(left=0)
    ax.invert_yaxis()
    charts["outcomes.png"] = _png(fig)
    plt.close(fig)

    lat = series["latency_ms"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name in ("p50", "p90", "p99"):
        ax.plot(lat["t"], lat[name], label=name, linewidth=1.2, marker="o" if len(lat["t"]) < 5 else None)
    ax.set_title("request latency per batch")
    _time_axis(ax, lat["t"], step, "ms")
    charts["latency.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key, label in (("retries", "retries"), ("throttles", "throttles"), ("splits", "splits")):
        ax.plot(x, [v / step for v in series[f"{key}_per_second"]], label=label, **style)
    ax.set_title("retries, throttles and splits per second")
    _time_axis(ax, x, step, "requests/s")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    charts["retries.png"] = _png(fig)
    plt.close(fig)
    return charts


def _identity(doc: dict[str, Any]) -> dict[str, Any]:
    """Which run this is: its id, when it started, the campaign's provider, template and source."""
    campaign = doc.get("campaign", {})
    provider = campaign.get("provider", {})
    message = campaign.get("message", {})
    source = campaign.get("source", {})
    kind = provider.get("kind")
    if kind == "simulator":
        kind = f"simulator ({provider.get('protocol')})"
    template = message.get("template_code") or message.get("project") or message.get("content") or ""
    return {
        "run_id": doc.get("run_id"),
        "provider": kind,
        "template": template,
        "sign_name": message.get("sign_name"),
        "source": source.get("path") or source.get("table") or source.get("kind"),
    }


def _shown(name: str, value: object) -> str:
    """A summary value for a reader: times as local dates, numbers with separators."""
    if name in ("first_send", "last_send") and isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html``, the PNG charts and ``report.json``; return the HTML path."""
    rd = RunDir(run_dir)
    rd.load()
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = rd.load(strict=False)
    summary = summarize(run_dir)
    ledgers = [RunDir(part).ledger for part in run_parts(run_dir)]
    series = collect_series(ledgers)
    step = chart_step(ledgers)
    charts = _charts(series if step == 1.0 else collect_series(ledgers, step=step), summary["outcomes"])
    delivery, delivery_charts = delivery_report(run_dir, summary["sent"])
    summary.update(delivery)
    charts.update(delivery_charts)
    for name, data in charts.items():
        (out / name).write_bytes(data)
    (out / "report.json").write_bytes(
        orjson.dumps({"summary": summary, "series": series}, option=orjson.OPT_INDENT_2)
    )
    rows = "".join(
        f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{html.escape(_shown(k, v))}</td></tr>"
        for k, v in [*_identity(doc).items(), *summary.items()]
        if not isinstance(v, dict | list)  # per-code tables and a sharded run's shards: in report.json
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
