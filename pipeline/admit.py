"""Admission: which rows of the source become messages, and why the others do not.

One stage, used by a run, a resume, ``--dry-run`` and ``reconcile``::

    source rows ──▶ skip rows settled earlier (the ledger's state, a resume)
                ──▶ keys: missing, not UTF-8, duplicated
                ──▶ render (phone, sign name, parameters, content; per-provider checks)
                ──▶ suppression list (phone or key) ──▶ phone dedupe ──▶ messages

Every row not admitted gets a reject reason, handed to ``on_reject`` (the ledger in a
run, a tally in a dry run). The columns any source reads come from the templates
through :func:`columns_needed`. What a resume skips is decided here, from the ledger's
state; sources only yield rows (a CSV source is told which rows need no more than their
key and phone; a database source where to start).

A CSV chunk of :class:`~pipeline.source.Columns` is admitted without a dict per row when
it is the common case (no suppression, no phone dedupe): the product's fast path,
guarded by differential tests against the row path.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Container, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from pipeline.app.campaign import DB_KINDS, Campaign
from pipeline.keys import KeySet, plain_keys
from pipeline.ledger import Status, StatusArray
from pipeline.render import Renderer, Template, campaign_text_limit, normalize_phone
from pipeline.source import Chunk, Columns, CsvSource, JsonlSource, Shard, Source, file_shard
from providers.base import Message

if TYPE_CHECKING:
    from pipeline.db import Checkpoint

__all__ = (
    "Admission",
    "Rejects",
    "columns_needed",
    "load_suppression",
    "make_renderer",
    "open_source",
    "recipients",
    "resume_checkpoint",
    "skip_table",
    "source_columns",
)

log = structlog.get_logger("sluice.admit")

Rejects = list[tuple[int, str, str]]
"""(row, key, reason) of rows not admitted."""


def columns_needed(campaign: Campaign) -> dict[str, str]:
    """Every column the campaign reads, in reading order, with the setting that names it:
    the key, the phone, then the columns of the sign name, the parameters and the content."""
    spec, message = campaign.source, campaign.message
    sign, params = campaign.templates()
    needed: dict[str, str] = {}
    if spec.key:
        needed[spec.key] = "source.key"
    needed.setdefault(spec.phone, "source.phone")
    for column in sign.columns:
        needed.setdefault(column, "message.sign_name")
    for name, template in params.items():
        for column in template.columns:
            needed.setdefault(column, f"message.params.{name}")
    if message.content is not None:
        for column in Template.compile(message.content).columns:
            needed.setdefault(column, "message.content")
    return needed


def source_columns(campaign: Campaign) -> list[str]:
    """The columns a source reads for ``campaign`` (see :func:`columns_needed`)."""
    return list(columns_needed(campaign))


def make_renderer(campaign: Campaign) -> Renderer:
    sign, params = campaign.templates()
    content = campaign.message.content
    return Renderer(
        phone_column=campaign.source.phone,
        sign_name=sign,
        params=params,
        content=Template.compile(content) if content is not None else None,
        default_country=campaign.source.default_country,
        text_limit=campaign_text_limit(campaign),
    )


def skip_table(*, resend_unknown: bool) -> bytes:
    """Indexed by a row's status byte: 1 = settled, not sent again."""
    skip = bytearray(256)
    for st in (Status.SENT, Status.FAILED, Status.REJECTED):
        skip[st] = 1
    if not resend_unknown:
        skip[Status.UNKNOWN] = 1
    return bytes(skip)


def load_suppression(campaign: Campaign) -> KeySet:
    """The suppression file: one phone number (any common format) or key per line."""
    entries: list[str] = []
    path = Path(campaign.source.suppress or "")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            entries.append(entry)
            phone = normalize_phone(entry, campaign.source.default_country)
            if phone is not None:
                entries.append(phone)
    suppressed = KeySet()
    suppressed.add(entries)
    log.info("suppression_loaded", entries=suppressed.size)
    return suppressed


def open_source(
    campaign: Campaign,
    *,
    run_dir: Path | None = None,
    status: StatusArray | None = None,
    skip: bytes | None = None,
    columnar: bool = False,
) -> Source:
    """The campaign's source. Given the ledger's statuses and the ``skip`` table of a resume,
    rows settled earlier are read no further than admission needs: a CSV source keeps only
    their key and phone (none of a leading run of them when nothing is needed), a database
    source starts after its last settled checkpoint in ``run_dir``.

    A file shard (``source.shard``) is read whole, other shards' rows kept to what
    de-duplication reads (a CSV's key and phone; a JSONL line not even parsed when nothing is);
    :class:`Admission` passes over them."""
    spec = campaign.source
    resuming = status is not None and skip is not None and len(status) > 1
    shard = file_shard(spec.kind, spec.shard)
    needed = tuple(c for c in (spec.key, spec.phone if spec.dedupe_phone else None) if c)
    if spec.kind in DB_KINDS:
        from pipeline.db import CHECKPOINTS, open_db_source, read_checkpoints

        checkpoints = run_dir / CHECKPOINTS if run_dir is not None else None
        start = None
        if checkpoints is not None and resuming:
            assert status is not None and skip is not None
            start = resume_checkpoint(status, skip, read_checkpoints(checkpoints))
            if start is not None:
                log.info("source_resume", after_row=start.row, rows_before=start.n)
        return open_db_source(spec, source_columns(campaign), checkpoints=checkpoints, start=start)
    if spec.kind == "csv":
        settled = None
        keep: tuple[str, ...] = ()
        prefix = 0
        if resuming:
            assert status is not None and skip is not None
            rows_status, table = status, skip
            settled = lambda first, stop: rows_status.flags(table, first, stop)  # noqa: E731
            # Rows a resume skips only need what de-duplication reads: the key and the phone.
            keep = needed
            if not keep:
                # Nothing is read from settled rows: the leading run of them is not even parsed.
                end = _first_open(status, bytes(not flag for flag in skip), shard)
                prefix = (len(status) if end < 0 else end) - 1
        if shard is not None:
            keep = needed
            settled = _or_foreign(settled, shard)
        return CsvSource(
            Path(spec.path),
            delimiter=spec.delimiter,
            encoding=spec.encoding,
            settled=settled,
            keep=keep,
            columnar=columnar,
            skip_records=prefix,
            shard=shard,
        )
    return JsonlSource(Path(spec.path), only=shard if shard is not None and not needed else None)


def _first_open(status: StatusArray, acts: bytes, shard: Shard | None) -> int:
    """The first row (of ``shard``, or any) whose status ``acts`` flags, or -1."""
    if shard is None:
        return status.first(acts, 1)
    i, n = shard
    window = n << 16
    for start in range(1, len(status), window):
        flags = status.flags(acts, start, min(start + window, len(status)))
        offset = (i - start) % n
        at = flags[offset::n].find(1)
        if at >= 0:
            return start + offset + at * n
    return -1


def _or_foreign(settled: Callable[[int, int], bytes] | None, shard: Shard) -> Callable[[int, int], bytes]:
    """``settled``'s flags with every row of another shard flagged too (read for its key only)."""
    i, n = shard

    def flags(first: int, stop: int) -> bytes:
        out = bytearray(b"\x01" * (stop - first))
        out[(i - first) % n :: n] = bytes(len(range((i - first) % n, stop - first, n)))
        if settled is not None:
            own = settled(first, stop)
            for p in range((i - first) % n, len(own), n):
                out[p] = own[p]
        return bytes(out)

    return flags


class Admission:
    """Admits the rows of one pass over the source, in order (keys and phones seen so far
    are remembered); ``status`` and ``skip`` say which rows were settled by an earlier run."""

    def __init__(
        self,
        campaign: Campaign,
        on_reject: Callable[[Rejects], None],
        *,
        status: StatusArray | None = None,
        skip: bytes | None = None,
    ) -> None:
        self.campaign = campaign
        self.on_reject = on_reject
        self.status = status if status is not None else StatusArray()
        self.skip = skip if skip is not None else bytes(256)
        # Rows from here on were not settled when the pass began (the array grows as this run
        # settles rows it has already read): a fresh run never looks the status up.
        self.settled_end = len(self.status)
        self.key_col = campaign.source.key
        self.renderer = make_renderer(campaign)
        self.keys = KeySet() if self.key_col else None
        self.phones = KeySet() if campaign.source.dedupe_phone else None
        self.suppressed = load_suppression(campaign) if campaign.source.suppress else None
        # A file shard: other shards' rows count for de-duplication only (not rendered, not read).
        self.shard = file_shard(campaign.source.kind, campaign.source.shard)
        self.rows_read = 0  # of this shard

    def admit(self, chunk: Chunk) -> list[Message]:
        """The messages to send from ``chunk``; the other rows' reasons go to ``on_reject``."""
        if isinstance(chunk, Columns):
            out = self._admit_columns(chunk)
            if out is not None:
                self.rows_read += len(self._own(chunk.first, len(chunk)))
                return out
            chunk = chunk.records()
        own_i, own_n = self.shard or (1, 1)
        status = self.status
        n_status = self.settled_end
        skip = self.skip
        key_col = self.key_col
        dup: list[bool] | None = None
        keys: list[str]
        if key_col is None:
            keys = [str(row) for row, _ in chunk]
        else:
            keys = []
            for row, rec in chunk:
                value = rec.get(key_col) if not isinstance(rec, str) else None
                keys.append(str(row) if value is None or value == "" else str(value))
            assert self.keys is not None
            dup = self.keys.add(keys)
        rejects: Rejects = []
        todo: list[tuple[int, str, Mapping[str, object]]] = []
        skipped_phones: list[str] = []
        foreign_phones: list[tuple[int, str]] = []
        spec_country = self.campaign.source.default_country
        own_rows = 0
        for i, (row, rec) in enumerate(chunk):
            if (row - own_i) % own_n:  # another shard's row: a settled row of sorts
                if self.phones is not None and not isinstance(rec, str):
                    phone = normalize_phone(str(rec.get(self.campaign.source.phone, "")), spec_country)
                    if phone is not None:
                        foreign_phones.append((row, phone))  # taken, as far as this shard can tell
                continue
            own_rows += 1
            if row < n_status and skip[status[row]]:
                # A settled row holds its number unless it was rejected (then it never took it).
                if self.phones is not None and not isinstance(rec, str) and status[row] != Status.REJECTED:
                    raw = str(rec.get(self.campaign.source.phone, ""))
                    phone = normalize_phone(raw, self.campaign.source.default_country)
                    if phone is not None:
                        skipped_phones.append(phone)  # settled earlier: still taken
                continue
            key = keys[i]
            if isinstance(rec, str):
                rejects.append((row, key, rec))
            elif key_col is not None and rec.get(key_col) in (None, ""):
                rejects.append((row, key, f"missing key column {key_col!r}"))
            elif not key.isascii() and not _valid_text(key):
                rejects.append((row, key, f"invalid UTF-8 in key column {key_col!r}"))
            elif dup is not None and dup[i]:
                rejects.append((row, key, "duplicate key"))
            else:
                todo.append((row, key, rec))
        out, bad = self.renderer.render_rows(todo)
        rejects.extend(bad)
        if self.suppressed is not None and out:
            by_phone = self.suppressed.contains([m.phone for m in out])
            by_key = self.suppressed.contains([m.key for m in out])
            kept = []
            for m, p, k in zip(out, by_phone, by_key, strict=True):
                if p or k:
                    rejects.append((m.row, m.key, "suppressed"))
                else:
                    kept.append(m)
            out = kept
        if self.phones is not None:
            self.phones.add(skipped_phones)
            if foreign_phones:  # in row order with this shard's: the earlier row keeps the number
                entries = sorted(
                    [(m.row, m.phone, i) for i, m in enumerate(out)] + [(r, p, -1) for r, p in foreign_phones]
                )
                dup_phone = [False] * len(out)
                for (_, _, i), d in zip(entries, self.phones.add([p for _, p, _ in entries]), strict=True):
                    if i >= 0:
                        dup_phone[i] = d
            else:
                dup_phone = self.phones.add([m.phone for m in out])
            pairs = list(zip(out, dup_phone, strict=True))
            rejects.extend((m.row, m.key, "duplicate phone") for m, d in pairs if d)
            out = [m for m, d in pairs if not d]
        if rejects:
            self.on_reject(rejects)
        self.rows_read += own_rows
        return out

    def _own(self, first: int, n: int) -> range:
        """The positions in a chunk of ``n`` rows from row ``first`` that are this shard's."""
        if self.shard is None:
            return range(n)
        i, step = self.shard
        return range((i - first) % step, n, step)

    def _admit_columns(self, chunk: Columns) -> list[Message] | None:
        """:meth:`admit` for a chunk of columns, with no dict per row; None (before any
        side effect) when the chunk is not the common case, which the row path then takes."""
        if self.phones is not None or self.suppressed is not None:
            return None
        first, n = chunk.first, len(chunk)
        status = self.status
        key_col = self.key_col
        rows = range(first, first + n)
        own = self._own(first, n)
        if first < self.settled_end:
            skipped = status.flags(self.skip, first, first + n)
            if 1 in skipped:  # rows settled earlier (a resume)
                mine = skipped[own.start :: own.step]
                if len(mine) < len(own) or 0 in mine:
                    return None  # some still to send: the row path sorts them out
                if key_col is not None:  # all settled: only their keys still count
                    column = chunk.column(key_col)
                    if column is None:
                        return None
                    assert self.keys is not None
                    self.keys.note([v or str(r) for r, v in zip(rows, column, strict=True)])
                return []
        if key_col is None:
            keys = list(map(str, rows))
            dup = None
        else:
            column = chunk.column(key_col)
            if column is None or not plain_keys(column):
                return None
            keys = list(column)
            assert self.keys is not None
            dup = self.keys.add(keys)
        rejects: Rejects = []
        values = chunk.values
        if self.shard is not None:  # only this shard's rows: the others counted for their keys
            keep = [False] * n
            for p in own:
                keep[p] = True
            if dup is not None:
                rejects = [(rows[p], keys[p], "duplicate key") for p in own if dup[p]]
                keep = [k and not d for k, d in zip(keep, dup, strict=True)]
            rows = list(itertools.compress(rows, keep))  # type: ignore[assignment]
            keys = list(itertools.compress(keys, keep))
            values = [tuple(itertools.compress(v, keep)) for v in values]
        elif dup is not None and any(dup):
            rejects = [(r, k, "duplicate key") for r, k, d in zip(rows, keys, dup, strict=True) if d]
            keep = [not d for d in dup]
            rows = list(itertools.compress(rows, keep))  # type: ignore[assignment]
            keys = list(itertools.compress(keys, keep))
            values = [tuple(itertools.compress(v, keep)) for v in values]
        out = self.renderer.render_columns(rows, keys, chunk.header, values, rejects)
        if out is None:  # not all rows of the common shape: render them one by one
            by_row = dict(chunk.records())
            out, bad = self.renderer.render_rows(
                [(r, k, by_row[r]) for r, k in zip(rows, keys, strict=True)]  # type: ignore[misc]
            )
            rejects.extend(bad)
        if rejects:
            self.on_reject(rejects)
        return out


async def recipients(campaign: Campaign, wanted: Container[int]) -> AsyncIterator[tuple[int, str, str]]:
    """(row, key, phone) of the ``wanted`` rows of the source, read as admission reads them
    (the same key and number normalisation); unreadable rows and bad numbers are left out."""
    key_col = campaign.source.key
    source = open_source(campaign)
    chunks = source.chunks()
    try:
        async for chunk in chunks:
            for row, rec in chunk:
                if row not in wanted or isinstance(rec, str):
                    continue
                raw = str(rec.get(campaign.source.phone, ""))
                phone = normalize_phone(raw, campaign.source.default_country)
                if phone is None:
                    continue
                value = rec.get(key_col) if key_col else None
                yield row, (str(row) if value is None or value == "" else str(value)), phone
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def resume_checkpoint(
    status: StatusArray, skip: bytes, checkpoints: Iterable[Checkpoint]
) -> Checkpoint | None:
    """The highest checkpoint whose rows are all settled, or None to read from the start.

    ``status`` holds a byte per ledger row, ``skip[b]`` is 1 for the statuses a
    resume does not send. A checkpoint (R, N) qualifies when rows 1..R hold N
    non-zero statuses and every one of them is skipped. With ``row_number =
    "rank"`` this means rows 1..N are all settled; with ``"key"`` the zeros
    between are key values absent from the table.
    """
    # the lowest row with a status a resume must act on (pending rows past the end aside)
    acts = bytes(1 if value and not skip[value] else 0 for value in range(256))
    i = status.first(acts, 1)
    first_open = len(status) if i < 0 else i
    best: Checkpoint | None = None
    zeros = 0
    counted = 1  # zeros counts the zero bytes in status[1:counted]
    for ck in sorted(checkpoints, key=lambda c: (c.row, c.n)):
        if ck.row < 1:
            continue
        if ck.row >= first_open:
            break
        zeros += status.count(0, counted, ck.row + 1)
        counted = ck.row + 1
        if ck.row - zeros == ck.n:
            best = ck
    return best


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
