"""Delivery receipts: what the providers push (or answer when asked), matched to recipients.

``receipts.jsonl`` in the run directory holds one line per recipient's first final receipt::

    {"r":11,"d":1,"c":"DELIVRD","p":"acme","id":"9006^0","t":1700000100.0,"s":1700000001.2}

``r`` row, ``d`` delivered (1) or not (0), ``c`` the provider's code, ``p`` the provider (its
receipt protocol), ``id`` its message id, ``t`` when the provider reported it, ``s`` when sluice
sent it (the intent's time). Receipts that match no recipient of the run go to
``receipts-unmatched.jsonl``. Both files are append-only and written by the listener (or
``sluice receipts``) only: never by ``sluice run``.

Matching: a receipt names its batch (the out_id sluice gave it, perhaps cut to what the
provider echoes, or the provider's id of the send request, which the attempt line holds) and
the phone picks the recipient in it; or it carries the id sluice chose for the recipient
(``ProviderKind.message_id``). What each provider's pushes carry is in its module
(``ProviderKind.receipts``, providers/spec.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.ledger import Intent, follow
from providers.spec import Receipt

__all__ = (
    "RECEIPTS",
    "UNMATCHED",
    "DeliveryCounts",
    "Journal",
    "RecipientIndex",
    "delivery_counts",
    "delivery_report",
    "final_receipts",
    "phone_tail",
    "with_delivery",
)

RECEIPTS = "receipts.jsonl"
UNMATCHED = "receipts-unmatched.jsonl"


def phone_tail(phone: str) -> int:
    """The last 11 digits as an integer: what a receipt's number and a recipient's share
    whatever the country-code prefix each carries (0 when there are no digits)."""
    digits = "".join(ch for ch in phone[-16:] if ch.isdigit())[-11:]
    return int(digits) if digits else 0


@dataclass(slots=True)
class _Batch:
    rows: list[int]
    by_phone: dict[int, int] | None = None  # phone_tail → row


@dataclass
class RecipientIndex:
    """Finds a receipt's row from the ledger (batches by out_id and by the provider's id of the
    send request) and the source (numbers, and the message id sluice chose for every key when
    the provider declares one). The ledger is re-read from where it was left when a receipt
    names a batch not seen yet: the listener runs beside the sender."""

    ledger: Path
    phones: np.ndarray[Any, np.dtype[np.int64]]  # row → phone_tail
    message_ids: dict[str, int] = field(default_factory=dict)  # ProviderKind.message_id → row
    ref_chars: tuple[int, ...] = ()  # the lengths providers cut an echoed out_id to
    sent_at: np.ndarray[Any, np.dtype[np.float64]] = field(init=False)  # row → last intent time
    _by_ref: dict[str, _Batch] = field(default_factory=dict)  # out_id (and its cut forms)
    _batch_of_id: dict[int, _Batch] = field(default_factory=dict)
    _by_batch_id: dict[str, _Batch] = field(default_factory=dict)  # the attempt line's provider id
    _offset: int = 0

    def __post_init__(self) -> None:
        self.sent_at = np.zeros(len(self.phones), dtype=np.float64)

    def refresh(self) -> None:
        """Read the ledger's new whole lines: intents (out_id → rows) and attempts (their id)."""
        found, self._offset = follow(self.ledger, self._offset)
        for event in found:
            if isinstance(event, Intent):
                batch = _Batch([r for r in event.rows if r < len(self.phones)])
                self._by_ref[event.out_id] = batch
                for chars in self.ref_chars:
                    self._by_ref.setdefault(event.out_id[:chars], batch)
                self._batch_of_id[event.batch] = batch
                self.sent_at[batch.rows] = float(event.time or 0.0)
            elif event.provider_id is not None:
                attempted = self._batch_of_id.get(event.batch)
                if attempted is not None:
                    self._by_batch_id[event.provider_id] = attempted

    def _in_batch(self, r: Receipt) -> int | None:
        batch = self._by_ref.get(r.batch_ref) if r.batch_ref else None
        if batch is None and r.batch_id:
            batch = self._by_batch_id.get(r.batch_id)
        if batch is None:
            return None
        if batch.by_phone is None:  # built on the batch's first receipt
            tails = self.phones[batch.rows].tolist()
            batch.by_phone = dict(zip(reversed(tails), reversed(batch.rows), strict=True))  # first wins
        return batch.by_phone.get(phone_tail(r.phone))

    def match(self, r: Receipt) -> tuple[int, float] | None:
        """(row, time sent) or None."""
        if r.message_id:
            row = self.message_ids.get(r.message_id)
            if row is not None and not self.sent_at[row]:
                self.refresh()
            if row is None or not self.sent_at[row]:
                return None
        else:
            row = self._in_batch(r)
            if row is None:
                self.refresh()
                row = self._in_batch(r)
            if row is None:
                return None
        return row, float(self.sent_at[row])


class Journal:
    """``receipts.jsonl`` and ``receipts-unmatched.jsonl``: appended, de-duplicated by row,
    fsynced in groups. :meth:`add` buffers; :meth:`sync` writes and fsyncs everything buffered
    (call it before acknowledging)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RECEIPTS
        self.unmatched_path = run_dir / UNMATCHED
        self.seen: set[int] = {rec["r"] for rec in _lines(self.path)}
        self.unmatched_seen: set[tuple[str, str, str]] = {
            (rec.get("p", ""), rec.get("id", ""), rec.get("n", "")) for rec in _lines(self.unmatched_path)
        }
        self.counts = {"matched": 0, "duplicate": 0, "unmatched": 0}
        self._fd = _open_append(self.path)
        self._ufd = _open_append(self.unmatched_path)
        self._buf = bytearray()
        self._ubuf = bytearray()

    def add(self, receipt: Receipt, found: tuple[int, float] | None, now: float) -> str:
        """'matched' | 'duplicate' | 'unmatched' (a repeated unmatched one is a 'duplicate')."""
        if found is None:
            key = (receipt.provider, receipt.provider_id, receipt.phone)
            if key in self.unmatched_seen:
                self.counts["duplicate"] += 1
                return "duplicate"
            self.unmatched_seen.add(key)
            self._ubuf += orjson.dumps(
                {
                    "p": receipt.provider,
                    "id": receipt.provider_id,
                    "n": receipt.phone,
                    "ref": receipt.batch_ref,
                    "d": int(receipt.delivered),
                    "c": receipt.code,
                    "t": receipt.reported_at,
                    "at": round(now, 3),
                }
            )
            self._ubuf += b"\n"
            self.counts["unmatched"] += 1
            return "unmatched"
        row, sent_at = found
        if row in self.seen:
            self.counts["duplicate"] += 1
            return "duplicate"
        self.seen.add(row)
        self._buf += orjson.dumps(
            {
                "r": row,
                "d": int(receipt.delivered),
                "c": receipt.code,
                "p": receipt.provider,
                "id": receipt.provider_id,
                "t": receipt.reported_at if receipt.reported_at is not None else round(now, 3),
                "s": sent_at,
            }
        )
        self._buf += b"\n"
        self.counts["matched"] += 1
        return "matched"

    def take(self) -> tuple[bytes, bytes]:
        """What :meth:`add` buffered since the last take (for a sync off the event loop)."""
        out = (bytes(self._buf), bytes(self._ubuf))
        self._buf.clear()
        self._ubuf.clear()
        return out

    def write(self, data: tuple[bytes, bytes]) -> None:
        """Write and fsync (thread-safe with respect to :meth:`add`: touches only the fds)."""
        for fd, chunk in ((self._fd, data[0]), (self._ufd, data[1])):
            if chunk:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)

    def sync(self) -> None:
        self.write(self.take())

    def close(self) -> None:
        for fd in (self._fd, self._ufd):
            os.close(fd)


def _open_append(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    if size:
        with path.open("rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(fd, b"\n")  # a line torn by a crash: later lines start on their own
    return fd


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The whole, readable lines of a receipts file (a torn last line is skipped)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def final_receipts(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Row → its receipt (the first one written for the row)."""
    out: dict[int, dict[str, Any]] = {}
    for rec in _lines(run_dir / RECEIPTS):
        if isinstance(rec.get("r"), int):
            out.setdefault(rec["r"], rec)
    return out


@dataclass
class DeliveryCounts:
    delivered: int = 0
    undelivered: int = 0
    unmatched: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # undelivered, by code
    latencies: list[float] = field(default_factory=list)  # seconds from send to delivery
    delivered_at: list[float] = field(default_factory=list)

    def as_status(self, sent: int) -> dict[str, int]:
        """The ``status --json`` fields: ``awaiting_receipt`` = sent without a receipt yet."""
        return {
            "delivered": self.delivered,
            "undelivered": self.undelivered,
            "awaiting_receipt": max(0, sent - self.delivered - self.undelivered),
            "unmatched_receipts": self.unmatched,
        }


def delivery_counts(run_dir: Path, receipts: Iterable[dict[str, Any]] | None = None) -> DeliveryCounts:
    out = DeliveryCounts()
    recs = final_receipts(run_dir).values() if receipts is None else receipts
    for rec in recs:
        if rec.get("d"):
            out.delivered += 1
            t, s = rec.get("t"), rec.get("s")
            if isinstance(t, int | float):
                out.delivered_at.append(float(t))
                if isinstance(s, int | float) and s:
                    out.latencies.append(max(0.0, float(t) - float(s)))
        else:
            out.undelivered += 1
            code = str(rec.get("c") or "UNKNOWN")
            out.reasons[code] = out.reasons.get(code, 0) + 1
    out.unmatched = sum(1 for _ in _lines(run_dir / UNMATCHED))
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def delivery_report(run_dir: Path, sent: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report's delivery figures (rate, send → delivery p50/p90/p99 in seconds, undelivered
    reasons by code) and its charts (deliveries per minute, reasons); empty without receipts."""
    counts = delivery_counts(run_dir)
    if not counts.delivered and not counts.undelivered:
        return {}, {}
    lat = sorted(counts.latencies)
    fields: dict[str, Any] = {
        **counts.as_status(sent),
        "delivery_rate": round(counts.delivered / sent, 4) if sent else None,
        **{
            f"delivery_{q}_s": round(_percentile(lat, v), 3) if lat else None
            for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
        "undelivered_reasons": dict(sorted(counts.reasons.items(), key=lambda kv: -kv[1])),
    }
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    charts: dict[str, bytes] = {}
    if counts.delivered_at:
        t0 = min(counts.delivered_at)
        minutes = np.bincount(((np.asarray(counts.delivered_at) - t0) // 60).astype(np.int64))
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.plot(np.arange(len(minutes)), minutes, linewidth=1.2)
        ax.set(title="deliveries per minute", xlabel="minutes since the first delivery", ylabel="recipients")
        charts["deliveries_per_minute.png"] = png(fig)
    if counts.reasons:
        reasons = fields["undelivered_reasons"]
        fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(reasons) + 1)))
        ax.barh(list(reasons), list(reasons.values()), color="#aa4444")
        ax.set(title="undelivered by provider code", xlabel="recipients")
        ax.invert_yaxis()
        charts["undelivered_reasons.png"] = png(fig)
    return fields, charts


EXPORT_FIELDS = ("delivery", "delivery_code", "delivered_at")


def with_delivery(records: Iterable[dict[str, Any]], run_dir: Path) -> Iterator[dict[str, Any]]:
    """Export rows joined with their receipt: ``delivery`` delivered | undelivered | (empty),
    the provider's code and the report time."""
    receipts = final_receipts(run_dir)
    for rec in records:
        r = receipts.get(rec["row"])
        if r is None:
            yield {**rec, "delivery": None, "delivery_code": None, "delivered_at": None}
        else:
            state = "delivered" if r.get("d") else "undelivered"
            yield {**rec, "delivery": state, "delivery_code": r.get("c"), "delivered_at": r.get("t")}
