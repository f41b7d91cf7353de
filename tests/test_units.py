"""Unit tests of the engine's pure stages: render, batch, keys, ledger, campaign."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.app.campaign import load_campaign, parse_campaign
from pipeline.batch import Batcher
from pipeline.errors import CampaignError
from pipeline.keys import KeySet
from pipeline.ledger import LedgerWriter, Status, replay
from pipeline.render import Rejection, Renderer, Template, TemplateError, normalize_phone
from providers.aliyun import AliyunSms
from providers.base import Batch, BatchOutcome, Message, Outcome, RecipientOutcome
from providers.nxcloud import NxcloudSms


class TestTemplate:
    def test_columns_and_literals(self) -> None:
        t = Template.compile("Hi {name}, {{code}} is {code}!")
        assert t.columns == ("name", "code")
        assert t.render({"name": "Li", "code": "42"}) == "Hi Li, {code} is 42!"

    @pytest.mark.parametrize(
        "text", ["{a.b}", "{a[0]}", "{a!r}", "{a:>10}", "{0}", "{}", "{__class__.__mro__}", "x{", "}x"]
    )
    def test_refuses_anything_but_a_column(self, text: str) -> None:
        with pytest.raises(TemplateError):
            Template.compile(text)

    def test_missing_column_is_named(self) -> None:
        with pytest.raises(KeyError, match="code"):
            Template.compile("{name}{code}").render({"name": "x"})

    def test_values_are_not_reinterpreted(self) -> None:
        assert Template.compile("{a}").render({"a": "{b.__class__}"}) == "{b.__class__}"


class TestPhone:
    @pytest.mark.parametrize(
        ("raw", "want"),
        [
            ("13800000000", "8613800000000"),
            ("+86 138-0000-0000", "8613800000000"),
            ("008613800000000", "8613800000000"),
            ("8613800000000", "8613800000000"),
            ("+14155550123", "14155550123"),
            ("  +44 20 7946 0958 ", "442079460958"),
        ],
    )
    def test_valid(self, raw: str, want: str) -> None:
        assert normalize_phone(raw) == want

    @pytest.mark.parametrize(
        "raw",
        ["", "abc", "1380000000", "138000000001", "12800000000", "+0123456789", "١٣٨٠٠٠٠٠٠٠٠", "1" * 16],
    )
    def test_invalid(self, raw: str) -> None:
        assert normalize_phone(raw) is None


class TestRenderer:
    def renderer(self) -> Renderer:
        return Renderer(
            phone_column="phone",
            sign_name=Template.compile("Acme"),
            params={"name": Template.compile("{first}")},
        )

    def test_message(self) -> None:
        m = self.renderer().render(3, "k3", {"phone": "13800000000", "first": "Li"})
        assert m == Message(3, "k3", "8613800000000", {"name": "Li"}, "Acme", None)

    @pytest.mark.parametrize(
        ("record", "reason"),
        [
            ({"first": "Li"}, "missing column 'phone'"),
            ({"phone": "12", "first": "Li"}, "invalid phone number"),
            ({"phone": "13800000000"}, "missing column 'first'"),
            ({"phone": "13800000000", "first": "a\udcff"}, "invalid UTF-8"),
            ({"phone": "13800000000", "first": "a\x00"}, "NUL byte"),
            ({"phone": "13800000000", "first": {"x": 1}}, "not text or a number"),
        ],
    )
    def test_rejections(self, record: dict[str, object], reason: str) -> None:
        r = self.renderer().render(1, "1", record)
        assert isinstance(r, Rejection)
        assert reason in r.reason


class TestRenderRows:
    """render_rows (the engine's chunk path) agrees with render, row by row, for any rows."""

    VALUES = st.one_of(
        st.sampled_from(["13800000000", "19912345678", "12800000000", "+8613800000000", "", "Li", "李"]),
        # not mobiles (140, a landline, read as +238), a mobile abroad, values over a text limit
        st.sampled_from(["14012345678", "+862162321234", "23800000019", "+447911123456", "x" * 17]),
        st.text(max_size=12),
        st.integers(-5, 10**12),
        st.none(),
    )

    @staticmethod
    def renderers() -> list[Renderer]:
        common = {"phone_column": "phone", "sign_name": Template.compile("Acme")}
        return [
            Renderer(**common, params={"name": Template.compile("{first}"), "c": Template.compile("{code}")}),
            Renderer(**common, params={}),
            Renderer(**common, params={"a": Template.compile("{first}")}),
            Renderer(**common, params={k: Template.compile("{code}") for k in "abc"}),
            Renderer(**common, params={k: Template.compile("{first}") for k in "abcd"}),
            Renderer(**common, params={"name": Template.compile("Dear {first}")}),
            # text limits (small, to be reached): on the chunk path and on free text
            Renderer(
                **common,
                params={"a": Template.compile("{first}"), "c": Template.compile("{code}")},
                text_limit=dataclasses.replace(AliyunSms.text_limit(None), max_length=20),
            ),
            Renderer(
                **common,
                params={},
                content=Template.compile("Hi {first}"),
                text_limit=dataclasses.replace(NxcloudSms.text_limit(), max_length=15),
            ),
            # free text of several columns, braces and CJK in its literals (NXCloud, SUBMAIL)
            Renderer(**common, params={}, content=Template.compile("【签】{{x}} {first}的码{code}，{first}")),
            Renderer(
                **common,
                params={"c": Template.compile("{code}")},
                content=Template.compile("尊敬的{first}"),
                text_limit=dataclasses.replace(NxcloudSms.text_limit(), max_length=8),
            ),
            Renderer(phone_column="phone", sign_name=Template.compile("{sign}"), params={}),
        ]

    @settings(max_examples=150)
    @given(
        st.lists(
            st.fixed_dictionaries(
                {}, optional={"phone": VALUES, "first": VALUES, "code": VALUES, "sign": VALUES}
            ),
            max_size=30,
        )
    )
    def test_same_as_render_one_by_one(self, records: list[dict[str, object]]) -> None:
        items = [(i + 1, f"k{i}", rec) for i, rec in enumerate(records)]
        for renderer in self.renderers():
            messages, rejects = renderer.render_rows(items)
            one_by_one = [renderer.render(row, key, rec) for row, key, rec in items]
            assert messages == [m for m in one_by_one if isinstance(m, Message)]
            assert rejects == [(r.row, r.key, r.reason) for r in one_by_one if isinstance(r, Rejection)]

    @settings(max_examples=150)
    @given(
        st.lists(
            st.fixed_dictionaries(
                {
                    "phone": st.one_of(
                        st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True),
                        st.sampled_from(["13800000000", "14012345678", "23800000019", "+447911123456", 7]),
                    ),
                    "first": st.sampled_from(["Li", "x" * 17, "李", ""]),
                    "code": st.sampled_from(["7", "1234"]),
                }
            ),
            max_size=30,
        )
    )
    def test_mostly_mainland_chunks_same_as_one_by_one(self, records: list[dict[str, object]]) -> None:
        """Chunks where most numbers are bare mainland mobiles and a few are not (the inline
        path for the first, one by one for the others) agree with render row by row."""
        items = [(i + 1, f"k{i}", rec) for i, rec in enumerate(records)]
        for renderer in self.renderers():
            messages, rejects = renderer.render_rows(items)
            one_by_one = [renderer.render(row, key, rec) for row, key, rec in items]
            assert messages == [m for m in one_by_one if isinstance(m, Message)]
            assert rejects == [(r.row, r.key, r.reason) for r in one_by_one if isinstance(r, Rejection)]

    @settings(max_examples=150)
    @given(
        st.lists(
            st.tuples(
                st.one_of(
                    st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True),
                    st.sampled_from(["14012345678", "23800000019", "+447911123456", "", "١٣٨٠٠٠٠٠٠٠٠"]),
                ),
                st.sampled_from(["Li", "x" * 17, "李", ""]),
                st.sampled_from(["7", "1234"]),
            ),
            min_size=1,
            max_size=30,
        )
    )
    def test_columns_with_odd_numbers_same_as_one_by_one(self, cells: list[tuple[str, str, str]]) -> None:
        """render_columns with ``rejects`` (the engine's column path): the same messages and
        rejections as render row by row, or None with nothing rejected."""
        header = ["phone", "first", "code"]
        columns = [tuple(c) for c in zip(*cells, strict=True)]
        rows, keys = list(range(1, len(cells) + 1)), [f"k{i}" for i in range(len(cells))]
        for renderer in self.renderers():
            rejects: list[tuple[int, str, str]] = []
            out = renderer.render_columns(rows, keys, header, columns, rejects)
            if out is None:
                assert rejects == []
                continue
            one_by_one = [
                renderer.render(r, k, dict(zip(header, c, strict=True)))
                for r, k, c in zip(rows, keys, cells, strict=True)
            ]
            assert out == [m for m in one_by_one if isinstance(m, Message)]
            assert rejects == [(r.row, r.key, r.reason) for r in one_by_one if isinstance(r, Rejection)]

    def test_a_clean_chunk_takes_the_chunk_path(self) -> None:
        items = [(i, str(i), {"phone": f"139{i:08d}", "first": f"n{i}", "code": "7"}) for i in range(1, 50)]
        renderer = self.renderers()[0]
        cells = [(str(r), rec["phone"], rec["first"], rec["code"]) for r, _, rec in items]
        columns = list(zip(*cells, strict=True))
        header = ["id", "phone", "first", "code"]
        rows, keys = [r for r, _, _ in items], [k for _, k, _ in items]
        assert renderer.render_columns(rows, keys, header, columns) == renderer.render_rows(items)[0]
        assert renderer.render_columns(rows, keys, ["id", "phone", "first"], columns[:3]) is None  # no code
        messages, rejects = renderer.render_rows(items)
        assert not rejects and [m.phone for m in messages] == [f"86139{i:08d}" for i in range(1, 50)]
        assert messages[0].params == {"name": "n1", "c": "7"}
        for renderer in self.renderers()[:-1]:  # 0 to 4 parameters: the chunk path, same as row by row
            one_by_one = [renderer.render(row, key, rec) for row, key, rec in items]
            assert renderer.render_rows(items) == (one_by_one, [])

    def test_chinese_text_takes_the_column_path(self) -> None:
        """Chinese names in parameters and in free text are rendered a chunk at a time (not
        row by row), and the same as row by row."""
        header = ["phone", "first", "code"]
        cells = [(f"139{i:08d}", "王" + "小明"[: i % 2 + 1], f"{i:06d}") for i in range(1, 40)]
        columns = [tuple(c) for c in zip(*cells, strict=True)]
        rows, keys = list(range(1, 40)), [f"u{i}" for i in range(1, 40)]
        for i, renderer in enumerate(self.renderers()[:-1]):
            out = renderer.render_columns(rows, keys, header, columns)
            one_by_one = [
                renderer.render(r, k, dict(zip(header, c, strict=True)))
                for r, k, c in zip(rows, keys, cells, strict=True)
            ]
            if i == 5:  # "Dear {first}": a parameter that is not just a column goes row by row
                assert out is None
            else:
                assert out == one_by_one
        nx = self.renderers()[-3]
        out = nx.render_columns(rows, keys, header, columns)
        assert out is not None and out[1].content == "【签】{x} 王小的码000002，王小"
        assert nx.render_columns(rows, keys, header, [columns[0], ("a\x00",) * 39, columns[2]]) is None
        assert nx.render_columns(rows, keys, header, [columns[0], ("\udcff",) * 39, columns[2]]) is None
        too_long = self.renderers()[-2]  # 尊敬的 + the longest name is 6 of 8: all fit; 9 does not
        assert too_long.render_columns(rows, keys, header, columns) is not None
        long_names = [columns[0], ("王" * 6,) * 39, columns[2]]
        assert too_long.render_columns(rows, keys, header, long_names) is None


class TestBatcher:
    def msg(self, row: int, sign: str = "A") -> Message:
        return Message(row, str(row), "8613800000000", {}, sign)

    def test_full_batches_and_drain(self) -> None:
        b = Batcher(3, key=lambda m: m.sign_name)
        full = b.add([self.msg(i, "A" if i % 2 else "B") for i in range(1, 8)])
        assert [[m.row for m in x.messages] for x in full] == [[1, 3, 5], [2, 4, 6]]
        rest = b.drain()
        assert [[m.row for m in x.messages] for x in rest] == [[7]]
        assert [x.id for x in full + rest] == [1, 2, 3]
        assert b.pending == 0

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.lists(st.sampled_from("AAAB"), max_size=12), max_size=12), st.integers(1, 5))
    def test_same_batches_as_one_message_at_a_time(self, chunks: list[list[str]], size: int) -> None:
        """Chunks of one key take the slicing path; the batches are those of a per-message model."""
        b, open_, model, row = Batcher(size, key=lambda m: m.sign_name), {}, [], 0
        got: list[tuple[str, list[int]]] = []
        for signs in chunks:
            msgs = []
            for sign in signs:
                row += 1
                msgs.append(self.msg(row, sign))
                group = open_.setdefault(sign, [])
                group.append(row)
                if len(group) == size:
                    model.append((sign, open_.pop(sign)))
            got += [(x.messages[0].sign_name, [m.row for m in x.messages]) for x in b.add(msgs)]
            assert b.pending == sum(map(len, open_.values()))
        assert got == model
        rest = b.drain()
        assert sorted((x.messages[0].sign_name, [m.row for m in x.messages]) for x in rest) == sorted(
            (k, v) for k, v in open_.items() if v
        )
        assert [x.id for x in b.drain()] == [] and b.pending == 0


class TestKeySet:
    def test_duplicates_within_and_across_chunks(self) -> None:
        ks = KeySet()
        assert ks.add(["a", "b", "a"]) == [False, False, True]
        assert ks.add(["c", "b"]) == [False, True]
        for i in range(50):  # force several merges
            assert not any(ks.add([f"k{i}-{j}" for j in range(37)]))
        assert ks.add(["k3-5", "new", "c"]) == [True, False, True]
        assert ks.size == 3 + 50 * 37 + 1

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 60).map(str), max_size=12)), max_size=30),
        st.sampled_from([1, 5, 1 << 20]),
    )
    def test_noted_keys_count_as_seen(self, ops: list[tuple[bool, list[str]]], batch: int) -> None:
        from unittest.mock import patch

        ks, model = KeySet(), set()
        with patch("pipeline.keys._NOTE_BATCH", batch):
            for noted, keys in ops:
                if noted:  # a resume's settled rows: taken on trust
                    ks.note(keys)
                    model.update(keys)
                    continue
                expected = []
                for k in keys:
                    expected.append(k in model)
                    model.add(k)
                assert ks.add(keys) == expected
            assert ks.contains([*sorted(model), "absent"]) == [True] * len(model) + [False]
        assert ks.size == len(model)


def _batch(rows: list[int], bid: int = 1) -> Batch:
    return Batch(bid, [Message(r, str(r), "8613800000000", {}, "A") for r in rows], 1, f"x-{bid}-1")


class TestLedger:
    @pytest.mark.parametrize("keyed", [False, True])
    def test_codes_with_percent_signs(self, tmp_path: Path, keyed: bool) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path, keyed=keyed)
        b = Batch(4, [Message(r, f"key-{r}", "8613800000000", {}, "S") for r in (2, 3, 9)])
        w.intent(b)
        w.outcome(b, BatchOutcome(Outcome.FAILED, code="100%d %s%%"), 1.0)
        w.close()
        lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
        per_row = [x for x in lines if "r" in x and "s" in x]
        assert [(x["r"], x["s"], x["c"], x["b"]) for x in per_row] == [
            (r, "failed", "100%d %s%%", 4) for r in (2, 3, 9)
        ]
        assert [x.get("k") for x in per_row] == ([f"key-{r}" for r in (2, 3, 9)] if keyed else [None] * 3)
        state = replay(path)
        assert [state.get(r) for r in (1, 2, 3, 9)] == [Status.PENDING] + [Status.FAILED] * 3

    def test_round_trip(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        w.rejected([(1, "k1", "bad phone")])
        b = _batch([2, 3])
        w.intent(b)
        w.outcome(b, BatchOutcome(Outcome.SENT, code="OK", provider_id="9^0"), 12.0)
        b2 = _batch([4, 5, 6], 2)
        w.intent(b2)
        w.outcome(
            b2,
            BatchOutcome(
                Outcome.SENT,
                recipients=[
                    RecipientOutcome(Outcome.SENT, provider_id="s1"),
                    RecipientOutcome(Outcome.FAILED, code="114"),
                    RecipientOutcome(Outcome.DEFER, code="115"),
                ],
            ),
            3.0,
        )
        b3 = _batch([7], 3)
        w.intent(b3)  # no result: in flight at the "crash"
        w.eof(7)
        w.close()
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        state = replay(path)
        got = [state.get(r) for r in range(1, 8)]
        assert got == [
            Status.REJECTED,
            Status.SENT,
            Status.SENT,
            Status.SENT,
            Status.FAILED,
            Status.DEFERRED,
            Status.INFLIGHT,
        ]
        assert state.next_batch == 4 and state.eof_rows == 7
        counts = state.counts()
        assert counts["pending"] == 0 and counts["inflight"] == 1

    def test_retry_line_returns_rows_to_pending(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        b = _batch([1, 2])
        w.intent(b)
        w.attempt(b, BatchOutcome(Outcome.THROTTLED, code="Throttling.User"), "retry", 1.0)
        w.close()
        state = replay(path)
        assert state.get(1) == Status.PENDING and not state.open_intents

    def test_torn_tail_repaired(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        w.rejected([(1, "1", "x"), (2, "2", "y")])
        w.close()
        data = path.read_bytes()
        path.write_bytes(data[:-7])
        state = replay(path, repair=True)
        assert state.get(1) == Status.REJECTED and state.get(2) == Status.PENDING
        assert state.torn_tail > 0
        assert path.read_bytes() == data[: data.index(b'{"r":2,')]  # the version line and row 1

    def test_keys_kept_when_not_the_row(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.jsonl"
        w = LedgerWriter(path)
        w.rejected([(1, "1", "x"), (2, 'we"ird', "y")])
        w.close()
        header, *lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
        assert header == {"ledger": 2}
        assert "k" not in lines[0] and lines[1]["k"] == 'we"ird'


CAMPAIGN = """
[source]
kind = "csv"
path = "r.csv"
phone = "phone"
[provider]
kind = "simulator"
[message]
template_code = "SMS_1"
sign_name = "Acme"
params = { name = "{first}" }
[limits]
requests_per_second = 100
"""


class TestCampaign:
    def test_loads_and_resolves_paths(self, tmp_path: Path) -> None:
        f = tmp_path / "c.toml"
        f.write_text(CAMPAIGN)
        c = load_campaign(f)
        assert c.source.path == str(tmp_path / "r.csv")
        assert c.limits.requests_per_second == 100.0 and c.limits.batch_size == 100

    @pytest.mark.parametrize(
        ("patch", "field"),
        [
            ({"source": {"kind": "xml"}}, "source.kind"),
            ({"source": {"colour": "red"}}, "source.colour"),
            ({"limits": {"batch_size": 101}}, "limits.batch_size"),
            ({"limits": {"batch_size": "10"}}, "limits.batch_size"),
            ({"limits": {"concurrency": 0}}, "limits.concurrency"),
            ({"limits": {"requests_per_second": -1}}, "limits.requests_per_second"),
            ({"provider": {"signature": "v4"}}, "provider.signature"),
            ({"provider": {"endpoint": "ftp://x"}}, "provider.endpoint"),
            ({"message": {"params": {"name": "{first.__class__}"}}}, "message.params.name"),
            ({"message": {"sign_name": "{a[0]}"}}, "message.sign_name"),
            ({"run": {"durability": "sometimes"}}, "run.durability"),
            ({"extra": {}}, "extra"),
            ({"schedule": {"window": "8am-9pm"}}, "schedule.window"),
            ({"schedule": {"window": "08:00-21:00", "timezone": "Mars/Base"}}, "schedule.timezone"),
            ({"schedule": {"days": ["mon"]}}, "schedule.days"),
            ({"schedule": {"window": "08:00-21:00", "days": ["someday"]}}, "schedule.days"),
            ({"schedule": {"daily_cap": 10}}, "schedule.daily_cap"),
            ({"schedule": {"daily_cap": "many"}}, "schedule.daily_cap"),
            ({"source": {"suppress": "no-such-file.txt"}}, "source.suppress"),
            ({"source": {"dedupe_phone": "yes"}}, "source.dedupe_phone"),
        ],
    )
    def test_bad_fields_are_named(
        self, tmp_path: Path, patch: dict[str, dict[str, object]], field: str
    ) -> None:
        import tomllib

        data = tomllib.loads(CAMPAIGN)
        for section, values in patch.items():
            data.setdefault(section, {}).update(values)
        with pytest.raises(CampaignError) as info:
            parse_campaign(data, tmp_path)
        assert info.value.field == field

    def test_missing_required(self, tmp_path: Path) -> None:
        import tomllib

        data = tomllib.loads(CAMPAIGN)
        del data["message"]["template_code"]
        with pytest.raises(CampaignError, match=r"message\.template_code"):
            parse_campaign(data, tmp_path)

    def test_bad_toml(self, tmp_path: Path) -> None:
        f = tmp_path / "c.toml"
        f.write_text("[source\n")
        with pytest.raises(CampaignError, match="not valid TOML"):
            load_campaign(f)


class TestSegments:
    @pytest.mark.parametrize(
        ("text", "domestic", "want"),
        [
            ("a" * 70, True, 1),
            ("a" * 71, True, 2),
            ("中" * 134, True, 2),
            ("中" * 135, True, 3),
            ("a" * 160, False, 1),
            ("a" * 161, False, 2),
            ("a" * 306, False, 2),
            ("a" * 307, False, 3),
            ("€" * 80, False, 1),  # extension characters count double
            ("€" * 81, False, 2),
            ("é" * 160, False, 1),  # in the GSM basic set
            ("ç" * 70, False, 1),  # not GSM: UCS-2
            ("ç" * 71, False, 2),
            ("😀" * 35, False, 1),  # two UTF-16 units each
            ("😀" * 36, False, 2),
        ],
    )
    def test_rules(self, text: str, domestic: bool, want: int) -> None:
        from pipeline.ops.dryrun import segments

        assert segments(text, domestic_cn=domestic) == want


class TestStatusArray:
    """Two statuses a byte, checked against a plain list of statuses."""

    ops = st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.integers(0, 70), st.integers(0, 6)),
            st.tuples(st.just("run"), st.integers(0, 60), st.integers(0, 12), st.integers(0, 6)),
            st.tuples(
                st.just("many"), st.lists(st.integers(0, 70), unique=True, max_size=8), st.integers(0, 6)
            ),
            st.tuples(  # set_many over rows with gaps (a batch with rejected rows between)
                st.just("gaps"),
                st.lists(st.integers(0, 70), unique=True, min_size=1, max_size=30).map(sorted),
                st.integers(0, 6),
            ),
        ),
        max_size=40,
    )

    @settings(max_examples=200, deadline=None)
    @given(ops, st.integers(0, 80), st.integers(0, 80))
    def test_same_as_a_list(self, ops: list[tuple[object, ...]], start: int, stop: int) -> None:
        import numpy as np

        from pipeline.ledger import StatusArray

        arr, model = StatusArray(), [0] * 72
        arr.reserve(71)
        for op in ops:
            if op[0] == "set":
                arr[op[1]] = op[2]  # type: ignore[index]
                model[op[1]] = op[2]  # type: ignore[index]
            elif op[0] == "run":
                rows = list(range(op[1], op[1] + op[2]))  # type: ignore[operator]
                arr.set_many(rows, op[3])  # type: ignore[arg-type]
                for r in rows:
                    model[r] = op[3]  # type: ignore[assignment]
            elif op[0] == "gaps":
                arr.set_many(op[1], op[2])  # type: ignore[arg-type]
                for r in op[1]:  # type: ignore[attr-defined]
                    model[r] = op[2]  # type: ignore[assignment]
            else:
                rows = op[1]  # type: ignore[assignment]
                arr.set_rows(np.array(rows, np.int64), np.full(len(rows), op[2]))
                for r in rows:
                    model[r] = op[2]  # type: ignore[assignment]
        n = len(arr)  # room for 2M rows (a MiB): rows past the model's 72 are all 0
        assert n >= 2 << 20 and [arr[r] for r in range(80)] == [*model, 0, 0, 0, 0, 0, 0, 0, 0]
        full = [*model, *[0] * 8]  # rows 0-79
        if start <= stop:
            assert arr.unpack(start, stop).tolist() == full[start:stop]
        table = bytes(range(100, 116)) + bytes(240)
        assert arr.flags(table, start, 80) == bytes(table[v] for v in full[start:80])
        for v in range(7):
            assert arr.count(v, start, stop) == full[start:stop].count(v)
            past = max(start, 80) if v == 0 else -1  # rows from 80 on are all 0
            expected = next((i for i in range(start, 80) if full[i] == v), past)
            assert arr.first(bytes(s == v for s in range(256)), start) == expected
            assert arr.histogram()[v] == model.count(v) + (n - 72 if v == 0 else 0)
        assert arr.rows_with(1, 5) == [i for i, v in enumerate(model) if v in (1, 5)]
        marks = bytes(v in (2, 3) for v in range(256))
        assert arr.first(marks, start) == next((i for i in range(start, 72) if model[i] in (2, 3)), -1)


# What a key can hold: any character, and the surrogates that undecodable source bytes become.
_KEY_CHARACTERS = st.one_of(
    st.characters(), st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, exclude_categories=())
)


class TestKeyedLines:
    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.text(alphabet=_KEY_CHARACTERS, max_size=6), min_size=1, max_size=8),
        st.sampled_from(['"sent","b":7', '"failed","b":7,"c":"5%\\u00e9"', '"sent","b":7,"c":"x%%y"']),
    )
    def test_same_bytes_as_one_line_at_a_time(self, keys: list[str], tail: str) -> None:
        """The one-format fast path writes exactly what ``json_text`` per key writes (quotes,
        control characters, lone surrogates from undecodable source bytes, '%' in a code)."""
        from pipeline.ledger.format import json_text, keyed_lines

        head = b'{"r":%d,"s":' + tail.replace("%", "%%").encode()
        rows = list(range(10, 10 + len(keys)))
        pairs = zip(rows, keys, strict=True)
        slow = b"".join([head % r + b',"k":' + json_text(k) + b"}\n" for r, k in pairs])
        assert keyed_lines(head, rows, keys) == slow
