"""Database sources: SQLite (embedded, ``sqlite3``) and PostgreSQL (psycopg 3, async).

``[source]`` names a ``table`` or a ``query`` (one SELECT) and a ``key`` column,
and rows are read in key order. The key must be NOT NULL (rows with a NULL key
have no place in key order and are refused before anything is sent) and should
be unique: duplicates are rejected like duplicated CSV keys.

Reading
    By default every page is its own short statement in autocommit,
    ``... WHERE key > :last ORDER BY key LIMIT n``, so memory stays flat at any
    table size and no snapshot is held between pages: a run of hours never
    holds back vacuum. A table should have an index on the key (its primary
    key); a query must let the planner push the bound down, or set
    ``snapshot = true``: one read-only REPEATABLE READ transaction streamed
    through a server-side cursor (PostgreSQL), or one statement read with
    ``fetchmany`` (SQLite), which sees the data as it was when the run began.
    A page never ends inside a run of equal keys, so ``key > :last`` skips
    nothing. SQLite calls run in a worker thread, off the event loop.

Row numbers (the ledger's row: half a status byte per row)
    ``row_number = "rank"`` (default): the 1-based position in key order among
    the rows the source selects (after ``key_from``/``key_to``/``shard``). Any
    key type works, but a row inserted or deleted before others shifts their
    positions, so resuming against a changed source is refused unless
    ``--force`` (see the fingerprint). ``row_number = "key"``: the key itself,
    for integer keys from 1 up to a few times the row count. Rows keep their
    numbers whatever happens to the table, so a changed source resumes with a
    warning: rows added past the resume point are sent, rows added below it
    are not read.

Resume without re-reading
    With each chunk the source appends a checkpoint to ``source-checkpoints.jsonl``
    in the run directory: ``{"row": R, "n": N, "key": K}`` says every selected
    row with a key up to K has been read, N of them, the last one ledger row R.
    Checkpoints sit at key boundaries. A resume starts after the highest
    checkpoint whose rows are all settled (N settled rows up to R, none of them
    deferred or still to be sent, see :func:`resume_checkpoint`): it reads
    ``key > K`` only, numbering from N + 1. A lost or torn checkpoint only
    means an earlier start; the status of each row still decides what is sent.

Shards
    ``shard = "i/n"`` keeps the rows whose integer key is congruent to i - 1
    modulo n; ``key_from`` (inclusive) and ``key_to`` (exclusive) keep a key
    range. Shards of one table are disjoint and together cover it, so several
    workers, each with its own run directory, can share one campaign.

Fingerprint (``run.json``)
    The table name or the query's SHA-256, the key, the row numbering and the
    bounds; and the number of selected rows and their lowest and highest key
    (one scan of the key at start and at resume). See :func:`compare_fingerprints`.

Errors
    A missing table, column or key, a failing query, an unreadable database
    file, a refused connection or bad credentials raise ``CampaignError`` or
    ``SourceError`` before anything is sent. The PostgreSQL DSN comes from the
    environment variable named by ``dsn_env``; it is never written to
    ``run.json``, the logs or an error message. A database error mid-run
    raises ``SourceError`` from :meth:`DbSource.chunks`: the engine stops the
    run (in-flight requests finish, the ledger is flushed) and a resume
    continues from the last settled checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio
import orjson
import structlog

from pipeline.campaign import Campaign, SourceSpec
from pipeline.errors import CampaignError, SourceError
from pipeline.ledger import LedgerState, StatusArray
from pipeline.source import CHUNK_ROWS, Rows

if TYPE_CHECKING:
    import psycopg

__all__ = (
    "CHECKPOINTS",
    "Checkpoint",
    "DbSource",
    "PostgresSource",
    "SqliteSource",
    "compare_fingerprints",
    "open_db_source",
    "read_checkpoints",
    "resume_checkpoint",
)

log = structlog.get_logger("sluice.source")

CHECKPOINTS = "source-checkpoints.jsonl"
PAGE_ROWS = CHUNK_ROWS
KEY_ROW_MAX = 200_000_000  # row_number = "key": half a status byte per key value up to here
DATA_FIELDS = ("rows", "key_min", "key_max")

Values = Sequence[Any]
Page = tuple[list[str], list[Values]]  # column names, rows


class _Unset:
    pass


_UNSET = _Unset()


# -- checkpoints and resume -----------------------------------------------------
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


# -- SQL ---------------------------------------------------------------------------
def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")  # psycopg reads % as a placeholder


def _same(text: str) -> str:
    return text


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Sql:
    """The statements of one source, for one dialect (``?`` or ``%s`` placeholders)."""

    def __init__(self, spec: SourceSpec, columns: Sequence[str], *, pg: bool) -> None:
        assert spec.key is not None
        esc = _escape_percent if pg else _same
        ph = "%s" if pg else "?"
        self.ph = ph
        if spec.table is not None:
            self.rel = esc(".".join(_quote(p) for p in spec.table.split(".")))
            self.cols = esc(", ".join(_quote(c) for c in columns))
        else:
            assert spec.query is not None
            self.rel = f"({esc(spec.query)}) AS sluice_src"
            self.cols = "*"
        k = self.key = esc(_quote(spec.key))
        conds = [f"{k} IS NOT NULL"]
        self.params: list[Any] = []
        if spec.key_from is not None:
            conds.append(f"{k} >= {ph}")
            self.params.append(spec.key_from)
        if spec.key_to is not None:
            conds.append(f"{k} < {ph}")
            self.params.append(spec.key_to)
        if spec.shard is not None:
            i, n = (int(x) for x in spec.shard.split("/"))
            mod = esc("%")
            conds.append(f"(({k} {mod} {n}) + {n}) {mod} {n} = {i - 1}")
        self.where = " AND ".join(conds)

    def probe(self) -> str:
        return f"SELECT * FROM {self.rel} LIMIT 0"

    def stats(self, extra: Sequence[str] = ()) -> tuple[str, list[Any]]:
        """NULL keys (anywhere), then count, min and max of the selected keys, then ``extra``."""
        k, sel = self.key, f"CASE WHEN {self.where} THEN 1 END"
        cols = [
            f"count(*) - count({k})",
            f"count({sel})",
            f"min(CASE WHEN {self.where} THEN {k} END)",
            f"max(CASE WHEN {self.where} THEN {k} END)",
            *(f"count(CASE WHEN {self.where} AND {e} THEN 1 END)" for e in extra),
        ]
        return f"SELECT {', '.join(cols)} FROM {self.rel}", self.params * (3 + len(extra))

    def page(self, after: bool) -> str:
        bound = f" AND {self.key} > {self.ph}" if after else ""
        return (
            f"SELECT {self.cols} FROM {self.rel} WHERE {self.where}{bound} "
            f"ORDER BY {self.key} LIMIT {self.ph}"
        )

    def equal(self) -> str:
        return f"SELECT {self.cols} FROM {self.rel} WHERE {self.where} AND {self.key} = {self.ph}"

    def stream(self, after: bool) -> str:
        bound = f" AND {self.key} > {self.ph}" if after else ""
        return f"SELECT {self.cols} FROM {self.rel} WHERE {self.where}{bound} ORDER BY {self.key}"


@dataclass
class _Stats:
    columns: list[str]
    integer_key: bool
    nulls: int
    rows: int
    key_min: Any
    key_max: Any


class _Session(Protocol):
    """One open connection, as the source's reading loop uses it."""

    def convert(self, columns: Sequence[str]) -> list[int]:
        """Indexes of columns whose values are turned into text for the renderer."""
        ...

    async def fetch(self, sql: str, params: Sequence[Any]) -> Page: ...

    def stream(self, sql: str, params: Sequence[Any]) -> AsyncGenerator[Page, None]: ...


def _json_key(value: Any) -> Any:
    """A key as checkpoints and fingerprints hold it: JSON scalars as they are, other types as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raise SourceError("a binary key cannot be used to page and resume; choose another key column")
    return str(value)


# -- the source -------------------------------------------------------------------
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
    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> _Sql:
        raise NotImplementedError

    def _stats(self) -> _Stats:
        raise NotImplementedError

    def _session(self) -> AbstractAsyncContextManager[_Session]:
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
        fp.update(rows=st.rows, key_min=_json_key(st.key_min), key_max=_json_key(st.key_max))
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
                        line = {"row": chunk[j][0], "n": n - len(page) + j + 1, "key": _json_key(page[j][ki])}
                        os.write(fd, orjson.dumps(line) + b"\n")
                    yield chunk
        finally:
            if fd >= 0:
                os.close(fd)

    async def _pages(self, session: _Session) -> AsyncGenerator[tuple[list[str], list[Values], bool], None]:
        """Pages of rows in key order; the flag says the page ends at a key boundary."""
        after: Any = self.start.key if self.start is not None else _UNSET
        sql, fixed = self.sql, self.sql.params
        if self.spec.snapshot:
            params = [*fixed, after] if after is not _UNSET else fixed
            async with aclosing(session.stream(sql.stream(after is not _UNSET), params)) as stream:
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


# -- SQLite -------------------------------------------------------------------------
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

    async def stream(self, sql: str, params: Sequence[Any]) -> AsyncGenerator[Page, None]:
        try:
            cur = await anyio.to_thread.run_sync(self.conn.execute, sql, params)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            names = [d[0] for d in cur.description]
            while True:
                try:
                    rows = await anyio.to_thread.run_sync(cur.fetchmany, PAGE_ROWS)
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

    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> _Sql:
        return _Sql(spec, columns, pg=False)

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

    def _stats(self) -> _Stats:
        spec, sql = self.spec, self.sql
        conn = self._connect()
        try:
            try:
                cur = conn.execute(sql.probe())
                columns = [d[0] for d in cur.description]
                cur.close()
            except sqlite3.Error as exc:
                raise self._explain(exc) from None
            _require_key(spec, columns)
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
        return _Stats(columns, non_int == 0, nulls, rows, lo, hi)

    def _explain(self, exc: sqlite3.Error) -> Exception:
        msg = str(exc)
        if self.spec.table is not None and msg.startswith("no such table"):
            return CampaignError("source.table", f"no table {self.spec.table!r} in {self.path}")
        broken = "not a database" in msg or "unable to open" in msg or "malformed" in msg
        if self.spec.query is not None and not broken:
            return CampaignError("source.query", f"the query fails: {msg}")
        return SourceError(f"cannot read SQLite database {self.path}: {msg}")

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        conn = self._connect()
        try:
            yield _SqliteSession(conn, str(self.path))
        finally:
            conn.close()


# -- PostgreSQL ---------------------------------------------------------------------
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

    async def stream(self, sql: str, params: Sequence[Any]) -> AsyncGenerator[Page, None]:
        import psycopg

        conn = self.conn
        try:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            async with conn.transaction(), conn.cursor(name="sluice_source") as cur:
                await cur.execute(sql.encode(), params)
                while True:
                    rows = await cur.fetchmany(PAGE_ROWS)
                    if not rows:
                        return
                    yield self._names(cur), rows
        except psycopg.Error as exc:
            raise SourceError(self.source.describe(exc)) from None


class PostgresSource(DbSource):
    kind = "postgres"
    _secret = ""  # the DSN's password, kept out of error messages

    def _make_sql(self, spec: SourceSpec, columns: Sequence[str]) -> _Sql:
        return _Sql(spec, columns, pg=True)

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

    def _stats(self) -> _Stats:
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
            _require_key(spec, columns)
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
        return _Stats(columns, oid in _INT_OIDS, nulls, rows, lo, hi)

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
    async def _session(self) -> AsyncIterator[_Session]:
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


def _require_key(spec: SourceSpec, columns: list[str]) -> None:
    if spec.key not in columns:
        raise CampaignError("source.key", f"column {spec.key!r} is not a column of the source {columns}")


def _columns_read(campaign: Campaign) -> list[str]:
    """The key, the phone and every column a template names, in that order, once each."""
    spec = campaign.source
    sign, params = campaign.templates()
    cols = [spec.key or "", spec.phone, *sign.columns]
    for t in params.values():
        cols.extend(t.columns)
    return list(dict.fromkeys(cols))


_TABLE_NAME = re.compile(r"[^.]+(\.[^.]+)?\Z")


def open_db_source(
    campaign: Campaign,
    *,
    run_dir: Path | None = None,
    state: LedgerState | None = None,
    skip: bytes | None = None,
) -> DbSource:
    """The campaign's database source; with a run directory, it writes checkpoints there and
    starts after the last settled one (given the ledger ``state`` and the ``skip`` table)."""
    spec = campaign.source
    if spec.table is not None and not _TABLE_NAME.match(spec.table):
        raise CampaignError("source.table", 'must be "table" or "schema.table"')
    checkpoints = run_dir / CHECKPOINTS if run_dir is not None else None
    start = None
    if checkpoints is not None and state is not None and skip is not None and state.status:
        start = resume_checkpoint(state.status, skip, read_checkpoints(checkpoints))
        if start is not None:
            log.info("source_resume", after_row=start.row, rows_before=start.n)
    cls = SqliteSource if spec.kind == "sqlite" else PostgresSource
    return cls(spec, _columns_read(campaign), checkpoints=checkpoints, start=start)
