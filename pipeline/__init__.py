"""sluice's engine: Source → Render → Batch → Limit → Dispatch → Ledger.

Modules, in the order data flows through them:

- ``campaign``: load and validate a campaign file
- ``source``: stream rows from CSV / JSONL
- ``render``: templates and phone numbers → messages or rejections
- ``keys``: compact duplicate-key detection
- ``batch``: group messages into provider requests
- ``limit``: requests per second, adaptive to throttling (aiolimiter)
- ``dispatch``: send over httpx with retries, classify outcomes
- ``transport``: HTTP/1.1 keep-alive connections on asyncio protocols, behind httpx's transport API
- ``ledger``: the append-only JSONL ledger, replay and repair
- ``rundir``: run.json and the run directory
- ``engine``: the tasks wired together
- ``api``: start / resume / status from Python
- ``cli``: the ``sluice`` command
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import CampaignError, RunDirError, RunStopped, SluiceError, SourceError

if TYPE_CHECKING:
    from pipeline.api import resume_run, run_status, start_run
    from pipeline.campaign import Campaign, load_campaign, parse_campaign
    from pipeline.engine import Progress, RunResult

# Imported on first use: ``import pipeline.cli`` (``sluice status``, ``--dry-run``) must not
# pull in the engine and the HTTP stack through this package.
_LAZY = {
    "resume_run": "pipeline.api",
    "run_status": "pipeline.api",
    "start_run": "pipeline.api",
    "Campaign": "pipeline.campaign",
    "load_campaign": "pipeline.campaign",
    "parse_campaign": "pipeline.campaign",
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
