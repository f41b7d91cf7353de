"""sluice's engine: Source → Render → Batch → Limit → Dispatch → Ledger.

The stages, in the order data flows through them (this folder)::

    source.py, db/      rows from CSV / JSONL files, or SQLite / PostgreSQL (db/)
    admit.py            which rows become messages: resume skip, keys, suppression,
                        phone dedupe, render, checks, reject reasons (also the dry run's count)
    render.py, keys.py  templates, phone numbers and text limits; compact duplicate keys
    batch.py            messages grouped into provider requests
    limit.py,           requests per second, adaptive to throttling (aiolimiter);
      schedule.py       the send window and the daily cap
    dispatch.py         sign, write the intent, send, classify, retry, split refused batches
    transport.py,       HTTP/1.1 keep-alive connections on asyncio protocols (llhttp);
      proxy.py          forward proxies and how each origin is reached
    ledger/             the append-only JSONL ledger: its format, writer, replay and readers
    engine.py, tasks.py a run set up, and its tasks with the bounded streams between them
    errors.py           the exception tree

Apart from them: ``app/``, the run's plumbing (campaign file, run directory, provider set-up,
Python API, the ``sluice`` command, logging, the live display), and ``ops/``, the operator's
tools (status and export, report, reconcile, dry run, delivery receipts).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import CampaignError, RunDirError, RunStopped, SluiceError, SourceError

if TYPE_CHECKING:
    from pipeline.app.api import resume_run, run_status, start_run
    from pipeline.app.campaign import Campaign, load_campaign, parse_campaign
    from pipeline.engine import Progress, RunResult

# Imported on first use: ``import pipeline.app.cli`` (``sluice status``, ``--dry-run``) must not
# pull in the engine and the HTTP stack through this package.
_LAZY = {
    "resume_run": "pipeline.app.api",
    "run_status": "pipeline.app.api",
    "start_run": "pipeline.app.api",
    "Campaign": "pipeline.app.campaign",
    "load_campaign": "pipeline.app.campaign",
    "parse_campaign": "pipeline.app.campaign",
    "Progress": "pipeline.engine",
    "RunResult": "pipeline.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = (
    "Campaign",
    "CampaignError",
    "Progress",
    "RunDirError",
    "RunResult",
    "RunStopped",
    "SluiceError",
    "SourceError",
    "load_campaign",
    "parse_campaign",
    "resume_run",
    "run_status",
    "start_run",
)
