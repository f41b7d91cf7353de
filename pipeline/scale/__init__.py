"""Scale-out: one campaign in shards, on several cores or machines, under one provider limit.

A shard is an ordinary run of the campaign with ``source.shard = "i/n"`` (rows, or integer
keys, congruent to i - 1 modulo n) in its own run directory under the run's
(:func:`shard_dir`), with its own ledger and lock, so it resumes alone. The shards share
the provider account's limit through a lease limiter (:mod:`pipeline.scale.lease`), hosted
by the parent of ``sluice run --workers N`` or by Redis for ``sluice worker``, whose shard
claims (:mod:`pipeline.scale.claims`) fence a worker that lost its claim.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ("SHARDS_DIR", "is_limiter_url", "shard_dir", "shard_name")

SHARDS_DIR = "shards"


def shard_name(index: int, count: int) -> str:
    """``"3-of-8"`` for shard 3 of 8 (1-based, as in ``source.shard = "3/8"``)."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index} of {count}")
    return f"{index}-of-{count}"


def shard_dir(run_dir: Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` keeps its run directory inside ``run_dir``."""
    return run_dir / SHARDS_DIR / shard_name(index, count)


def is_limiter_url(text: str) -> bool:
    """A lease limiter's address: ``redis://host:port/db`` (``rediss://``) or ``unix:/path``."""
    return text.startswith(("redis://", "rediss://", "unix:"))
