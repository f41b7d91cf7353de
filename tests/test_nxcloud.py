"""providers.nxcloud at unit level: vectors D1-D5, message ids, requests, codes, defensive parsing."""

from __future__ import annotations

import datetime
import re
import urllib.parse
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.base import Batch, BatchOutcome, Message, Outcome
from providers.nxcloud import (
    CODE_CLASSES,
    CredentialsError,
    NxcloudCredentials,
    NxcloudSms,
    classify,
    message_id,
    nx_sign,
    nx_string_to_sign,
    parse_record,
    verify,
)

AK, SECRET, TS = "fme2na3kdi3ki", "abciiiko2k3", "1655710885431"
CREDS = NxcloudCredentials(AK, SECRET, "yourAppKey")
D5_BODY = (
    b'{"appKey":"yourAppKey","items":[{"phone":"8615088888888","content":"Your code is 1234",'
    b'"sysMessageId":"order-000000001"},{"phone":"8615088888889","content":"Your code is 5678",'
    b'"sysMessageId":"order-000000002"}]}'
)
ID_RE = re.compile(r"[0-9A-Za-z-]{10,50}")
IDS = tuple(message_id("r1", f"key-{i}") for i in (1, 2, 3))


def _msgs(n: int) -> list[Message]:
    return [Message(i, f"key-{i}", f"86150{i:08d}", {}, "", f"Your code is {i:04d}") for i in range(1, n + 1)]


def _headers(request: httpx.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _response(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.Response(status, content=content, headers=headers or {})


class TestVectors:
    @pytest.mark.parametrize(
        ("body", "sign"),
        [
            ('{"name":"牛小信","id":10001}', "87c3560d3331ae23f1021e2025722354"),  # D1
            ('{"id":10001,"name":"牛小信"}', "7750759da06333f20d0640be09355e34"),  # D2
            ('{"id": 10001, "name": "牛小信"}', "d0c24a9886c629330d7f3f2056c65bc2"),  # D3
        ],
        ids=["D1", "D2", "D3"],
    )
    def test_d1_d3_official(self, body: str, sign: str) -> None:
        assert nx_sign(AK, "send", "1", TS, body, SECRET) == sign
        assert nx_sign(AK, "send", "1", TS, body.encode(), SECRET) == sign

    def test_d1_string(self) -> None:
        assert (
            nx_string_to_sign(AK, "send", "1", TS, '{"name":"牛小信","id":10001}', SECRET)
            == (
                'accessKey=fme2na3kdi3ki&action=send&bizType=1&ts=1655710885431&body={"name":"牛小信","id":10001}'
                "&accessSecret=abciiiko2k3"
            ).encode()
        )
        assert b"&body=" not in nx_string_to_sign(AK, "send", "1", TS, None, SECRET)
        assert b"&body=" not in nx_string_to_sign(AK, "send", "1", TS, b"", SECRET)

    def test_d4_sha256(self) -> None:
        assert nx_sign(AK, "send", "1", TS, '{"name":"牛小信","id":10001}', SECRET, "sha256") == (
            "e0eec2c99ef80f269a82795e2223f618ebfc0616c8b6c8c7d438021ec38ad0eb"
        )

    def test_d5_through_build_request(self) -> None:
        p = NxcloudSms(credentials=CREDS, clock=lambda: 1655710885.431, id_for=lambda tag, key: key)
        msgs = [
            Message(1, "order-000000001", "8615088888888", {}, "", "Your code is 1234"),
            Message(2, "order-000000002", "8615088888889", {}, "", "Your code is 5678"),
        ]
        r = p.build_request(Batch(1, msgs))
        assert r.content == D5_BODY
        h = _headers(r)
        assert h["sign"] == "95721084d3194bf5480c45717e144f30"
        assert (h["accesskey"], h["ts"], h["biztype"], h["action"]) == (AK, TS, "3", "mtsend")
        assert h["content-type"] == "application/json" and "algorithm" not in h
        assert nx_sign(AK, "mtsend", "3", TS, D5_BODY, SECRET) == "95721084d3194bf5480c45717e144f30"


class TestMessageId:
    def test_shape_and_determinism(self) -> None:
        a = message_id("a1b2c3d4", "row-17")
        assert a == message_id("a1b2c3d4", "row-17") and ID_RE.fullmatch(a)
        assert a.startswith("a1b2c3d4-") and len(a) == 9 + 32
        assert a != message_id("a1b2c3d4", "row-18") and a != message_id("other", "row-17")
        assert message_id("", "k") == message_id("", "k") and len(message_id("", "k")) == 32
        assert message_id("run_1.x/y", "k").startswith("run1xy-")
        assert len(message_id("t" * 100, "k")) == 49

    @given(st.text(max_size=40), st.text(max_size=200))
    def test_always_valid(self, tag: str, key: str) -> None:
        assert ID_RE.fullmatch(message_id(tag, key))

    def test_lone_surrogates_do_not_raise(self) -> None:
        assert ID_RE.fullmatch(message_id("r", "bad\udcff\ud800"))

    def test_provider_uses_the_run_tag(self) -> None:
        p = NxcloudSms(credentials=CREDS, run_tag="a1b2c3d4")
        m = _msgs(1)[0]
        body = orjson.loads(p.build_request(Batch(1, [m])).content)
        assert body["items"][0]["sysMessageId"] == message_id("a1b2c3d4", "key-1") == p.message_id(m)


class TestRequests:
    @pytest.mark.parametrize("algorithm", ["md5", "sha256"])
    def test_round_trip_verifies(self, algorithm: str) -> None:
        p = NxcloudSms(
            credentials=CREDS,
            run_tag="r1",
            algorithm="sha256" if algorithm == "sha256" else "md5",
            source_address="ACME1",
        )
        msgs = _msgs(3)
        msgs[1].content = 'Quote " back\\slash 牛 \n newline'
        r = p.build_request(Batch(1, msgs, out_id="r1-1-1"))
        assert r.method == "POST" and str(r.url) == "https://api2.nxcloud.com/v1/sms/multi/mt"
        h = _headers(r)
        assert verify(h, r.content, SECRET)
        assert not verify(h, r.content + b" ", SECRET)  # the signed bytes are the sent bytes
        assert not verify({**h, "ts": str(int(h["ts"]) + 1)}, r.content, SECRET)
        assert not verify(h, r.content, "wrong")
        assert (h.get("algorithm") == "sha256") == (algorithm == "sha256")
        body = orjson.loads(r.content)
        assert body["appKey"] == "yourAppKey"
        assert [i["phone"] for i in body["items"]] == [m.phone for m in msgs]
        assert body["items"][1]["content"] == msgs[1].content
        assert all(i["sourceAddress"] == "ACME1" for i in body["items"])
        assert len({i["sysMessageId"] for i in body["items"]}) == 3

    def test_ts_is_milliseconds(self) -> None:
        p = NxcloudSms(credentials=CREDS, clock=lambda: 1700000000.1234)
        assert _headers(p.build_request(Batch(1, _msgs(1))))["ts"] == "1700000000123"

    def test_batching(self) -> None:
        p = NxcloudSms(credentials=CREDS)
        assert p.max_batch_size == 200 and len({p.batch_key(m) for m in _msgs(5)}) == 1

    def test_content_is_required(self) -> None:
        m = _msgs(1)[0]
        m.content = None
        with pytest.raises(ValueError, match="content"):
            NxcloudSms(credentials=CREDS).build_request(Batch(1, [m]))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"batch_size": 201},
            {"batch_size": 0},
            {"algorithm": "sha1"},
            {"source_address": "has space"},
            {"source_address": "x" * 21},
            {"endpoint": "ftp://x"},
        ],
    )
    def test_bad_configuration(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            NxcloudSms(credentials=CREDS, **kwargs)  # type: ignore[arg-type]

    @pytest.mark.anyio
    async def test_sent_through_an_httpx_client(self) -> None:
        seen: list[bool] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(verify(_headers(request), request.content, SECRET))
            items = orjson.loads(request.content)["items"]
            data = [{"phone": i["phone"], "messageid": i["sysMessageId"], "status": "Success"} for i in items]
            return httpx.Response(200, json={"code": 0, "message": "Success", "data": data})

        p = NxcloudSms(credentials=CREDS, run_tag="r", endpoint="http://sim.test/v1/sms/multi/mt")
        batch = Batch(1, _msgs(2))
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            response = await client.send(p.build_request(batch))
        assert seen == [True]
        r = p.parse_response(batch, response)
        assert r.outcome is Outcome.SENT and r.recipients is None


# The seed's code table (seeds/003) and the auth codes 1001-1005, as PROTOCOLS.md §3.5 classes them.
DOCUMENTED = {
    Outcome.SENT: ["0"],
    Outcome.UNKNOWN: ["-1"],
    Outcome.FATAL: ["1001", "1002", "1003", "1005", "1100", "1102", "9000", "13002", "13003", "13006"],
    Outcome.RETRY: ["1004"],
    Outcome.THROTTLED: ["13008"],
    Outcome.DEFER: ["13007"],
    Outcome.SPLIT: ["13001", "13005", "13009", "13010"],
}
SEED_TABLE = ["0", "-1", "1100", "1102", "9000", "13001", "13002", "13003", "13005", "13006", "13007",
              "13008", "13009", "13010"]  # fmt: skip


def _item(
    mid: str | None, status: str | None, message: str | None = None, phone: str | None = None
) -> dict[str, str]:
    item = {"phone": phone, "messageid": mid, "status": status, "message": message}
    return {k: v for k, v in item.items() if v is not None}


class TestCodeClasses:
    @pytest.mark.parametrize("outcome", list(DOCUMENTED), ids=lambda o: o.value)
    def test_every_documented_code_is_classified(self, outcome: Outcome) -> None:
        for code in DOCUMENTED[outcome]:
            assert CODE_CLASSES[code] is outcome, code
            assert classify(code, 200) is outcome

    def test_the_seed_table_is_covered_and_nothing_else(self) -> None:
        assert set(SEED_TABLE) <= set(CODE_CLASSES)
        assert set(CODE_CLASSES) == {c for codes in DOCUMENTED.values() for c in codes}

    @pytest.mark.parametrize(
        ("code", "status", "outcome"),
        [("6", 200, Outcome.FATAL), ("1000", 200, Outcome.FATAL), ("77", 400, Outcome.FATAL),
         ("77", 502, Outcome.UNKNOWN), ("77", 429, Outcome.THROTTLED), (None, 200, Outcome.FATAL)],
    )  # fmt: skip
    def test_unknown_codes(self, code: str | None, status: int, outcome: Outcome) -> None:
        assert classify(code, status) is outcome


class TestResponses:
    p = NxcloudSms(credentials=CREDS, run_tag="r1")
    batch = Batch(1, _msgs(3))
    ids = IDS

    def parse(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> BatchOutcome:
        return self.p.parse_response(self.batch, _response(status, body, headers))

    def outcomes(self, r: BatchOutcome) -> list[tuple[Outcome, str | None, str | None]]:
        assert r.recipients is not None and len(r.recipients) == 3
        return [(x.outcome, x.code, x.message) for x in r.recipients]

    @pytest.mark.parametrize("code", [0, "0"])
    def test_all_success_collapses(self, code: object) -> None:
        data = [_item(i, "Success") for i in reversed(self.ids)]
        r = self.parse({"code": code, "message": "Success", "data": data})
        assert r.outcome is Outcome.SENT and r.recipients is None and r.code == "0"

    @pytest.mark.parametrize("body", [{"code": 0, "message": "Success"}, {"code": 0, "data": None},
                                      {"code": 0, "data": []}, {"code": 0, "data": [1, "x"]}])  # fmt: skip
    def test_code_0_without_items_is_unknown(self, body: object) -> None:
        r = self.parse(body)
        assert r.outcome is Outcome.UNKNOWN and r.code == "NoResult"
        assert all(x.outcome is Outcome.UNKNOWN and x.code == "NoResult" for x in r.recipients or ())

    @pytest.mark.parametrize(
        "code", sorted({c for codes in DOCUMENTED.values() for c in codes} - {"0", "-1"})
    )
    def test_every_other_code_applies_to_the_whole_request(self, code: str) -> None:
        r = self.parse({"code": int(code), "message": "m", "data": None}, headers={"retry-after": "2"})
        assert (r.outcome, r.code, r.message, r.recipients) == (CODE_CLASSES[code], code, "m", None)
        assert r.retry_after == (2.0 if code == "13008" else None)

    def test_13007_defers_and_13005_splits_even_with_one_recipient(self) -> None:
        one = Batch(2, _msgs(1))
        assert (
            self.p.parse_response(one, _response(200, {"code": 13007, "data": None})).outcome is Outcome.DEFER
        )
        assert (
            self.p.parse_response(one, _response(200, {"code": 13005, "data": None})).outcome is Outcome.SPLIT
        )

    def test_items_of_a_refused_request_are_not_read(self) -> None:
        r = self.parse({"code": 13005, "data": [_item(i, "Success") for i in self.ids]})
        assert r.outcome is Outcome.SPLIT and r.recipients is None

    def test_partial_failure_matched_by_messageid_in_any_order(self) -> None:
        data = [_item(self.ids[2], "Success"), _item(self.ids[0], "Failure", "Incorrect phone number format"),
                _item(self.ids[1], "Success")]  # fmt: skip
        r = self.parse({"code": 0, "message": "Success", "data": data})
        assert r.outcome is Outcome.SENT
        assert self.outcomes(r) == [(Outcome.FAILED, "Failure", "Incorrect phone number format"),
                                    (Outcome.SENT, None, None), (Outcome.SENT, None, None)]  # fmt: skip
        assert r.recipients is not None and [x.provider_id for x in r.recipients] == list(self.ids)

    def test_all_failure(self) -> None:
        r = self.parse({"code": 0, "data": [_item(i, "Failure", f"bad {i[-3:]}") for i in self.ids]})
        assert r.outcome is Outcome.FAILED
        assert self.outcomes(r) == [(Outcome.FAILED, "Failure", f"bad {i[-3:]}") for i in self.ids]

    def test_a_rate_limit_item_is_deferred_not_failed(self) -> None:
        data = [_item(self.ids[0], "Failure", "Rate limit exceeded (5 messages per hour)"),
                _item(self.ids[1], "Failure", "TPS limit exceeded"),
                _item(self.ids[2], "Success")]  # fmt: skip
        r = self.parse({"code": 0, "data": data})
        assert [o for o, _, _ in self.outcomes(r)] == [Outcome.DEFER, Outcome.DEFER, Outcome.SENT]

    def test_fallback_by_a_number_unique_in_the_batch(self) -> None:
        data = [
            _item(None, "Success", phone="8615000000001"),
            _item("their-own-id", "Failure", "x", "8615000000002"),
        ]
        r = self.parse({"code": 0, "data": data})
        assert self.outcomes(r) == [(Outcome.SENT, None, None), (Outcome.FAILED, "Failure", "x"),
                                    (Outcome.UNKNOWN, "NoResult", None)]  # fmt: skip

    def test_no_fallback_by_a_number_that_occurs_twice_nor_by_position(self) -> None:
        msgs = _msgs(3)
        msgs[1].phone = msgs[0].phone
        batch = Batch(1, msgs)
        data = [_item(None, "Success", phone=msgs[0].phone), _item("x1", "Success"), _item("x2", "Success")]
        r = self.p.parse_response(batch, _response(200, {"code": 0, "data": data}))
        assert r.outcome is Outcome.UNKNOWN and r.recipients is not None
        assert all(x.outcome is Outcome.UNKNOWN and x.code == "NoResult" for x in r.recipients)

    def test_missing_and_conflicting_items_are_unknown(self) -> None:
        data = [_item(self.ids[0], "Success"), _item(self.ids[0], "Failure", "no"),
                _item(self.ids[1], "Success"), _item(self.ids[1], "Success"),
                _item("stranger-0001", "Success")]  # fmt: skip
        r = self.parse({"code": 0, "data": data})
        assert r.outcome is Outcome.SENT
        assert self.outcomes(r) == [(Outcome.UNKNOWN, "ConflictingResults", None), (Outcome.SENT, None, None),
                                    (Outcome.UNKNOWN, "NoResult", None)]  # fmt: skip

    @pytest.mark.parametrize(("status", "code"), [(None, "NoStatus"), ("Pending", "Pending"), (3, "3")])
    def test_an_item_without_a_known_status_is_unknown(self, status: object, code: str) -> None:
        data = [{"messageid": i, "status": status} for i in self.ids]
        r = self.parse({"code": 0, "data": data})
        assert r.outcome is Outcome.UNKNOWN and {c for _, c, _ in self.outcomes(r)} == {code}

    def test_minus_1_is_unknown_unless_items_say_otherwise(self) -> None:
        r = self.parse({"code": -1, "message": "Failure", "data": None})
        assert (r.outcome, r.code, r.recipients) == (Outcome.UNKNOWN, "-1", None)
        data = [_item(self.ids[0], "Failure", "Blacklisted"), _item(self.ids[1], "Success")]
        r = self.parse({"code": -1, "message": "Failure", "data": data})
        assert self.outcomes(r) == [(Outcome.FAILED, "Failure", "Blacklisted"), (Outcome.SENT, None, None),
                                    (Outcome.UNKNOWN, "NoResult", None)]  # fmt: skip

    def test_success_code_with_an_error_status_is_unknown(self) -> None:
        assert (
            self.parse({"code": 0, "data": [_item(i, "Success") for i in self.ids]}, 502).outcome
            is Outcome.UNKNOWN
        )

    @pytest.mark.parametrize(
        ("status", "body", "outcome"),
        [
            (200, b"", Outcome.UNKNOWN),
            (200, b"[]", Outcome.UNKNOWN),
            (200, b'{"code":', Outcome.UNKNOWN),
            (200, b'{"code":true}', Outcome.UNKNOWN),
            (200, b'{"message":"ok"}', Outcome.UNKNOWN),
            (503, b"<html>busy</html>", Outcome.UNKNOWN),
            (401, b"<html>denied</html>", Outcome.FATAL),
            (429, b"", Outcome.THROTTLED),
        ],
    )
    def test_unreadable_bodies(self, status: int, body: bytes, outcome: Outcome) -> None:
        r = self.parse(body, status)
        assert r.outcome is outcome and r.code == f"HTTP{status}"

    @given(st.binary(max_size=200), st.sampled_from([200, 400, 429, 500]))
    def test_garbage_bytes_never_raise(self, body: bytes, status: int) -> None:
        assert isinstance(self.parse(body, status).outcome, Outcome)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False)
            | st.text(max_size=5) | st.sampled_from(["0", "-1", "Success", "Failure", "13005", *IDS]),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["code", "data", "phone", "messageid", "status", "message"]),
                inner,
                max_size=5,
            ),
            max_leaves=20,
        ),
        st.sampled_from([200, 400, 500]),
    )  # fmt: skip
    def test_garbage_json_never_raises_nor_sends_without_an_item(self, body: object, status: int) -> None:
        r = self.parse(orjson.dumps(body), status)
        assert r.recipients is None or len(r.recipients) == 3
        if r.outcome is Outcome.SENT and r.recipients is None:  # only when every recipient has a Success item
            assert isinstance(body, dict) and isinstance(body.get("data"), list)
            succeeded = [x for x in body["data"] if isinstance(x, dict) and x.get("status") == "Success"]
            assert set(IDS) <= {x.get("messageid") for x in succeeded if isinstance(x.get("messageid"), str)}


class TestRecordQuery:
    creds = NxcloudCredentials(AK, SECRET, "app-1", app_secret="app-secret")

    def test_request(self) -> None:
        p = NxcloudSms(credentials=self.creds)
        r = p.record_query_request("r1-abc", datetime.date(2023, 2, 2))
        assert r.method == "POST" and str(r.url) == "https://api2.nxcloud.com/api/sms/get"
        assert r.headers["content-type"] == "application/x-www-form-urlencoded"
        assert dict(urllib.parse.parse_qsl(r.content.decode())) == {
            "appkey": "app-1", "secretkey": "app-secret", "date": "20230202", "messageid": "r1-abc"
        }  # fmt: skip
        legacy = NxcloudSms(credentials=self.creds, record_url="http://api2.nxcloud.com/api/sms/get")
        r = legacy.record_query_request("m", "20240101")
        assert str(r.url).startswith("http://") and b"date=20240101" in r.content

    def test_needs_the_app_secret(self) -> None:
        with pytest.raises(CredentialsError, match="NXCLOUD_APP_SECRET"):
            NxcloudSms(credentials=CREDS).record_query_request("m", "20240101")

    def test_parse(self) -> None:
        row = {"msgid": "r1-abc", "phone": "6288888888888", "dr": "DELIVRD", "billing_size": 1}
        ok = parse_record(_response(200, {"code": "0", "row": row}))
        assert ok.ok and ok.code == "0" and ok.row == row
        old = parse_record(_response(200, {"code": 3, "msg": "Only recent 31 days"}))
        assert not old.ok and old.code == "3" and old.row is None and old.message == "Only recent 31 days"
        for body in (b"", b"<html/>", b"[1]", b'{"row":{}}'):
            bad = parse_record(_response(502, body))
            assert not bad.ok and bad.code == "HTTP502"


class TestCredentials:
    def test_repr_hides_the_secrets(self) -> None:
        c = NxcloudCredentials("ak-visible", "s3cr3t-value", "app-visible", "app-s3cr3t")
        for text in (repr(c), str(c)):
            assert "s3cr3t-value" not in text and "app-s3cr3t" not in text and "ak-visible" in text

    def test_from_env(self) -> None:
        env = {"NXCLOUD_ACCESS_KEY": "visible-ak", "NXCLOUD_APP_KEY": "visible-app"}
        with pytest.raises(CredentialsError, match="NXCLOUD_ACCESS_SECRET") as info:
            NxcloudCredentials.from_env(env)
        assert "visible" not in str(info.value)
        with pytest.raises(
            CredentialsError, match="NXCLOUD_ACCESS_KEY and NXCLOUD_ACCESS_SECRET and NXCLOUD_APP_KEY"
        ):
            NxcloudCredentials.from_env({})
        full = {**env, "NXCLOUD_ACCESS_SECRET": "s"}
        assert NxcloudCredentials.from_env(full) == NxcloudCredentials("visible-ak", "s", "visible-app")
        assert NxcloudCredentials.from_env({**full, "NXCLOUD_APP_SECRET": "a"}).app_secret == "a"


class TestLedger:
    def test_a_failed_item_reason_reaches_the_ledger(self, tmp_path: Path) -> None:
        from pipeline.ledger import LedgerWriter, Status, replay

        p = NxcloudSms(credentials=CREDS, run_tag="r1")
        batch = Batch(7, _msgs(3))
        data = [_item(IDS[0], "Success"), _item(IDS[1], "Failure", 'Incorrect "phone" format'),
                _item(IDS[2], "Failure", "Rate limit exceeded (5 messages per hour)")]  # fmt: skip
        result = p.parse_response(batch, _response(200, {"code": 0, "message": "Success", "data": data}))
        w = LedgerWriter(tmp_path / "ledger.jsonl")
        w.outcome(batch, result, 12.0)
        w.close()
        _version, *lines = [orjson.loads(x) for x in (tmp_path / "ledger.jsonl").read_bytes().splitlines()]
        assert lines[0]["s"] == "mixed" and lines[0]["b"] == 7
        assert [(x["s"], x.get("c"), x.get("e")) for x in lines[1:]] == [
            ("sent", None, None),
            ("failed", "Failure", 'Incorrect "phone" format'),
            ("deferred", "Failure", "Rate limit exceeded (5 messages per hour)"),
        ]
        state = replay(tmp_path / "ledger.jsonl")
        assert [state.get(r) for r in (1, 2, 3)] == [Status.SENT, Status.FAILED, Status.DEFERRED]


def test_each_id_is_hashed_once_per_send_and_forgotten_when_answered() -> None:
    """body() hashes each recipient's key once; reading the answer reuses those ids, which are
    then forgotten; ids are the same as message_id's either way."""
    hashed: list[str] = []

    def id_for(tag: str, key: str) -> str:
        hashed.append(key)
        return message_id(tag, key)

    p = NxcloudSms(credentials=CREDS, run_tag="run1", id_for=id_for)
    batch = Batch(1, [Message(i, f"k{i}", f"861380000{i:04d}", {}, "S", "你好") for i in range(3)])
    items = orjson.loads(p.body(batch))["items"]
    assert [i["sysMessageId"] for i in items] == [message_id("run1", f"k{i}") for i in range(3)]
    answer = {"code": 0, "data": [{"messageid": i["sysMessageId"], "status": "Success"} for i in items]}
    assert p.parse_response(batch, _response(200, answer)).outcome is Outcome.SENT
    assert hashed == ["k0", "k1", "k2"]
    assert p.parse_response(batch, _response(200, answer)).outcome is Outcome.SENT  # forgotten: hashed again
    assert hashed == ["k0", "k1", "k2"] * 2
    p.run_tag = "run2"  # a new tag: nothing remembered under the old one is used
    assert orjson.loads(p.body(batch))["items"][0]["sysMessageId"] == message_id("run2", "k0")
