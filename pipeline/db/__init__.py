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
    deferred or still to be sent, see :func:`pipeline.admit.resume_checkpoint`): it reads
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

Modules: :mod:`.sql` (the statements, the session protocol), :mod:`.source` (paging, row
numbers, checkpoints written), :mod:`.sqlite`, :mod:`.postgres`, :mod:`.checkpoints` (the
checkpoint file, fingerprint comparison). Where a resume starts is decided by admission
(:func:`pipeline.admit.resume_checkpoint`) from the ledger's state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.app.campaign import SourceSpec
from pipeline.db.checkpoints import CHECKPOINTS, Checkpoint, compare_fingerprints, read_checkpoints
from pipeline.db.postgres import PostgresSource
from pipeline.db.source import DbSource
from pipeline.db.sqlite import SqliteSource
from pipeline.errors import CampaignError

__all__ = (
    "CHECKPOINTS",
    "Checkpoint",
    "DbSource",
    "PostgresSource",
    "SqliteSource",
    "compare_fingerprints",
    "open_db_source",
    "read_checkpoints",
)

_TABLE_NAME = re.compile(r"[^.]+(\.[^.]+)?\Z")


def open_db_source(
    spec: SourceSpec,
    columns: Sequence[str],
    *,
    checkpoints: Path | None = None,
    start: Checkpoint | None = None,
) -> DbSource:
    """The database source reading ``columns`` (a table; a query reads all of its own); with
    ``checkpoints`` it appends its checkpoints there, with ``start`` it reads after that one."""
    if spec.table is not None and not _TABLE_NAME.match(spec.table):
        raise CampaignError("source.table", 'must be "table" or "schema.table"')
    cls = SqliteSource if spec.kind == "sqlite" else PostgresSource
    return cls(spec, columns, checkpoints=checkpoints, start=start)
