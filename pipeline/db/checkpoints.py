"""Checkpoints of a database source, and the comparison of its fingerprints.

With each chunk the source appends ``{"row": R, "n": N, "key": K}`` to
``source-checkpoints.jsonl`` in the run directory: every selected row with a key up to K
has been read, N of them, the last one ledger row R.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ("CHECKPOINTS", "DATA_FIELDS", "Checkpoint", "compare_fingerprints", "read_checkpoints")

CHECKPOINTS = "source-checkpoints.jsonl"
DATA_FIELDS = ("rows", "key_min", "key_max")


@dataclass(frozen=True)
class Checkpoint:
    """Every selected row with a key up to ``key`` was read: ``n`` rows, the last at ledger ``row``."""

    row: int
    n: int
    key: Any


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """The checkpoints in ``path``; a torn or foreign line is skipped."""
    out: list[Checkpoint] = []
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            try:
                obj = orjson.loads(line)
                out.append(Checkpoint(int(obj["row"]), int(obj["n"]), obj["key"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def compare_fingerprints(
    pinned: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """``(refusal, warning)`` for continuing a run pinned to ``pinned`` against ``current``.

    A different table, query, key, numbering or range is refused. Changed data
    (row count, key range) is refused with ``row_number = "rank"``, where
    positions may have shifted, and only warned about with ``"key"``.
    """

    def identity(fp: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in fp.items() if k not in DATA_FIELDS}

    if identity(pinned) != identity(current):
        keys = identity(pinned).keys() | identity(current).keys()
        changed = sorted(k for k in keys if pinned.get(k) != current.get(k))
        return f"the source is not the one the run started with ({', '.join(changed)} changed)", None
    diffs = [
        f"{k} {pinned.get(k)!r} -> {current.get(k)!r}" for k in DATA_FIELDS if pinned.get(k) != current.get(k)
    ]
    if not diffs:
        return None, None
    text = f"the source data changed since the run started ({', '.join(diffs)})"
    if current.get("row_number") == "key":
        return None, text
    return (
        f'{text}: with row_number = "rank" row positions may have shifted; --force accepts it '
        '(row_number = "key" tolerates a changing table)',
        None,
    )
