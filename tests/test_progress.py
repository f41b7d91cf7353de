"""The live progress display on a captured terminal, and structured events elsewhere."""

from __future__ import annotations

import io

from rich.console import Console
from structlog.testing import capture_logs

from pipeline.app.progress import ProgressReporter, format_duration
from pipeline.engine import Progress


def snapshot(sent: int, elapsed: float, *, done: bool = False, paused: str | None = None) -> Progress:
    counts = {"sent": sent, "failed": 3, "rejected": 2, "unknown": 1, "deferred": 0}
    return Progress(counts, sent, 10_000, elapsed, sent // 100, 1, 500.0, done, paused)


class TestTerminal:
    def test_table_with_counts_rates_and_eta(self) -> None:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, width=140, color_system=None)
        reporter = ProgressReporter(console)
        table = reporter.render(snapshot(1000, 1.0))
        table = reporter.render(
            snapshot(3000, 2.0, paused="paused until 2026-11-23 08:00 CST: outside the send window")
        )
        console.print(table)
        text = buf.getvalue()
        for expected in (
            "3,000/10,000",
            "failed",
            "rejected",
            "unknown",
            "deferred",
            "0:00:02",
            "outside the send window",
        ):
            assert expected in text, expected
        assert "throttled 1×" in text
        _, average = reporter.rates(snapshot(3000, 2.0))
        assert average == 1502.0  # (3000 sent + 3 failed + 1 unknown) / 2 s

    def test_live_display_ends_with_the_final_state(self) -> None:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, width=140, color_system=None)
        with ProgressReporter(console) as reporter:
            reporter(snapshot(5000, 1.0))
            reporter(snapshot(10_000, 2.0, done=True))
        assert "10,000/10,000" in buf.getvalue() and "done" in buf.getvalue()


class TestNotATerminal:
    def test_structured_progress_events(self) -> None:
        console = Console(file=io.StringIO(), force_terminal=False)
        with capture_logs() as logs, ProgressReporter(console, log_every=3600) as reporter:
            reporter(snapshot(100, 1.0))
            reporter(snapshot(200, 2.0))  # within log_every: not logged
            reporter(snapshot(300, 3.0, done=True))  # the final one always is
        events = [e for e in logs if e["event"] == "progress"]
        assert [e["sent"] for e in events] == [100, 300]
        assert events[-1]["done"] is True and events[0]["total"] == 10_000


def test_format_duration() -> None:
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "–"
