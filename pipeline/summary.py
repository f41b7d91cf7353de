"""Reading a run back: status with error codes and timing, and the per-recipient export.

Both stream the ledger; memory is half a byte per row (status) or a byte per row (export),
plus one entry per batch.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.errors import RunDirError
from pipeline.ledger import LedgerState, replay
from pipeline.receipts import EXPORT_FIELDS as DELIVERY_FIELDS
from pipeline.receipts import delivery_counts, with_delivery
from pipeline.rundir import RunDir

__all__ = ("export_rows", "status_counts", "summarize")


def status_counts(state: LedgerState) -> dict[str, Any]:
    """The counts ``sluice status --json`` promises, from a replayed ledger."""
    counts = state.counts()
    inflight = counts.pop("inflight")
    out: dict[str, Any] = {
        "sent": counts["sent"],
        "failed": counts["failed"],
        "rejected": counts["rejected"],
        # A row in flight when the process stopped is unknown (resume writes it so).
        "unknown": counts["unknown"] + inflight,
        "deferred": counts["deferred"],
        "pending": counts["pending"],
        "source_rows": state.eof_rows,
    }
    out["complete"] = (
        state.eof_rows is not None and not out["pending"] and not out["deferred"] and not inflight
    )
    return out


def summarize(run_dir: Path) -> dict[str, Any]:
    """Counts by status and by error code, first and last send, average rate, and requests:
    ``requests`` sent in all, ``splits`` (calls refused because of some of their recipients,
    then sent in parts) and ``split_requests`` (the requests for those parts, within ``requests``)."""
    rd = RunDir(run_dir)
    doc = rd.load(strict=False)
    holder = rd.holder()
    try:
        rd.check_ledger(doc, force=False)
        problem = None
    except RunDirError as exc:
        problem = str(exc)
    state = replay(rd.ledger)
    codes: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    first = last = None
    stopped: dict[str, Any] | None = None  # the last attempt that stopped the run, unless sending went on
    requests = splits = split_requests = 0
    if rd.ledger.exists():
        with rd.ledger.open("rb") as f:
            for line in f:
                if line.startswith(b'{"r":'):
                    if b'"c":' in line:
                        obj = orjson.loads(line)
                        codes[f"{obj['s']}:{obj['c']}"] += 1
                elif line.startswith(b'{"i":'):
                    requests += 1
                    split_requests += b',"p":' in line  # a part of a split batch
                elif line.startswith(b'{"b":'):
                    obj = orjson.loads(line)
                    attempts[f"{obj['s']}:{obj.get('c', '')}"] += 1
                    if obj["s"] == "fatal":
                        stopped = {"code": obj.get("c"), "message": obj.get("m"), "time": obj.get("t")}
                    elif obj["s"] != "retry":
                        stopped = None
                    splits += obj["s"] == "split"
                    t = obj.get("t")
                    if t is not None:
                        first = t if first is None else min(first, t)
                        last = t if last is None else max(last, t)
    out = status_counts(state)
    out["running"] = None if holder is None else {**vars(holder), "describe": holder.describe()}
    out["ledger_damaged_lines"] = state.bad_lines
    out["ledger_problem"] = problem
    out["codes"] = dict(codes.most_common())
    out["attempts"] = dict(attempts.most_common())
    out["stopped"] = stopped
    out["requests"] = requests
    out["splits"] = splits
    out["split_requests"] = split_requests
    out["first_send"] = first
    out["last_send"] = last
    span = (last - first) if first is not None and last is not None else 0.0
    out["avg_rate"] = round((out["sent"] + out["failed"]) / span, 1) if span > 0 else None
    out.update(delivery_counts(run_dir).as_status(out["sent"]))
    return out


def _final_lines(ledger: Path) -> Iterator[dict[str, Any]]:
    """Each row's last recipient line, in ledger order, joined with its batch's id and time."""
    remaining = bytearray()
    batches: dict[int, tuple[str | None, float | None]] = {}
    with ledger.open("rb") as f:
        for line in f:
            if line.startswith(b'{"r":'):
                row = int(line[5 : line.index(b",", 5)])
                if row >= len(remaining):
                    remaining.extend(bytes(row + 1 - len(remaining) + len(remaining) // 2))
                remaining[row] = min(255, remaining[row] + 1)
            elif line.startswith(b'{"b":'):
                obj = orjson.loads(line)
                batches[obj["b"]] = (obj.get("id"), obj.get("t"))
    with ledger.open("rb") as f:
        for line in f:
            if not line.startswith(b'{"r":') or not line.endswith(b"\n"):
                continue
            row = int(line[5 : line.index(b",", 5)])
            remaining[row] -= 1
            if remaining[row]:
                continue
            obj = orjson.loads(line)
            batch_id, batch_time = batches.get(obj.get("b", -1), (None, None))
            yield {
                "row": obj["r"],
                "key": obj.get("k", str(obj["r"])),
                "status": obj["s"],
                "code": obj.get("c") or obj.get("e"),
                "provider_id": obj.get("id") or batch_id,
                "batch": obj.get("b"),
                "time": batch_time,
                "message": obj.get("e"),
            }


EXPORT_FIELDS = ("row", "key", "status", "code", "provider_id", "batch", "time", "message", *DELIVERY_FIELDS)


def export_rows(run_dir: Path, fmt: str, out: IO[bytes]) -> int:
    """Write the final outcome of every settled recipient as CSV or JSONL; returns the count."""
    rd = RunDir(run_dir)
    rd.load()
    n = 0
    if fmt == "jsonl":
        for rec in with_delivery(_final_lines(rd.ledger), run_dir):
            out.write(orjson.dumps(rec) + b"\n")
            n += 1
        return n
    import io

    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.DictWriter(text, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for rec in with_delivery(_final_lines(rd.ledger), run_dir):
        writer.writerow(rec)
        n += 1
    text.detach()
    return n
