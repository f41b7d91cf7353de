"""The SQL of a database source, for one dialect, and what a connection offers the source."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.app.campaign import SourceSpec
from pipeline.errors import CampaignError, SourceError

__all__ = ("Page", "Session", "Sql", "Stats", "Values", "json_key", "require_key")

Values = Sequence[Any]
Page = tuple[list[str], list[Values]]  # column names, rows


def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")  # psycopg reads % as a placeholder


def _same(text: str) -> str:
    return text


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Sql:
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
class Stats:
    columns: list[str]
    integer_key: bool
    nulls: int
    rows: int
    key_min: Any
    key_max: Any


class Session(Protocol):
    """One open connection, as the source's reading loop uses it."""

    def convert(self, columns: Sequence[str]) -> list[int]:
        """Indexes of columns whose values are turned into text for the renderer."""
        ...

    async def fetch(self, sql: str, params: Sequence[Any]) -> Page: ...

    def stream(self, sql: str, params: Sequence[Any], page_rows: int) -> AsyncGenerator[Page, None]: ...


def json_key(value: Any) -> Any:
    """A key as checkpoints and fingerprints hold it: JSON scalars as they are, other types as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raise SourceError("a binary key cannot be used to page and resume; choose another key column")
    return str(value)


def require_key(spec: SourceSpec, columns: list[str]) -> None:
    if spec.key not in columns:
        raise CampaignError("source.key", f"column {spec.key!r} is not a column of the source {columns}")
