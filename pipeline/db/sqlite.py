"""SQLite sources (``sqlite3``, read-only, every call in a worker thread)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from pipeline.app.campaign import SourceSpec
from pipeline.db.source import DbSource
from pipeline.db.sql import Page, Session, Sql, Stats, require_key
from pipeline.errors import CampaignError, SourceError

__all__ = ("SqliteSource",)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # bad bytes are rejected by the renderer


class _SqliteSession:
    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self.conn = conn
        self.where = where

    def convert(self, columns: Sequence[str]) -> list[int]:
        return []  # text, integers, reals; a BLOB stays bytes and the renderer rejects it

    def _error(self, exc: sqlite3.Error) -> SourceError:
        return SourceError(f"SQLite {self.where}: {exc}")

    async def fetch(self, sql: str, params: Sequence[Any]) -> Page:
        def run() -> Page:
            cur = self.conn.execute(sql, params)
            try:
                return [d[0] for d in cur.description], cur.fetchall()
            finally:
                cur.close()

        try:
            return await anyio.to_thread.run_sync(run)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    async def stream(self, sql: str, params: Sequence[Any], page_rows: int) -> AsyncGenerator[Page, None]:
        try:
            cur = await anyio.to_thread.run_sync(self.conn.execute, sql, params)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            names = [d[0] for d in cur.description]
            while True:
                try:
                    rows = await anyio.to_thread.run_sync(cur.fetchmany, page_rows)
                except sqlite3.Error as exc:
                    raise self._error(exc) from None
                if not rows:
                    return
                yield names, rows
        finally:
            cur.close()


class SqliteSource(DbSource):
    kind = "sqlite"

    @property
    def path(self) -> Path:
        return Path(self.spec.path)

    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> Sql:
        return Sql(spec, columns, pg=False)

    def _identity(self) -> dict[str, object]:
        return {"path": str(self.path)}

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise SourceError(f"cannot open source {self.path}: no such file")
        try:
            conn = sqlite3.connect(
                f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as exc:
            raise SourceError(f"cannot open SQLite database {self.path}: {exc}") from None
        conn.text_factory = _decode
        return conn

    def _stats(self) -> Stats:
        spec, sql = self.spec, self.sql
        conn = self._connect()
        try:
            try:
                cur = conn.execute(sql.probe())
                columns = [d[0] for d in cur.description]
                cur.close()
            except sqlite3.Error as exc:
                raise self._explain(exc) from None
            require_key(spec, columns)
            k = sql.key
            query, params = sql.stats([f"typeof({k}) <> 'integer'", f"typeof({k}) = 'blob'"])
            try:
                if self._readable(columns):
                    conn.execute(sql.page(False), [*sql.params, 1]).fetchall()  # the first row, as read
                nulls, rows, lo, hi, non_int, blobs = conn.execute(query, params).fetchone()
            except sqlite3.Error as exc:
                raise self._explain(exc) from None
        finally:
            conn.close()
        if blobs:
            raise CampaignError("source.key", f"{spec.key!r} holds BLOB values, which cannot be paged by")
        return Stats(columns, non_int == 0, nulls, rows, lo, hi)

    def _explain(self, exc: sqlite3.Error) -> Exception:
        msg = str(exc)
        if self.spec.table is not None and msg.startswith("no such table"):
            return CampaignError("source.table", f"no table {self.spec.table!r} in {self.path}")
        broken = "not a database" in msg or "unable to open" in msg or "malformed" in msg
        if self.spec.query is not None and not broken:
            return CampaignError("source.query", f"the query fails: {msg}")
        return SourceError(f"cannot read SQLite database {self.path}: {msg}")

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Session]:
        conn = self._connect()
        try:
            yield _SqliteSession(conn, str(self.path))
        finally:
            conn.close()
