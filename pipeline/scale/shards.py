"""A sharded run directory, and the views that merge its shards.

::

    RUN/run.json              the campaign, pinned once, with "shards": n
    RUN/run.lock              held by the parent (``sluice run --workers N``)
    RUN/shards/i-of-n/        a whole run directory per shard: run.json (the campaign with
                              source.shard = "i/n"), ledger.jsonl, run.lock, checkpoint.json...

A shard is an ordinary run directory, so ``sluice resume RUN/shards/2-of-4`` resumes it alone;
``sluice resume RUN`` resumes them all. ``status``, ``report`` and ``export`` of ``RUN`` merge the
shards (:func:`merged_summary`, :func:`shard_ledgers`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.app.rundir import RunDir
from pipeline.errors import RunDirError
from pipeline.scale import shard_dir

if TYPE_CHECKING:  # `sluice status` reads no campaign, and imports no HTTP stack
    from pipeline.app.campaign import Campaign

__all__ = (
    "SHARDS_KEY",
    "ShardedRun",
    "is_sharded",
    "merged_summary",
    "open_sharded_run",
    "prepare_sharded_run",
    "refuse_sharded",
    "run_parts",
    "shard_campaign",
    "shard_count",
)

SHARDS_KEY = "shards"  # in the parent's run.json: how many shards the run has


@dataclass(frozen=True)
class ShardedRun:
    path: Path
    count: int

    def shard(self, index: int) -> Path:
        """Shard ``index``'s run directory (1-based)."""
        return shard_dir(self.path, index, self.count)

    def shards(self) -> list[Path]:
        return [self.shard(i) for i in range(1, self.count + 1)]


def shard_count(doc: dict[str, Any]) -> int | None:
    """The shard count a run.json records, or None for a run that is not sharded."""
    count = doc.get(SHARDS_KEY)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 1 else None


def is_sharded(run_dir: Path) -> bool:
    """True when ``run_dir`` holds the parent of a sharded run."""
    rd = RunDir(run_dir)
    return rd.exists() and shard_count(rd.load(strict=False)) is not None


def shard_campaign(campaign: Campaign, index: int, count: int) -> Campaign:
    """``campaign`` as shard ``index`` of ``count`` runs it: with ``source.shard = "index/count"``."""
    if campaign.source.shard is not None:
        raise RunDirError(
            f"the campaign reads only shard {campaign.source.shard} of its source: "
            "leave source.shard out to split it into shards"
        )
    return dataclasses.replace(
        campaign, source=dataclasses.replace(campaign.source, shard=f"{index}/{count}")
    )


def prepare_sharded_run(
    campaign: Campaign, run_dir: Path, count: int, fingerprint: dict[str, Any], *, force: bool = False
) -> ShardedRun:
    """Create ``run_dir`` as a run of ``campaign`` in ``count`` shards, or check that it is one
    (the same campaign, unless ``force``, and the same count); create the shard directories a
    run that stopped while making them lacks. The caller holds ``run_dir``'s lock."""
    if count < 1 or count > 10_000:
        raise RunDirError(f"--workers must be from 1 to 10000, not {count}")
    rd = RunDir(run_dir)
    if rd.exists():
        doc = rd.load()
        existing = shard_count(doc)
        if existing is None:
            raise RunDirError(
                f"{run_dir} holds a run that is not sharded: continue it without --workers, "
                "or start the sharded run in another run directory"
            )
        if existing != count:
            raise RunDirError(
                f"{run_dir} is a run in {existing} shards: continue it with --workers {existing}"
            )
        if not force and doc["campaign_hash"] != campaign.digest():
            raise RunDirError(
                f"{run_dir} holds a run of a different campaign; use another --run-dir "
                "(or --force to continue it with this one)"
            )
    else:
        doc = rd.create(campaign.to_dict(), campaign.digest(), fingerprint)
        doc[SHARDS_KEY] = count
        rd.save(doc)
    run = ShardedRun(run_dir, count)
    for index, path in enumerate(run.shards(), 1):
        part = shard_campaign(campaign, index, count)
        shard = RunDir(path)
        if not shard.exists():
            shard.create(part.to_dict(), part.digest(), fingerprint)
        elif not force and shard.load()["campaign_hash"] != part.digest():
            raise RunDirError(f"{path} holds a run of a different campaign than {run_dir}")
    return run


def refuse_sharded(run_dir: Path, command: str) -> None:
    """RunDirError for a command that works on one ledger, given a sharded run's parent."""
    if is_sharded(run_dir):
        count = open_sharded_run(run_dir).count
        raise RunDirError(
            f"{run_dir} is a run in {count} shards, each with its own ledger: "
            f"`sluice {command} {run_dir}/shards/I-of-{count}` for each shard"
        )


def open_sharded_run(run_dir: Path) -> ShardedRun:
    """The sharded run in ``run_dir``; RunDirError when it is not one, or a shard is missing."""
    doc = RunDir(run_dir).load(strict=False)
    count = shard_count(doc)
    if count is None:
        raise RunDirError(f"{run_dir} is not a sharded run (its run.json records no shards)")
    run = ShardedRun(run_dir, count)
    for path in run.shards():
        if not RunDir(path).exists():
            raise RunDirError(f"{path}, a shard of {run_dir}, is missing (no run.json)")
    return run


# -- the merged view ------------------------------------------------------------
def run_parts(run_dir: Path) -> list[Path]:
    """The run directories whose ledgers make up ``run_dir``'s run: its shards', or its own."""
    return open_sharded_run(run_dir).shards() if is_sharded(run_dir) else [run_dir]


_SUMMED = (
    "sent",
    "failed",
    "rejected",
    "unknown",
    "deferred",
    "requests",
    "splits",
    "split_requests",
    "ledger_damaged_lines",
    "delivered",
    "undelivered",
    "awaiting_receipt",
    "unmatched_receipts",
)


def _shard_state(status: dict[str, Any]) -> str:
    if status["running"] is not None:
        return "running"
    if status["complete"]:
        return "complete"
    if status["stopped"] is not None:
        return "stopped"
    return "not started" if status["rates"]["sessions"] == 0 else "incomplete"


def _sum_optional(values: list[Any]) -> int | None:
    return None if any(v is None for v in values) else sum(values)


def merged_summary(run_dir: Path) -> dict[str, Any]:
    """``sluice status`` of a sharded run: each shard's summary (``shards``: its name, state
    and counts) and their sum, with each row of the source counted once, in its shard."""
    from pipeline.ops.summary import summarize

    run = open_sharded_run(run_dir)
    parts = [(path, summarize(path)) for path in run.shards()]
    statuses = [s for _, s in parts]
    out: dict[str, Any] = {k: sum(s.get(k) or 0 for s in statuses) for k in _SUMMED}
    out["pending"] = _sum_optional([s["pending"] for s in statuses])
    out["source_rows"] = _sum_optional([s["source_rows"] for s in statuses])
    out["source_rows_estimated"] = any(s["source_rows_estimated"] for s in statuses)
    out["complete"] = all(s["complete"] for s in statuses)
    if any("in_flight" in s for s in statuses):
        out["in_flight"] = sum(s.get("in_flight", 0) for s in statuses)
    holder = RunDir(run_dir).holder()
    running = [s["running"] for s in statuses if s["running"] is not None]
    if holder is not None:
        out["running"] = {**vars(holder), "describe": holder.describe()}
    else:
        out["running"] = running[0] if running else None
    problems = [f"{path.name}: {s['ledger_problem']}" for path, s in parts if s["ledger_problem"]]
    out["ledger_problem"] = "; ".join(problems) or None
    for key in ("codes", "outcomes", "attempts"):
        total: Counter[str] = Counter()
        for s in statuses:
            total.update(s[key])
        out[key] = dict(total.most_common())
    stops = [(path.name, s["stopped"]) for path, s in parts if s["stopped"] is not None]
    out["stopped"] = (
        {**stops[0][1], "message": f"shard {stops[0][0]}: {stops[0][1]['message'] or ''}"} if stops else None
    )
    firsts = [s["first_send"] for s in statuses if s["first_send"] is not None]
    lasts = [s["last_send"] for s in statuses if s["last_send"] is not None]
    out["first_send"] = min(firsts) if firsts else None
    out["last_send"] = max(lasts) if lasts else None
    span = out["last_send"] - out["first_send"] if firsts and lasts else 0.0
    out["avg_rate"] = round((out["sent"] + out["failed"]) / span, 1) if span > 0 else None
    # The shards ran side by side: the run's rate is the sum of theirs.
    rates = [s["rates"] for s in statuses]
    out["rates"] = {
        name: _sum_optional([r[name] for r in rates if r[name] is not None]) or None
        for name in ("last_session", "all_sessions")
    }
    out["rates"]["sessions"] = max(r["sessions"] for r in rates)
    out["shards"] = [
        {
            "name": path.name,
            "path": str(path),
            "state": _shard_state(s),
            **{k: s[k] for k in ("sent", "failed", "rejected", "unknown", "deferred", "pending")},
        }
        for path, s in parts
    ]
    unknown = [path for path, s in parts if s["unknown"]]
    out["next"] = None
    if out["running"] is None:
        if unknown:
            out["next"] = f"sluice reconcile {unknown[0]}" + (
                f" (and {len(unknown) - 1} more shards)" if len(unknown) > 1 else ""
            )
        elif not out["complete"] or out["deferred"]:
            out["next"] = f"sluice resume {run_dir}"
    return out
