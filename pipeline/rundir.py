"""Run directory: ``run.json`` (the pinned campaign), ``ledger.jsonl``, ``log.jsonl``.

The directory and its files are created readable by the owner only: the ledger
and the log hold personal data (keys, row numbers, provider ids).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import RunDirError

__all__ = ("RunDir",)

FORMAT = 1


@dataclass
class RunDir:
    path: Path

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    def exists(self) -> bool:
        return self.run_json.exists()

    def create(self, campaign: dict[str, Any], digest: str, source: dict[str, Any]) -> dict[str, Any]:
        """Pin a new run; returns the run.json document."""
        old_umask = os.umask(0o077)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            doc = {
                "format": FORMAT,
                "run_id": secrets.token_hex(4),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "campaign_hash": digest,
                "campaign": campaign,
                "source": source,
            }
            tmp = self.run_json.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.run_json)
        finally:
            os.umask(old_umask)
        return doc

    def load(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = orjson.loads(self.run_json.read_bytes())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a sluice run directory (no run.json)") from None
        except orjson.JSONDecodeError as exc:
            raise RunDirError(f"{self.run_json} is corrupt: {exc}") from None
        if doc.get("format") != FORMAT:
            raise RunDirError(f"{self.run_json}: unsupported format {doc.get('format')!r}")
        return doc
