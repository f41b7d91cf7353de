"""Checks before sending: text length per provider, mobile number validity per country.

Unit tests of each provider's text limit; differential tests of the mainland fast paths
against ``phonenumbers``; ``--dry-run`` counts; end to end against the simulator, the
rejected recipients never reach it.
"""

from __future__ import annotations

import csv
import dataclasses
import random
from collections import Counter
from pathlib import Path

import anyio
import orjson
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.app.campaign import parse_campaign
from pipeline.ops.dryrun import dry_run
from pipeline.render import (
    _CN_MOBILE,
    _MOBILES,
    Rejection,
    Renderer,
    Template,
    _mobile_mask,
    campaign_text_limit,
    mobile_problem,
    reason_group,
)
from providers.aliyun import AliyunSms
from providers.aliyun_card import AliyunCardSms
from providers.base import Message, TextLimit
from providers.nxcloud import NxcloudSms
from providers.submail import SubmailSms
from tests.helpers import final_statuses, simulator, sluice

MOBILE = {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}


def is_mobile(e164: str) -> bool:
    """phonenumbers' own answer: the reference the fast paths are checked against."""
    try:
        return phonenumbers.number_type(phonenumbers.parse("+" + e164)) in MOBILE
    except phonenumbers.NumberParseException:
        return False


def msg(content: str | None = None, sign: str = "Acme", **params: str) -> Message:
    return Message(1, "k1", "8613900000001", dict(params), sign, content)


class TestTextLimits:
    def test_nxcloud_counts_the_content_as_sent(self) -> None:
        limit = NxcloudSms.text_limit()
        assert limit.problem(msg("x" * 1000)) is None
        assert limit.problem(msg("x" * 1001)) == "text is 1 001 characters; nxcloud allows 1 000"
        assert limit.problem(msg("x" * 1203)) == "text is 1 203 characters; nxcloud allows 1 000"

    def test_submail_batchsend_counts_the_signature_it_adds(self) -> None:
        limit = SubmailSms.text_limit("batchsend")
        assert limit.problem(msg("x" * 994)) is None  # 【Acme】 + 994 = 1000
        assert limit.problem(msg("x" * 995)) == "text is 1 001 characters; submail allows 1 000"
        assert limit.problem(msg("【Other】" + "x" * 993)) is None  # leading with 【…】: sent as is

    def test_submail_multisend_fills_the_vars(self) -> None:
        limit = SubmailSms.text_limit("multisend")
        assert limit.text(msg("Hi @var(name)!", name="Li")) == "【Acme】Hi Li!"
        assert limit.problem(msg("@var(name)", name="x" * 995)) is not None
        assert limit.problem(msg("@var(name)", name="x" * 994)) is None

    def test_submail_multixsend_knows_what_it_can(self) -> None:
        known = SubmailSms.text_limit("multixsend")
        assert not known.whole and known.text(msg(code="1234")) == "【Acme】1234"
        whole = SubmailSms.text_limit("multixsend", "Your code is ${code}.")
        assert whole.whole and whole.text(msg(code="1234")) == "【Acme】Your code is 1234."

    def test_aliyun_signature_and_template_text_at_most_500(self) -> None:
        limit = AliyunSms.text_limit("Dear ${name}, ${name}!!")  # 9 characters besides the two names
        assert limit.text(msg(name="Li")) == "【Acme】Dear Li, Li!!"
        assert limit.problem(msg(name="x" * 242)) is None  # 6 + 9 + 2 * 242 = 499
        assert limit.problem(msg(name="x" * 243)) == "text is 501 characters; aliyun allows 500"
        known = AliyunSms.text_limit(None)  # the template's text unknown: signature + values only
        assert not known.whole
        assert known.problem(msg(a="x" * 300, b="y" * 194)) is None
        assert known.problem(msg(a="x" * 300, b="y" * 195)) == "text is 501 characters; aliyun allows 500"

    def test_aliyun_card_checks_the_sms_fallback_when_its_text_is_known(self) -> None:
        assert AliyunCardSms.text_limit("SMS", None) is None
        assert AliyunCardSms.text_limit("NONE", "Hi ${n}") is None
        limit = AliyunCardSms.text_limit("SMS", "Hi ${n}")
        assert limit is not None
        assert limit.text(msg(**{"n": "shared", "sms.n": "own", "card.n": "card"})) == "【Acme】Hi own"

    def test_campaign_picks_its_protocol(self, tmp_path: Path) -> None:
        def limit_of(provider: dict[str, str], message: dict[str, object]) -> TextLimit | None:
            data = {
                "source": {"kind": "csv", "path": "r.csv", "phone": "phone"},
                "provider": provider,
                "message": {"sign_name": "Acme", **message},
            }
            return campaign_text_limit(parse_campaign(data, tmp_path))

        nx = limit_of({"kind": "simulator", "protocol": "nxcloud"}, {"content": "{t}"})
        assert nx is not None and nx.provider == "nxcloud" and nx.whole
        ali = limit_of({"kind": "aliyun"}, {"template_code": "T", "template_text": "Hi ${n}"})
        assert ali is not None and ali.provider == "aliyun" and ali.whole
        sub = limit_of({"kind": "submail", "mode": "multixsend"}, {"project": "P"})
        assert sub is not None and sub.provider == "submail" and not sub.whole

    def test_reasons_group_for_counting(self) -> None:
        assert reason_group("text is 1 203 characters; nxcloud allows 1 000") == (
            "text longer than nxcloud allows (1 000 characters)"
        )
        assert reason_group("duplicate key") == "duplicate key"


class TestMobileNumbers:
    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            ("23800000019", "not a mobile number for CV"),  # read as +238: no mainland number
            ("+8623800000019", "not a mobile number for CN"),
            ("14012345678", "not a mobile number for CN"),  # 140: no mobile prefix
            ("+86 21 6232 1234", "not a mobile number for CN"),  # a Shanghai landline
            ("+44 20 7946 0958", "not a mobile number for GB"),  # a London landline
            ("+999 123 456 789", "no country has this calling code"),
        ],
    )
    def test_not_a_mobile_is_rejected(self, raw: str, reason: str) -> None:
        renderer = Renderer(phone_column="phone", sign_name=Template.compile("Acme"), params={})
        r = renderer.render(1, "k", {"phone": raw})
        assert isinstance(r, Rejection) and r.reason.startswith(reason), r

    @pytest.mark.parametrize(
        ("raw", "phone"),
        [
            ("13912345678", "8613912345678"),
            ("+86 174 0512 3456", "8617405123456"),  # 1740[0-5]: a mobile range
            ("+44 7911 123456", "447911123456"),
            ("+1 202 555 0123", "12025550123"),  # NANP: fixed line or mobile, cannot tell
            ("0049 1512 3456789", "4915123456789"),
        ],
    )
    def test_mobiles_everywhere_are_accepted(self, raw: str, phone: str) -> None:
        renderer = Renderer(phone_column="phone", sign_name=Template.compile("Acme"), params={})
        m = renderer.render(1, "k", {"phone": raw})
        assert isinstance(m, Message) and m.phone == phone
        assert mobile_problem(phone) is None

    def test_fast_pattern_is_phonenumbers_on_every_prefix(self) -> None:
        """Every 5-digit mainland prefix 10000-19999 with random endings: the fast pattern
        accepts exactly the numbers phonenumbers types as mobile."""
        rng = random.Random(12)
        numbers = [f"{p}{rng.randrange(10**6):06d}" for p in range(10000, 20000) for _ in range(2)]
        disagree = [n for n in numbers if bool(_CN_MOBILE.match(n)) != is_mobile("86" + n)]
        assert disagree == []
        assert sum(1 for n in numbers if _CN_MOBILE.match(n)) > 5000  # both sides were exercised

    @settings(max_examples=300)
    @given(st.from_regex(r"[1-9][0-9]{5,12}", fullmatch=True))
    def test_mainland_numbers_of_any_shape_same_as_phonenumbers(self, national: str) -> None:
        assert (mobile_problem("86" + national) is None) == is_mobile("86" + national)

    def test_a_trunk_zero_after_the_country_code_is_rejected(self) -> None:
        """phonenumbers drops it while parsing (+86 0139… is +86 139…); the digits would be sent
        as written, which is no E.164 number: rejected."""
        trunk = "86" + "0" + "13900000000"
        assert is_mobile(trunk) and mobile_problem(trunk) == "not a mobile number for CN"

    @settings(max_examples=300)
    @given(st.from_regex(r"1[0-9]{10}", fullmatch=True))
    def test_render_fast_path_same_as_phonenumbers(self, raw: str) -> None:
        renderer = Renderer(phone_column="phone", sign_name=Template.compile("Acme"), params={})
        bare = renderer.render(1, "k", {"phone": raw})  # the fast path when it is a mobile
        plus = renderer.render(1, "k", {"phone": "+86" + raw})  # never the fast path
        assert bare == plus
        assert isinstance(plus, Message) == is_mobile("86" + raw)

    @settings(max_examples=200)
    @given(st.lists(st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True), max_size=20))
    def test_chunk_pattern_is_the_number_pattern_back_to_back(self, numbers: list[str]) -> None:
        assert bool(_MOBILES.fullmatch("".join(numbers))) == all(_CN_MOBILE.match(n) for n in numbers)

    @settings(max_examples=200)
    @given(
        st.lists(
            st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True)
            | st.sampled_from(["14012345678", "2380000001", "+8613900000", "１３９０００００００１", ""])
            | st.none(),
            max_size=40,
        )
    )
    def test_chunk_mask_is_the_number_pattern_one_by_one(self, raws: list[str | None]) -> None:
        want = [int(type(r) is str and _CN_MOBILE.match(r) is not None) for r in raws]
        assert list(_mobile_mask(raws)) == want


class TestDryRun:
    def test_reject_reasons_with_counts_and_segments_of_the_real_text(self, tmp_path: Path) -> None:
        rows = [
            ("a", "13900000001", "x" * 1203),
            ("b", "23800000019", "hi"),
            ("c", "13900000003", "y" * 1001),
        ]
        rows += [(f"g{i}", f"1390000{i:04d}", "z" * 100) for i in range(10, 15)]
        with (tmp_path / "r.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("id", "phone", "text"), *rows])
        campaign = parse_campaign(
            {
                "source": {"kind": "csv", "path": "r.csv", "phone": "phone", "key": "id"},
                "provider": {"kind": "simulator", "endpoint": "http://fake.invalid", "protocol": "nxcloud"},
                "message": {"sign_name": "Acme", "content": "{text}", "price_per_segment": 0.1},
            },
            tmp_path,
        )
        report = anyio.run(dry_run, campaign)
        assert report.rows == 8 and report.sendable == 5 and report.rejected == 3
        assert report.reasons == {
            "text longer than nxcloud allows (1 000 characters)": 2,
            "not a mobile number for CV (read with its country code: a bare number is mainland when "
            "it starts with 1)": 1,
        }
        assert ("text is 1 203 characters; nxcloud allows 1 000") in [e for _, _, e in report.examples]
        # The content is counted (100 characters: 2 mainland segments), not signature + parameters.
        assert report.by_segments == {2: 5} and report.counted_template
        assert not (tmp_path / "run").exists()


# -- end to end: rejected before sending, the simulator never sees them -------------------------

PROVIDERS = {
    "aliyun": ('protocol = "aliyun"', 'template_code = "SMS_1"\nparams = { name = "{text}" }', 500),
    "aliyun-card": (
        'protocol = "aliyun-card"',
        'card_template_code = "CARD_1"\nfallback_type = "SMS"\ntemplate_code = "SMS_1"\n'
        'template_text = "Hello ${name}"\nparams = { name = "{text}" }',
        500,
    ),
    "submail-batchsend": ('protocol = "submail"\nmode = "batchsend"', 'content = "{text}"', 1000),
    "submail-multixsend": (
        'protocol = "submail"\nmode = "multixsend"',
        'project = "ThJBE4"\nparams = { name = "{text}" }',
        1000,
    ),
    "nxcloud": ('protocol = "nxcloud"', 'content = "{text}"', 1000),
}


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_over_long_texts_and_bad_numbers_never_reach_the_provider(tmp_path: Path, name: str) -> None:
    provider, message, limit = PROVIDERS[name]
    good = {f"g{i}": f"1390000{i:04d}" for i in range(1, 41)}
    too_long = {"long1": "13911110001", "long2": "13911110002"}
    bad_numbers = {"bad1": "23800000019", "bad2": "14012345678", "bad3": "+442079460958"}
    with (tmp_path / "recipients.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "phone", "text"])
        w.writerows((k, p, "x" * 20) for k, p in good.items())
        w.writerows((k, p, "y" * (limit + 1)) for k, p in too_long.items())
        w.writerows((k, p, "z" * 20) for k, p in bad_numbers.items())
    with simulator(tmp_path, "--latency-ms", "1") as sim:
        (tmp_path / "c.toml").write_text(
            f"""
[source]
kind = "csv"
path = "recipients.csv"
key = "id"
phone = "phone"
[provider]
kind = "simulator"
endpoint = "{sim.url}"
timeout = 5.0
{provider}
[message]
sign_name = "Acme"
{message}
[limits]
batch_size = 20
[run]
dir = "run"
"""
        )
        p = sluice("run", str(tmp_path / "c.toml"))
        _, err = p.communicate(timeout=120)
        sim.stop()
        accepted = Counter(phone[-11:] for phone in sim.accepted().elements())
    assert p.returncode == 0, err.decode()
    ledger = tmp_path / "run" / "ledger.jsonl"
    statuses = final_statuses(ledger)
    lines = [orjson.loads(x) for x in ledger.read_bytes().splitlines() if x.startswith(b'{"r":')]
    reasons = {x["k"]: x.get("e") for x in lines if x["s"] == "rejected"}
    assert set(reasons) == set(too_long) | set(bad_numbers), reasons
    allows = f"allows {limit:,}".replace(",", " ")
    for key in too_long:
        assert reasons[key].startswith("text is ") and reasons[key].endswith(allows), reasons[key]
    assert reasons["bad1"].startswith("not a mobile number for CV")
    assert reasons["bad2"] == "not a mobile number for CN"
    assert reasons["bad3"] == "not a mobile number for GB"
    assert Counter(statuses.values()) == {"sent": len(good), "rejected": 5}
    assert accepted == {p: 1 for p in good.values()}  # none of the rejected reached the simulator


def test_the_check_keeps_the_columnar_fast_path(tmp_path: Path) -> None:
    """A clean chunk still renders in one pass with a text limit; one row over it sends the
    chunk row by row, and only that row is rejected."""
    limit = dataclasses.replace(AliyunSms.text_limit(None), max_length=20)  # 【S】 + values ≤ 20
    renderer = Renderer(
        phone_column="phone",
        sign_name=Template.compile("S"),
        params={"a": Template.compile("{a}")},
        text_limit=limit,
    )
    rows, keys = [1, 2, 3], ["k1", "k2", "k3"]
    phones = ("13900000001", "13900000002", "13900000003")
    fits = renderer.render_columns(rows, keys, ["phone", "a"], [phones, ("x" * 17, "b", "c")])
    assert fits is not None and [m.params["a"] for m in fits] == ["x" * 17, "b", "c"]
    assert renderer.render_columns(rows, keys, ["phone", "a"], [phones, ("x" * 18, "b", "c")]) is None
    values = ("x" * 18, "b", "c")
    items = [(r, k, {"phone": p, "a": a}) for r, k, p, a in zip(rows, keys, phones, values, strict=True)]
    messages, rejects = renderer.render_rows(items)
    assert [m.row for m in messages] == [2, 3]
    assert rejects == [(1, "k1", "text is 21 characters; aliyun allows 20")]
