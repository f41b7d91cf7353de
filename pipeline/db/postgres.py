"""PostgreSQL sources (psycopg 3, async; the DSN from the environment, never shown)."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.app.campaign import SourceSpec
from pipeline.db.source import DbSource
from pipeline.db.sql import Page, Session, Sql, Stats, require_key
from pipeline.errors import CampaignError, SourceError

if TYPE_CHECKING:
    import psycopg

__all__ = ("PostgresSource",)


# Types whose Python values the renderer takes as they are; others become text.
_PLAIN_OIDS = frozenset({16, 18, 19, 20, 21, 23, 25, 26, 700, 701, 1042, 1043})
_INT_OIDS = frozenset({20, 21, 23})
_BINARY_OIDS = frozenset({17})


class _PgSession:
    def __init__(self, conn: psycopg.AsyncConnection[Any], source: PostgresSource) -> None:
        self.conn = conn
        self.source = source
        self.cur = conn.cursor()
        self._types: list[int] = []

    def convert(self, columns: Sequence[str]) -> list[int]:
        # bytea stays bytes, which the renderer rejects like a BLOB
        return [i for i, oid in enumerate(self._types) if oid not in _PLAIN_OIDS and oid not in _BINARY_OIDS]

    def _names(self, cur: psycopg.AsyncCursor[Any]) -> list[str]:
        desc = cur.description or []
        self._types = [d.type_code for d in desc]
        return [d.name for d in desc]

    async def fetch(self, sql: str, params: Sequence[Any]) -> Page:
        import psycopg

        try:
            await self.cur.execute(sql.encode(), params)
            rows = await self.cur.fetchall()
        except psycopg.Error as exc:
            raise SourceError(self.source.describe(exc)) from None
        return self._names(self.cur), rows

    async def stream(self, sql: str, params: Sequence[Any], page_rows: int) -> AsyncGenerator[Page, None]:
        import psycopg

        conn = self.conn
        try:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            async with conn.transaction(), conn.cursor(name="sluice_source") as cur:
                await cur.execute(sql.encode(), params)
                while True:
                    rows = await cur.fetchmany(page_rows)
                    if not rows:
                        return
                    yield self._names(cur), rows
        except psycopg.Error as exc:
            raise SourceError(self.source.describe(exc)) from None


class PostgresSource(DbSource):
    kind = "postgres"
    _secret = ""  # the DSN's password, kept out of error messages

    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> Sql:
        return Sql(spec, columns, pg=True)

    def _identity(self) -> dict[str, object]:
        return {"dsn_env": self.spec.dsn_env}

    def _conninfo(self) -> dict[str, Any]:
        """Connection parameters from the environment (never stored, logged or shown)."""
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        env = self.spec.dsn_env
        assert env is not None
        dsn = os.environ.get(env, "")
        if not dsn.strip():
            raise SourceError(f"the environment variable {env} (source.dsn_env) is not set: it holds the DSN")
        try:
            params = conninfo_to_dict(dsn)
        except ProgrammingError:
            raise SourceError(f"the DSN in {env} is not a valid connection string") from None
        params.setdefault("connect_timeout", 10)
        params.setdefault("application_name", "sluice")
        self._secret = str(params.get("password") or "")
        return params

    def describe(self, exc: Exception) -> str:
        """A database error as one line, naming the DSN's variable, never its password."""
        msg = " ".join(str(exc).split())
        if len(self._secret) >= 4:
            msg = msg.replace(self._secret, "***")
        return f"PostgreSQL ({self.spec.dsn_env}): {msg}"

    def _explain(self, exc: psycopg.Error) -> Exception:
        state = exc.sqlstate or ""
        if self.spec.table is not None and state == "42P01":
            return CampaignError("source.table", f"no table {self.spec.table!r}: {self.describe(exc)}")
        if self.spec.query is not None and state[:2] in ("42", "22", "0A", "2F", "P0"):
            return CampaignError("source.query", f"the query fails: {self.describe(exc)}")
        if state == "42883" and (self.spec.key_from is not None or self.spec.key_to is not None):
            return CampaignError("source.key_from", f"must be of the key's type: {self.describe(exc)}")
        return SourceError(self.describe(exc))

    def _stats(self) -> Stats:
        import psycopg

        spec, sql = self.spec, self.sql
        params = self._conninfo()
        try:
            conn = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            raise SourceError(self.describe(exc)) from None
        with conn:
            try:
                cur = conn.execute(sql.probe().encode(), ())
            except psycopg.Error as exc:
                raise self._explain(exc) from None
            desc = cur.description or []
            columns = [d.name for d in desc]
            require_key(spec, columns)
            oid = desc[columns.index(self.key)].type_code
            if oid in _BINARY_OIDS:
                raise CampaignError("source.key", f"{spec.key!r} is binary (bytea), which cannot be paged by")
            if spec.shard is not None and oid not in _INT_OIDS:
                raise CampaignError("source.shard", f"needs an integer key column; {spec.key!r} is not one")
            query, qparams = sql.stats()
            try:
                if self._readable(columns):
                    conn.execute(sql.page(False).encode(), [*sql.params, 1]).fetchall()  # the first row
                row = conn.execute(query.encode(), qparams).fetchone()
            except psycopg.errors.UndefinedFunction:  # a type without min() and max()
                row = self._fallback_stats(conn)
            except psycopg.Error as exc:
                raise self._explain(exc) from None
        assert row is not None
        nulls, rows, lo, hi = row
        return Stats(columns, oid in _INT_OIDS, nulls, rows, lo, hi)

    def _fallback_stats(self, conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
        import psycopg

        k, where = self.sql.key, self.sql.where
        query = f"SELECT count(*) - count({k}), count(CASE WHEN {where} THEN 1 END), NULL, NULL"
        query += f" FROM {self.sql.rel}"
        try:
            row = conn.execute(query.encode(), self.sql.params).fetchone()
        except psycopg.Error as exc:
            raise self._explain(exc) from None
        assert row is not None
        return tuple(row)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Session]:
        import psycopg

        params = self._conninfo()
        try:
            conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            raise SourceError(self.describe(exc)) from None
        try:
            yield _PgSession(conn, self)
        finally:
            with anyio.move_on_after(5, shield=True):
                await conn.close()
