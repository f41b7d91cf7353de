"""Progress: a live display on a terminal, structured events elsewhere.

Counts come from ledger outcomes (what was settled), not from rows read.
"""

from __future__ import annotations

import math
import time
from types import TracebackType
from typing import TYPE_CHECKING

import structlog
from rich.console import Console
from rich.live import Live
from rich.progress import MofNCompleteColumn, TaskID
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    from pipeline.engine import Progress

__all__ = ("ProgressReporter", "ReconcileProgress", "format_duration")

log = structlog.get_logger("sluice.progress")

NARROW = 120  # columns below which the live display is a list rather than a row


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressReporter:
    """Call with each :class:`Progress` snapshot; renders on a TTY, logs otherwise."""

    def __init__(
        self, console: Console | None = None, *, log_every: float = 5.0, title: str = "sluice"
    ) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self._live: Live | None = None
        self._log_every = log_every
        self._last_log = -math.inf  # the first snapshot is always logged (monotonic time may start near 0)
        self._window: list[tuple[float, int]] = []
        self.last: Progress | None = None

    def __enter__(self) -> ProgressReporter:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            if self.last is not None:
                self._live.update(self.render(self.last))
            self._live.__exit__(exc_type, exc, tb)

    def rates(self, p: Progress) -> tuple[float, float]:
        """(current recipients/s over the last ~5 s, average since start)."""
        now = time.monotonic()
        settled = p.counts["sent"] + p.counts["failed"] + p.counts["unknown"] + p.counts["deferred"]
        self._window.append((now, settled))
        while len(self._window) > 2 and now - self._window[0][0] > 5:
            self._window.pop(0)
        t0, s0 = self._window[0]
        current = (settled - s0) / (now - t0) if now > t0 else 0.0
        average = (settled - p.earlier) / p.elapsed if p.elapsed > 0 else 0.0  # this session's own
        return current, average

    def render(self, p: Progress) -> Table:
        """One row of columns on a wide terminal; one line per value below ``NARROW`` columns,
        so that no value is cut."""
        current, average = self.rates(p)
        remaining = None
        if p.total is not None and current > 0:
            remaining = max(0, p.total - p.settled) / current
        c = p.counts
        total = f"/{p.total:,}" if p.total else ""
        if p.done:
            eta = "stopped" if p.stopped is not None else "done"
        else:
            eta = format_duration(remaining)
        values = {
            "sent": f"{c['sent']:,}{total}",
            "failed": f"{c['failed']:,}",
            "rejected": f"{c['rejected']:,}",
            "unknown": f"{c['unknown']:,}",
            "deferred": f"{c['deferred']:,}",
            "rate/s": f"{current:,.0f}",
            "avg/s": f"{average:,.0f}",
            "elapsed": format_duration(p.elapsed),
            "ETA": eta,
        }
        if self.console.width < NARROW:
            table = Table(title=self.title, show_header=False, expand=False)
            table.add_column("", no_wrap=True)
            table.add_column("", justify="right", no_wrap=True)
            for name, value in values.items():
                table.add_row(name, value)
        else:
            table = Table(title=self.title, show_header=True, expand=False)
            for name in values:
                table.add_column(name, justify="right", no_wrap=True)
            table.add_row(*values.values())
        notes = []
        if p.stopped is not None:
            notes.append(f"stopped: {p.stopped}")
        if p.paused:
            notes.append(p.paused)
        if p.throttles:
            notes.append(f"throttled {p.throttles}×, rate now {p.rate_limit:,.0f} req/s")
        if p.bottleneck is not None and not p.done:
            notes.append(f"waiting on the {p.bottleneck}")
        if notes:
            table.caption = "; ".join(notes)
        return table

    def __call__(self, p: Progress) -> None:
        self.last = p
        if self._live is not None:
            self._live.update(self.render(p))
            return
        now = time.monotonic()
        if p.done or now - self._last_log >= self._log_every:
            self._last_log = now
            current, average = self.rates(p)
            log.info(
                "progress",
                **p.counts,
                rows_read=p.rows_read,
                total=p.total,
                rate=round(current, 1),
                avg_rate=round(average, 1),
                requests=p.requests,
                throttles=p.throttles,
                paused=p.paused,
                chunks_queued=p.chunks_queued,
                batches_queued=p.batches_queued,
                bottleneck=p.bottleneck,
                done=p.done,
            )


class ReconcileProgress:
    """``sluice reconcile``'s progress: how many to check and how long that takes at the query
    rate, then a bar on a terminal, or a ``reconcile_progress`` event every ``log_every`` s."""

    def __init__(self, console: Console, *, log_every: float = 5.0) -> None:
        self.console = console
        self._log_every = log_every
        self._last_log = -math.inf
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ReconcileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, checked: int, total: int, queries_per_second: float) -> None:
        if checked == 0:
            self.console.print(
                f"checking {total:,} unknown recipients at {queries_per_second:g} queries/s "
                f"(about {format_duration(total / queries_per_second)})"
            )
            if self.console.is_terminal and total:
                self._bar = RichProgress(
                    *RichProgress.get_default_columns(), MofNCompleteColumn(), console=self.console
                )
                self._task = self._bar.add_task("reconcile", total=total)
                self._bar.start()
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=checked)
            return
        now = time.monotonic()
        if checked == total or now - self._last_log >= self._log_every:
            self._last_log = now
            log.info("reconcile_progress", checked=checked, total=total)
