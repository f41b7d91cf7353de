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

from pipeline.api import resume_run, run_status, start_run
from pipeline.campaign import Campaign, load_campaign, parse_campaign
from pipeline.engine import Progress, RunResult
from pipeline.errors import CampaignError, RunDirError, RunStopped, SluiceError, SourceError

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
