"""The floor: what sluice's own stages cost with no HTTP at all, per recipient.

``python -m benchmarks.floor CSV LEDGER --stage source|ledger|render|sign`` runs, in this
process, cumulative slices of the pipeline over every row of ``CSV`` and prints one JSON
line (CPU seconds of the work, peak RSS):

* ``source``: ``pipeline.source.CsvSource.chunks()`` as the engine reads it (columns),
  every row read and nothing else;
* ``ledger``: plus, per 100 rows, a ``Batch`` of bare ``Message`` objects, its intent
  line (``LedgerWriter.intent``, one ``os.write`` each, as the dispatcher does) and its
  outcome lines (``LedgerWriter.outcome`` with ``SENT``): the floor the issue names;
* ``render``: ``Renderer.render_columns`` builds the messages instead and ``Batcher`` groups
  them (the engine's prepare step; key = the row number, as in the benchmarks' campaign);
* ``sign``: plus ``AliyunSms.build_wire`` (V3) per batch: everything but the HTTP.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from benchmarks.common import SIGN_NAME, TEMPLATE_CODE, child_result
from pipeline.batch import Batcher
from pipeline.ledger import Durability, LedgerWriter
from pipeline.render import Renderer, Template
from pipeline.source import Columns, CsvSource
from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, BatchOutcome, Message, Outcome

__all__ = ("STAGES", "main", "run_stage")

STAGES = ("source", "ledger", "render", "sign")
BATCH = 100


async def run_stage(csv_path: Path, ledger_path: Path, stage: str) -> int:
    """Returns the rows seen."""
    source = CsvSource(csv_path, columnar=True)  # as the engine reads it
    rows = 0
    if stage == "source":
        async for chunk in source.chunks():
            rows += len(chunk)
        return rows
    writer = LedgerWriter(ledger_path, durability=Durability.PROCESS, keyed=False)
    sent = BatchOutcome(Outcome.SENT, code="OK", provider_id="1^0")
    renderer = Renderer(
        phone_column="phone",
        sign_name=Template.compile(SIGN_NAME),
        params={"name": Template.compile("{name}"), "code": Template.compile("{code}")},
    )
    batcher = Batcher(BATCH, lambda m: None)
    provider = AliyunSms(
        credentials=TEST_CREDENTIALS,
        template_code=TEMPLATE_CODE,
        endpoint="http://127.0.0.1:9",
        signature="v3",
    )
    next_id = 1

    def settle(batch: Batch) -> None:
        batch.out_id = f"floor-{batch.id}-1"
        if stage == "sign":
            provider.build_wire(batch)
        writer.intent(batch)
        writer.outcome(batch, sent, 1.0)

    try:
        async for chunk in source.chunks():
            if not isinstance(chunk, Columns):
                raise RuntimeError("the floor's CSV must come as columns, as in the engine")
            rows += len(chunk)
            numbers = range(chunk.first, chunk.first + len(chunk))
            keys = list(map(str, numbers))
            if stage == "ledger":
                phones = chunk.column("phone") or ()
                msgs = [
                    Message(r, k, "86" + p, {}, SIGN_NAME)
                    for r, k, p in zip(numbers, keys, phones, strict=True)
                ]
                for i in range(0, len(msgs), BATCH):
                    settle(Batch(next_id, msgs[i : i + BATCH]))
                    next_id += 1
            else:
                rendered = renderer.render_columns(numbers, keys, chunk.header, chunk.values)
                if rendered is None:
                    raise RuntimeError("the floor's rows must take the engine's common path")
                for b in batcher.add(rendered):
                    settle(b)
        for b in batcher.drain():
            settle(b)
    finally:
        writer.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    p.add_argument("csv", type=Path)
    p.add_argument("ledger", type=Path, help="written (appended) by the ledger stages")
    p.add_argument("--stage", choices=STAGES, required=True)
    args = p.parse_args(argv)
    args.ledger.unlink(missing_ok=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows = anyio.run(run_stage, args.csv, args.ledger, args.stage)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    size = args.ledger.stat().st_size if args.ledger.exists() else 0
    child_result(stage=args.stage, rows=rows, cpu_s=cpu, wall_s=wall, ledger_bytes=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
