"""A database source: pages in key order, row numbers, checkpoints (see :mod:`pipeline.db`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from pathlib import Path
from typing import Any, ClassVar

import orjson

from pipeline.app.campaign import SourceSpec
from pipeline.db.checkpoints import Checkpoint
from pipeline.db.sql import Session, Sql, Stats, Values, json_key
from pipeline.errors import CampaignError, SourceError
from pipeline.source import CHUNK_ROWS, Rows

__all__ = ("KEY_ROW_MAX", "PAGE_ROWS", "DbSource")

PAGE_ROWS = CHUNK_ROWS
KEY_ROW_MAX = 200_000_000  # row_number = "key": half a status byte per key value up to here


class _Unset:
    pass


_UNSET = _Unset()


class DbSource:
    """Rows of a table or query in key order (see the module docstring)."""

    kind: ClassVar[str]

    def __init__(
        self,
        spec: SourceSpec,
        columns: Sequence[str],
        *,
        checkpoints: Path | None = None,
        start: Checkpoint | None = None,
    ) -> None:
        assert spec.key is not None
        self.spec = spec
        self.key = spec.key
        self.sql = self._make_sql(spec, columns)
        self.read_columns = list(columns)
        self.checkpoints = checkpoints
        self.start = start
        self.rows_before = start.n if start is not None else 0
        self._inspected: tuple[list[str], dict[str, object]] | None = None

    # backend hooks
    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> Sql:
        raise NotImplementedError

    def _stats(self) -> Stats:
        raise NotImplementedError

    def _session(self) -> AbstractAsyncContextManager[Session]:
        raise NotImplementedError

    def _identity(self) -> dict[str, object]:
        raise NotImplementedError

    def _readable(self, columns: Sequence[str]) -> bool:
        """Whether a first row can be read (a missing column is named by the caller instead)."""
        return self.spec.table is None or all(c in columns for c in self.read_columns)

    # Source protocol
    def columns(self) -> list[str] | None:
        return self._inspect()[0]

    def fingerprint(self) -> dict[str, object]:
        return self._inspect()[1]

    def _inspect(self) -> tuple[list[str], dict[str, object]]:
        """Check the source (connect, columns, key) and fingerprint it; once per object."""
        if self._inspected is not None:
            return self._inspected
        spec = self.spec
        st = self._stats()
        if st.nulls:
            raise CampaignError(
                "source.key",
                f"{st.nulls} rows have a NULL {spec.key!r}: they have no place in key order "
                "(filter them out with a query, or choose another key)",
            )
        if spec.row_number == "key" and st.rows:
            bound = min(KEY_ROW_MAX, max(8 * st.rows, 1_000_000))
            if not st.integer_key or not isinstance(st.key_min, int) or not isinstance(st.key_max, int):
                raise CampaignError(
                    "source.row_number", f'"key" needs an integer key; {spec.key!r} is not one'
                )
            if st.key_min < 1 or st.key_max > bound:
                raise CampaignError(
                    "source.row_number",
                    f'"key" needs keys from 1 to {bound:,} for {st.rows:,} rows; {spec.key!r} spans '
                    f'{st.key_min:,}..{st.key_max:,} (use "rank")',
                )
        fp: dict[str, object] = {"kind": spec.kind, **self._identity()}
        if spec.table is not None:
            fp["table"] = spec.table
        else:
            assert spec.query is not None
            fp["query_sha256"] = hashlib.sha256(spec.query.encode()).hexdigest()
        fp.update(key=spec.key, row_number=spec.row_number)
        for name in ("shard", "key_from", "key_to"):
            if getattr(spec, name) is not None:
                fp[name] = getattr(spec, name)
        fp.update(rows=st.rows, key_min=json_key(st.key_min), key_max=json_key(st.key_max))
        self._inspected = (st.columns, fp)
        return self._inspected

    async def chunks(self) -> AsyncIterator[Rows]:
        by_key = self.spec.row_number == "key"
        n = self.rows_before
        prev: Any = self.start.key if self.start is not None else _UNSET
        fd = -1
        if self.checkpoints is not None:
            fd = os.open(self.checkpoints, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            async with self._session() as session, aclosing(self._pages(session)) as pages:
                convert: list[int] | None = None
                async for names, page, at_end in pages:
                    ki = names.index(self.key)
                    if convert is None:
                        convert = session.convert(names)
                    chunk: Rows = []
                    for values in page:
                        n += 1
                        row: int = n
                        if by_key:
                            k = values[ki]
                            if type(k) is not int or not 1 <= k <= KEY_ROW_MAX:
                                raise SourceError(f'key {k!r} cannot be a row number (row_number = "key")')
                            if k == prev:
                                raise SourceError(
                                    f'key {k} is duplicated; row_number = "key" needs unique keys'
                                )
                            row = prev = k
                        if convert:
                            text = list(values)
                            for i in convert:
                                if text[i] is not None:
                                    text[i] = str(text[i])
                            values = text
                        chunk.append((row, dict(zip(names, values, strict=True))))
                    j = _last_boundary(page, ki, at_end)
                    if fd >= 0 and j is not None:
                        line = {"row": chunk[j][0], "n": n - len(page) + j + 1, "key": json_key(page[j][ki])}
                        os.write(fd, orjson.dumps(line) + b"\n")
                    yield chunk
        finally:
            if fd >= 0:
                os.close(fd)

    async def _pages(self, session: Session) -> AsyncGenerator[tuple[list[str], list[Values], bool], None]:
        """Pages of rows in key order; the flag says the page ends at a key boundary."""
        after: Any = self.start.key if self.start is not None else _UNSET
        sql, fixed = self.sql, self.sql.params
        if self.spec.snapshot:
            params = [*fixed, after] if after is not _UNSET else fixed
            async with aclosing(session.stream(sql.stream(after is not _UNSET), params, PAGE_ROWS)) as stream:
                async for names, rows in stream:
                    yield names, rows, False
            return
        while True:
            params = [*fixed, after] if after is not _UNSET else list(fixed)
            names, rows = await session.fetch(sql.page(after is not _UNSET), [*params, PAGE_ROWS + 1])
            if len(rows) <= PAGE_ROWS:
                if rows:
                    yield names, rows, True
                return
            ki = names.index(self.key)
            cut = PAGE_ROWS
            while cut and rows[cut - 1][ki] == rows[cut][ki]:
                cut -= 1
            if cut == 0:  # one key fills the page: read all of its rows at once
                names, rows = await session.fetch(sql.equal(), [*fixed, rows[0][ki]])
                cut = len(rows)
            page = rows[:cut]
            after = page[-1][ki]
            yield names, page, True


def _last_boundary(page: Sequence[Values], ki: int, at_end: bool) -> int | None:
    """The index of the last row of ``page`` after which the key changes, if known."""
    j = len(page) - 1
    if at_end:
        return j
    while j > 0:
        if page[j - 1][ki] != page[j][ki]:
            return j - 1
        j -= 1
    return None
