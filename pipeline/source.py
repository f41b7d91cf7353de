"""Source: stream recipient rows from a file, in chunks, with memory flat.

A source yields chunks of ``(row, record)`` pairs where ``row`` is a stable
1-based position (the CSV record number, the JSONL line number) and ``record``
maps column names to values, or is a string naming why the row is unreadable
(the engine writes it to the ledger as a ``rejected`` line). For the engine, a CSV
chunk whose records all have the header's width comes as :class:`Columns` instead:
the same rows, without a dict per row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import numpy as np
import orjson

from pipeline.errors import SourceError

if TYPE_CHECKING:
    from pipeline.app.campaign import Campaign

__all__ = (
    "Chunk",
    "Columns",
    "CsvSource",
    "JsonlSource",
    "Record",
    "Rows",
    "Source",
    "check_decoded",
    "compare_file_fingerprints",
    "file_fingerprint",
    "file_shard",
    "record_offset",
    "shard_rows",
)

Record = Mapping[str, object] | str
"""Column values, or the reason the row could not be read."""

Rows = list[tuple[int, Record]]

CHUNK_ROWS = 2000


@dataclass(slots=True)
class Columns:
    """Consecutive CSV records, every one of the header's width, kept as columns.

    Rows ``first`` to ``first + len(self) - 1``; the engine renders these without a dict
    per row (the dicts cost more than parsing the CSV). :meth:`records` gives the usual rows.
    """

    first: int
    header: list[str]
    values: list[tuple[str, ...]]  # one tuple per header column

    def __len__(self) -> int:
        return len(self.values[0]) if self.values else 0

    def column(self, name: str) -> tuple[str, ...] | None:
        """The values of column ``name`` (the last of that name, as a record's dict has it)."""
        for i in range(len(self.header) - 1, -1, -1):
            if self.header[i] == name:
                return self.values[i]
        return None

    def __iter__(self) -> Iterator[tuple[int, Record]]:
        return iter(self.records())

    def records(self) -> Rows:
        header = self.header
        return [
            (self.first + i, dict(zip(header, cells, strict=True)))
            for i, cells in enumerate(zip(*self.values, strict=True))
        ]


csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Shard = tuple[int, int]
"""(i, n) of ``source.shard = "i/n"``: the rows whose number is congruent to i - 1 modulo n."""


def file_shard(kind: str, shard: str | None) -> Shard | None:
    """The shard a CSV or JSONL source is read as, or None (unsharded, or a database source,
    whose query selects its shard itself)."""
    if shard is None or kind not in ("csv", "jsonl"):
        return None
    i, n = shard.split("/")
    return int(i), int(n)


def shard_rows(rows: int, shard: Shard | None) -> int:
    """How many of rows 1..``rows`` belong to ``shard`` (all of them when None)."""
    if shard is None:
        return rows
    i, n = shard
    return max(0, (rows - i) // n + 1)


Chunk = Rows | Columns
"""What a source yields: rows, or (CSV, for the engine) the same rows as columns."""


class Source(Protocol):
    """A stream of recipient rows."""

    def columns(self) -> list[str] | None:
        """The column names when known before reading (a CSV header), else None."""
        ...

    def chunks(self) -> AsyncIterator[Chunk]:
        """Every row in order, in chunks of a few thousand."""
        ...

    def fingerprint(self) -> dict[str, object]:
        """Identifies the data, so a resume against changed data is caught."""
        ...


def file_fingerprint(path: Path) -> dict[str, object]:
    """Size and a SHA-256 of the whole file, so that any change to it is caught (the hash
    runs at ~1 GB/s: 0.03–0.06 s for a million-row, 36 MB CSV; README, "Run directories")."""
    size, digest, last = _hash_prefix(path, None)
    return {"path": str(path), "size": size, "sha256": digest, "ends_newline": last == b"\n"}


def _hash_prefix(path: Path, limit: int | None) -> tuple[int, str, bytes]:
    """(bytes hashed, hex SHA-256 of the first ``limit`` bytes or all, the last byte hashed)."""
    digest = hashlib.sha256()
    size = 0
    last = b""
    try:
        with path.open("rb") as f:
            while limit is None or size < limit:
                block = f.read(1 << 20 if limit is None else min(1 << 20, limit - size))
                if not block:
                    break
                digest.update(block)
                size += len(block)
                last = block[-1:]
    except OSError as exc:
        raise SourceError(f"cannot read source {path}: {exc.strerror}") from None
    return size, digest.hexdigest(), last


def compare_file_fingerprints(pinned: dict[str, object], current: dict[str, object]) -> str:
    """``same``; ``appended``: the pinned bytes are all still there, whole lines added after
    them; ``changed``: anything else (an edit of any length, rows inserted, removed, reordered)."""
    if pinned == current:
        return "same"
    size = pinned.get("size")
    if "sha256" not in pinned or not isinstance(size, int):  # a fingerprint of an older sluice
        return "changed"
    current_size = current.get("size")
    if not isinstance(current_size, int) or current_size <= size or not pinned.get("ends_newline"):
        return "changed"
    _, digest, _ = _hash_prefix(Path(str(current["path"])), size)
    return "appended" if digest == pinned["sha256"] else "changed"


@dataclass
class CsvSource:
    """A CSV file with a header row (UTF-8 with an optional BOM, GB18030 or UTF-16 with a BOM)."""

    path: Path
    delimiter: str = ","
    encoding: str = "utf-8"  # utf-8 | gb18030 | utf-16 (campaign.ENCODINGS)
    # settled(first, stop): a flag per row first..stop-1 (shorter past the last one known),
    # 1 for a row settled earlier (admission's decision): yielded with only the ``keep``
    # columns, sparing a dict of every column.
    settled: Callable[[int, int], bytes] | None = None
    keep: tuple[str, ...] = ()
    # True: a chunk whose records all have the header's width comes as Columns (the engine's
    # choice); any other chunk, and every chunk when False, as rows.
    columnar: bool = False
    # Leading records the caller needs nothing of (a resume's settled prefix, no keys to
    # check): passed over by counting lines, without parsing, where the file allows it.
    skip_records: int = 0
    rows_before: int = 0  # records passed over that way (the engine counts them as read)
    shard: Shard | None = None  # rows_before counts this shard's records only

    def _open(self) -> tuple[Iterator[list[str]], list[str] | None, object]:
        try:
            with self.path.open("rb") as raw:
                head = raw.read(4)
            f = self.path.open(encoding=_CODECS[self.encoding], errors="surrogateescape", newline="")
        except OSError as exc:
            raise SourceError(f"cannot open source {self.path}: {exc.strerror}") from None
        has_utf16_bom = head[:2] in (b"\xff\xfe", b"\xfe\xff")
        if has_utf16_bom != (self.encoding == "utf-16") and head:
            f.close()
            if has_utf16_bom:
                raise SourceError(
                    f'{self.path} is UTF-16 (it starts with its BOM): set [source] encoding = "utf-16"'
                )
            raise SourceError(f"{self.path} has no UTF-16 byte order mark: save it as UTF-16 with a BOM")
        reader = csv.reader(f, delimiter=self.delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            f.close()
            raise SourceError(f"cannot read the header of {self.path}: {exc}") from None
        if header is not None:
            header = [h.strip() for h in header]
        return reader, header, f

    def columns(self) -> list[str] | None:
        _, header, f = self._open()
        f.close()  # type: ignore[attr-defined]
        return header

    def fingerprint(self) -> dict[str, object]:
        return {"kind": "csv", **file_fingerprint(self.path)}

    async def chunks(self) -> AsyncIterator[Chunk]:
        reader, header, f = self._open()
        try:
            if header is None:
                return
            row = 0
            # Counting newline bytes finds records in UTF-8 and GB18030 (no multi-byte character
            # holds a newline or a quote byte), not in UTF-16.
            countable = self.skip_records > 0 and self.encoding != "utf-16"
            offset = record_offset(self.path, self.skip_records) if countable else None
            if offset is not None:
                f.close()  # type: ignore[attr-defined]
                raw = self.path.open("rb")
                raw.seek(offset)
                f = io.TextIOWrapper(raw, encoding=self.encoding, errors="surrogateescape", newline="")
                reader = csv.reader(f, delimiter=self.delimiter)
                row = self.skip_records
                self.rows_before = shard_rows(row, self.shard)
            keep_at = [(c, header.index(c)) for c in self.keep if c in header]
            width = len(header)
            while True:
                block: list[list[str]] = []
                error = None
                try:
                    for values in reader:
                        if values:  # a blank line is not a record
                            block.append(values)
                            if len(block) >= CHUNK_ROWS:
                                break
                except csv.Error as exc:
                    error = f"unreadable CSV record: {exc}"
                if error is None and not block:
                    break  # end of file
                if self.columnar and error is None and set(map(len, block)) == {width}:
                    yield Columns(row + 1, header, list(zip(*block, strict=True)))
                else:
                    flags = self.settled(row + 1, row + 1 + len(block)) if self.settled else b""
                    chunk = self._as_rows(block, header, row, keep_at, flags)
                    if error is not None:
                        chunk.append((row + len(block) + 1, error))
                    yield chunk
                row += len(block) + (error is not None)
                await anyio.lowlevel.checkpoint()
        finally:
            f.close()  # type: ignore[attr-defined]

    @staticmethod
    def _as_rows(
        block: list[list[str]],
        header: list[str],
        row: int,
        keep_at: list[tuple[str, int]],
        settled: bytes,
    ) -> Rows:
        """Records after row ``row`` as rows (those flagged in ``settled``, from the first of
        them on, with only the kept columns)."""
        out: Rows = []
        n_flags = len(settled)
        for i, values in enumerate(block):
            row += 1
            if i < n_flags and settled[i]:
                out.append((row, {c: values[i] for c, i in keep_at if i < len(values)}))
            else:
                # zip stops at the shorter side: extra cells dropped, missing absent
                out.append((row, dict(zip(header, values))))  # noqa: B905
        return out


_CODECS = {"utf-8": "utf-8-sig", "gb18030": "gb18030", "utf-16": "utf-16"}


def check_decoded(chunk: Chunk, campaign: Campaign) -> None:
    """Raise SourceError when ``chunk``, the first of a CSV file, holds bytes that are not in the
    campaign's ``[source] encoding``, naming the encoding that reads them where another does.
    With ``[limits] max_reject_ratio = 1`` such rows are rejected one by one instead."""
    if campaign.source.kind != "csv" or campaign.limits.max_reject_ratio >= 1:
        return
    encoding, path = campaign.source.encoding, campaign.source.path
    if isinstance(chunk, Columns):
        texts = ["\x1f".join(column) for column in chunk.values]
    else:
        texts = ["\x1f".join(map(str, rec.values())) for _, rec in chunk if not isinstance(rec, str)]
    bad = next((t for t in texts if not _decodes(t)), None)
    if bad is None:
        return
    raw = bad.encode(encoding, "surrogateescape")  # the bytes as the file has them (no BOM)
    hint = "save it as UTF-8, or set [source] encoding to the one it is in"
    for other in ("utf-8", "gb18030"):
        if other != encoding and _decodes_as(raw, other):
            hint = f'it reads as {other}: set [source] encoding = "{other}"'
            break
    raise SourceError(f"{path} is not {encoding} (its first rows hold bytes that do not decode): {hint}")


def _decodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape: a byte the codec could not decode
        return False
    return True


def _decodes_as(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def record_offset(path: Path, records: int, block_size: int = 1 << 20) -> int | None:
    """The byte offset where CSV record ``records + 1`` starts (after the header line), or
    None where counting lines could disagree with the CSV reader: a quote, a bare CR or a
    NUL before that point, or fewer records in the file."""
    with path.open("rb") as f:
        head = f.readline()
        if not head.endswith(b"\n") or b'"' in head or b"\r" in head[:-2]:
            return None
        offset = len(head)  # of the start of ``carry``
        carry = b""
        left = records
        while True:
            data = f.read(block_size)
            if not data:
                return None
            block = carry + data
            # a CR that ends the block may start a CRLF the next block ends (it stays in the carry)
            bare_cr = block.count(b"\r") - block.endswith(b"\r") != block.count(b"\r\n")
            if b'"' in block or b"\x00" in block or bare_cr:
                return None
            buf = np.frombuffer(block, np.uint8)
            ends = np.flatnonzero(buf == 10)
            if len(ends):
                starts = np.empty_like(ends)
                starts[0] = 0
                starts[1:] = ends[:-1] + 1
                length = ends - starts
                # a blank line ("" or "\r" before the newline) is not a record
                is_record = (length > 1) | ((length == 1) & (buf[starts] != 13))
                counted = np.cumsum(is_record)
                if counted[-1] >= left:
                    at = int(np.searchsorted(counted, left))
                    return offset + int(ends[at]) + 1
                left -= int(counted[-1])
                cut = int(ends[-1]) + 1
                offset += cut
                carry = block[cut:]
            else:
                carry = block


@dataclass
class JsonlSource:
    """One JSON object per line; the row is the line number; blank lines skipped."""

    path: Path
    only: Shard | None = None  # lines of other shards are not parsed, nor yielded

    def columns(self) -> list[str] | None:
        return None

    def fingerprint(self) -> dict[str, object]:
        return {"kind": "jsonl", **file_fingerprint(self.path)}

    async def chunks(self) -> AsyncIterator[Rows]:
        try:
            f = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot open source {self.path}: {exc.strerror}") from None
        with f:
            line_no = 0
            chunk: Rows = []
            i, n = self.only or (1, 1)
            for line in f:
                line_no += 1
                if (line_no - i) % n or not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    chunk.append((line_no, f"invalid JSON: {exc.msg}"))
                else:
                    if isinstance(obj, dict):
                        chunk.append((line_no, obj))
                    else:
                        chunk.append((line_no, "a line must hold a JSON object"))
                if len(chunk) >= CHUNK_ROWS:
                    yield chunk
                    chunk = []
                    await anyio.lowlevel.checkpoint()
            if chunk:
                yield chunk
