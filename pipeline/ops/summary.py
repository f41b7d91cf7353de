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

from pipeline.app.rundir import RunDir
from pipeline.errors import RunDirError
from pipeline.ledger import Attempt, Intent, LedgerState, events, final_outcomes, final_states, replay
from pipeline.ops.receipts import EXPORT_FIELDS as DELIVERY_FIELDS
from pipeline.ops.receipts import delivery_counts, with_delivery
from pipeline.source import file_shard, shard_rows

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
    """Counts by status; ``codes`` (settled rows by final ``status:code``) and ``outcomes`` (every
    row read once by its final state, codes or not: they add up to the rows read); ``attempts``
    (requests by outcome and code); first and last send, average rate, and requests:
    ``requests`` sent in all, ``splits`` (calls refused because of some of their recipients,
    then sent in parts) and ``split_requests`` (the requests for those parts, within ``requests``)."""
    rd = RunDir(run_dir)
    doc = rd.load(strict=False)
    from pipeline.scale.shards import merged_summary, shard_count

    if shard_count(doc) is not None:
        return merged_summary(run_dir)
    holder = rd.holder()
    try:
        rd.check_ledger(doc, force=False)
        problem = None
    except RunDirError as exc:
        problem = str(exc)
    state = replay(rd.ledger)
    attempts: Counter[str] = Counter()
    first = last = None
    stopped: dict[str, Any] | None = None  # the last attempt that stopped the run, unless sending went on
    requests = splits = split_requests = 0
    for event in events(rd.ledger, recipients=False):
        if isinstance(event, Intent):
            requests += 1
            split_requests += event.parent is not None  # a part of a split batch
        elif isinstance(event, Attempt):
            attempts[f"{event.status}:{event.code}" if event.code else event.status] += 1
            if event.status == "fatal":
                stopped = {"code": event.code, "message": event.message, "time": event.time}
            elif event.status not in ("retry", "throttled"):
                stopped = None
            splits += event.status == "split"
            if event.time is not None:
                first = event.time if first is None else min(first, event.time)
                last = event.time if last is None else max(last, event.time)
    # Final states only: a row's earlier outcomes (deferred, then sent on resume) are history.
    finals = final_outcomes(rd.ledger, state)
    codes = Counter({f"{status}:{code}": n for (status, code), n in finals.items() if code})
    out = status_counts(state)
    out["running"] = None if holder is None else {**vars(holder), "describe": holder.describe()}
    out["ledger_damaged_lines"] = state.bad_lines
    out["ledger_problem"] = problem
    out["codes"] = dict(codes.most_common())
    out["outcomes"] = _outcomes(finals, state)
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
    _after_stop(out, rd, doc, state, stopped)
    return out


def _after_stop(
    out: dict[str, Any], rd: RunDir, doc: dict[str, Any], state: LedgerState, fatal: dict[str, Any] | None
) -> None:
    """What a stopped (or running) run needs said: rows in flight apart while it runs, pending
    against the source's row count, the stop's reason and code, the next command, and the
    rates of the last session and of all of them."""
    inflight = state.counts()["inflight"]
    if out["running"] is not None:  # in flight now, not unknown
        out["unknown"] -= inflight
        out["in_flight"] = inflight
    rows = state.eof_rows
    out["source_rows_estimated"] = False
    if rows is None:
        rows = _count_source_rows(doc)
        out["source_rows"] = rows
        out["source_rows_estimated"] = rows is not None
    if rows is not None:
        seen = sum(out[k] for k in ("sent", "failed", "rejected", "unknown", "deferred")) + out.get(
            "in_flight", 0
        )
        out["pending"] = max(0, rows - seen)
    else:
        out["pending"] = None  # not yet read: a database source counts its rows when read
    sessions = rd.load_sessions()
    last = sessions[-1] if sessions else None
    if last is not None and last.get("stopped"):
        out["stopped"] = {"code": last.get("code"), "message": last["stopped"], "time": last.get("ended")}
    elif (
        fatal is None
        and out["running"] is None
        and not out["complete"]
        and (last is None or last["complete"])
    ):
        if out["first_send"] is not None:
            out["stopped"] = {
                "code": "Interrupted",
                "message": "the process ended without a clean stop",
                "time": None,
            }
    out["next"] = None
    if out["running"] is None and (out["unknown"] or not out["complete"] or out["deferred"]):
        command = "reconcile" if out["unknown"] else "resume"
        out["next"] = f"sluice {command} {rd.path}"
    out["rates"] = {
        "last_session": _rate(last["settled"], last["elapsed"]) if last is not None else None,
        "all_sessions": _rate(
            sum(x.get("settled", 0) for x in sessions), sum(x.get("elapsed", 0) for x in sessions)
        ),
        "sessions": len(sessions),
    }


def _rate(settled: int, elapsed: float) -> float | None:
    return round(settled / elapsed, 1) if elapsed > 0 and settled else None


def _count_source_rows(doc: dict[str, Any]) -> int | None:
    """The recipients in a CSV or JSONL source, counted by lines (a quoted field spanning lines
    counts more than once); None for a database source or a file gone."""
    source = doc.get("campaign", {}).get("source", {})
    kind, path = source.get("kind"), source.get("path")
    if kind not in ("csv", "jsonl") or not path:
        return None
    newline = "\n".encode(_CODEC.get(source.get("encoding") or "utf-8", "utf-8"))
    try:
        with open(path, "rb") as f:
            n = sum(block.count(newline) for block in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None
    return shard_rows(max(0, n - 1) if kind == "csv" else n, file_shard(kind, source.get("shard")))


_CODEC = {"utf-16": "utf-16-le"}  # a newline without the BOM


def _outcomes(finals: Counter[tuple[str, str | None]], state: LedgerState) -> dict[str, int]:
    """Every row read once, by its final state: ``status:code`` (or ``status``) of the settled
    rows, ``unknown:in flight`` (the process stopped with their request out), ``pending``."""
    out: Counter[str] = Counter()
    for (status, code), n in finals.items():
        out[f"{status}:{code}" if code else status] += n
    counts = state.counts()
    if counts["inflight"]:
        out["unknown:in flight"] = counts["inflight"]
    if counts["pending"]:
        out["pending"] = counts["pending"]
    return dict(out.most_common())


def _final_lines(ledger: Path, phones: dict[int, str]) -> Iterator[dict[str, Any]]:
    """Each settled row's final state, as ``export`` writes it."""
    for final in final_states(ledger, replay(ledger)):
        yield {
            "row": final.row,
            "key": final.key,
            "phone": phones.get(final.row, ""),
            "status": final.status,
            "code": final.code or final.reason,
            "provider_id": final.provider_id,
            "batch": final.batch,
            "time": final.time,
            "message": final.reason,
        }


EXPORT_FIELDS = (
    "row",
    "key",
    "phone",
    "status",
    "code",
    "provider_id",
    "batch",
    "time",
    "message",
    *DELIVERY_FIELDS,
)


def _source_phones(rd: RunDir) -> dict[int, str]:
    """Row → the phone column as the source has it (so a rejected row can be found and fixed),
    read from the run's CSV or JSONL source, numbered as the run numbered them; empty for a
    database source or a file that cannot be read."""
    from pipeline.app.api import pinned_campaign

    campaign, _ = pinned_campaign(rd, strict=False)
    spec = campaign.source
    phones: dict[int, str] = {}
    try:
        if spec.kind == "csv":
            codec = {"utf-8": "utf-8-sig"}.get(spec.encoding, spec.encoding)
            with open(spec.path, encoding=codec, errors="replace", newline="") as f:
                reader = csv.reader(f, delimiter=spec.delimiter)
                header = [h.strip() for h in next(reader, [])]
                at = header.index(spec.phone) if spec.phone in header else -1
                row = 0
                for values in reader:
                    if values:  # a blank line is not a record (as CsvSource counts)
                        row += 1
                        if 0 <= at < len(values):
                            phones[row] = values[at]
        elif spec.kind == "jsonl":
            with open(spec.path, "rb") as b:
                for row, line in enumerate(b, 1):
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(obj, dict) and spec.phone in obj:
                        phones[row] = str(obj[spec.phone])
    except (OSError, csv.Error):
        return {}
    return phones


def export_rows(run_dir: Path, fmt: str, out: IO[bytes]) -> int:
    """Write the final outcome of every settled recipient as CSV or JSONL; returns the count
    (a sharded run's shards one after the other: its rows keep the source's numbers)."""
    from pipeline.scale.shards import run_parts

    rd = RunDir(run_dir)
    rd.load()
    phones = _source_phones(rd)
    records = (
        rec
        for part in run_parts(run_dir)
        for rec in with_delivery(_final_lines(RunDir(part).ledger, phones), part)
    )
    n = 0
    if fmt == "jsonl":
        for rec in records:
            out.write(orjson.dumps(rec) + b"\n")
            n += 1
        return n
    import io

    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.DictWriter(text, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for rec in records:
        writer.writerow(rec)
        n += 1
    text.detach()
    return n
