"""replay() reads a ledger column-wise with numpy; it must say what a line-by-line reading says.

The reference below is the ledger's definition, read one line at a time: an intent puts
its rows in flight, a retry/fatal attempt line puts them back to pending, a recipient
line sets its row's status, the last word on a row wins, a torn last line is ignored.
"""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ledger import LedgerState, Status, replay

WORDS = {
    b"sent": Status.SENT,
    b"failed": Status.FAILED,
    b"rejected": Status.REJECTED,
    b"unknown": Status.UNKNOWN,
    b"deferred": Status.DEFERRED,
}


def reference(data: bytes) -> tuple[dict[int, int], int | None, int, set[int], int, int]:
    status: dict[int, int] = {}
    eof = None
    next_batch = 1
    open_intents: dict[int, list[int]] = {}
    bad = torn = 0
    lines = data.split(b"\n")
    if lines[-1]:
        torn = len(lines[-1])
    for line in lines[:-1]:
        if line.startswith(b'{"r":'):  # {"r":N,"s":"word"...: read by position, not parsed
            comma = line.find(b',"s":"', 5)
            initial = line[comma + 6 : comma + 7] if comma > 5 else b""
            code = next((v for k, v in WORDS.items() if initial == k[:1]), None)
            if code is None or not line[5:comma].isdigit():
                bad += 1
            else:
                status[int(line[5:comma])] = code
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
        elif "i" in obj:
            open_intents[obj["i"]] = obj["r"]
            next_batch = max(next_batch, obj["i"] + 1)
            for r in obj["r"]:
                status[r] = Status.INFLIGHT
        elif "b" in obj:
            rows = open_intents.pop(obj["b"], [])
            if obj.get("s") in ("retry", "fatal"):
                for r in rows:
                    if status.get(r) == Status.INFLIGHT:
                        status[r] = Status.PENDING
        elif "eof" in obj:
            eof = obj["eof"]
    return {r: v for r, v in status.items() if v}, eof, next_batch, set(open_intents), bad, torn


def as_tuple(state: LedgerState) -> tuple[dict[int, int], int | None, int, set[int], int, int]:
    status = {int(r): state.status[r] for r in np.flatnonzero(state.status.unpack())}
    return status, state.eof_rows, state.next_batch, set(state.open_intents), state.bad_lines, state.torn_tail


rows = st.lists(st.integers(1, 40), min_size=1, max_size=6, unique=True)
line = st.one_of(
    st.tuples(st.just("intent"), st.integers(1, 9), rows),
    st.tuples(st.just("attempt"), st.integers(1, 9), st.sampled_from(["sent", "retry", "fatal", "mixed"])),
    st.tuples(st.just("recipient"), st.integers(0, 5000), st.sampled_from(list(WORDS))),
    st.tuples(st.just("recipient"), st.integers(1, 40), st.sampled_from(list(WORDS))),
    st.tuples(st.just("eof"), st.integers(0, 50)),
    st.tuples(
        st.just("raw"),
        st.sampled_from(
            [
                b"garbage",
                b"[1,2]",
                b'{"r":x,"s":"sent"}',
                b'{"r":5,"s":"zz"}',
                b'{"r":7,"s":"sent"',
                b"{}",
                b'{"r":12,"s":"sent","k":"a\\nb"}',
                b'{"r":3}',
                b"",
            ]
        ),
    ),
)


def encode(item: tuple[object, ...]) -> bytes:
    kind = item[0]
    if kind == "intent":
        return orjson.dumps({"i": item[1], "a": 1, "o": "x", "r": item[2], "t": 1.0})
    if kind == "attempt":
        return orjson.dumps({"b": item[1], "a": 1, "s": item[2], "ms": 1.0})
    if kind == "recipient":
        return b'{"r":%d,"s":"%s","b":1}' % (item[1], item[2])  # type: ignore[str-bytes-safe]
    if kind == "eof":
        return b'{"eof":%d}' % item[1]  # type: ignore[str-bytes-safe]
    return item[1]  # type: ignore[return-value]


class TestReplayMatchesLineByLine:
    @settings(max_examples=200, deadline=None)
    @given(st.lists(line, max_size=60), st.binary(max_size=8), st.sampled_from([1 << 24, 48]))
    def test_same_state(self, items: list[tuple[object, ...]], tail: bytes, block: int) -> None:
        import tempfile

        data = b"".join(encode(i) + b"\n" for i in items) + tail.replace(b"\n", b"")
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ledger.jsonl"
            path.write_bytes(data)
            with patch("pipeline.ledger.state._BLOCK", block):
                got = as_tuple(replay(path, repair=True))
            assert path.read_bytes() == data[: len(data) - got[5]]  # a torn tail is cut off
        assert got == reference(data)

    def test_a_resent_row_and_one_in_flight_again(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(
            b'{"i":1,"a":1,"o":"x","r":[1,2],"t":1}\n{"b":1,"a":1,"s":"sent"}\n'
            b'{"r":1,"s":"deferred","b":1}\n{"r":2,"s":"sent","b":1}\n'
            b'{"i":2,"a":1,"o":"x","r":[1],"t":1}\n'  # row 1 re-sent, then the process died
        )
        state = replay(path)
        assert [state.get(r) for r in (1, 2, 3)] == [Status.INFLIGHT, Status.SENT, Status.PENDING]
        assert state.open_intents == {2: [1]} and state.next_batch == 3
