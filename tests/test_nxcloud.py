"""providers.nxcloud at unit level: vectors D1-D5, message ids, requests, codes, defensive parsing."""

from __future__ import annotations

import datetime
import re
import urllib.parse

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.base import Batch, Message, Outcome
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
            return httpx.Response(200, json={"code": 0, "message": "Success"})

        p = NxcloudSms(credentials=CREDS, run_tag="r", endpoint="http://sim.test/v1/sms/multi/mt")
        batch = Batch(1, _msgs(2))
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            response = await client.send(p.build_request(batch))
        assert seen == [True]
        r = p.parse_response(batch, response)
        assert r.outcome is Outcome.SENT and r.recipients is None


DOCUMENTED = {
    Outcome.SENT: ["0"],
    Outcome.FAILED: ["6", "4"],
    Outcome.FATAL: ["1001", "1003", "1005", "1", "9", "102", "1002", "2", "9000", "3", "5", "8", "104"],
    Outcome.RETRY: ["1004"],
    Outcome.THROTTLED: ["13008", "28"],
    Outcome.DEFER: ["27"],
    Outcome.UNKNOWN: ["99", "88"],
}


class TestCodeClasses:
    @pytest.mark.parametrize("outcome", list(DOCUMENTED), ids=lambda o: o.value)
    def test_every_documented_code_is_classified(self, outcome: Outcome) -> None:
        for code in DOCUMENTED[outcome]:
            assert CODE_CLASSES[code] is outcome, code
            assert classify(code, 200) is outcome

    def test_no_code_left_out(self) -> None:
        assert set(CODE_CLASSES) == {c for codes in DOCUMENTED.values() for c in codes}

    @pytest.mark.parametrize(
        ("code", "status", "outcome"),
        [("-1", 200, Outcome.FATAL), ("77", 400, Outcome.FATAL), ("77", 502, Outcome.UNKNOWN),
         ("77", 429, Outcome.THROTTLED), (None, 200, Outcome.FATAL)],
    )  # fmt: skip
    def test_unknown_codes(self, code: str | None, status: int, outcome: Outcome) -> None:
        assert classify(code, status) is outcome


class TestResponses:
    p = NxcloudSms(credentials=CREDS, run_tag="r1")
    batch = Batch(1, _msgs(3))
    ids = IDS

    @pytest.mark.parametrize("code", [0, "0"])
    def test_whole_request_success(self, code: object) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"code": code, "message": "Success"}))
        assert r.outcome is Outcome.SENT and r.recipients is None and r.code == "0"

    @pytest.mark.parametrize(
        ("status", "code", "outcome"),
        [
            (200, 1003, Outcome.FATAL),
            (200, "1004", Outcome.RETRY),
            (200, 13008, Outcome.THROTTLED),
            (200, 28, Outcome.THROTTLED),
            (200, 27, Outcome.DEFER),
            (200, 3, Outcome.FATAL),
            (200, 9000, Outcome.FATAL),
            (200, 99, Outcome.UNKNOWN),
            (200, 88, Outcome.UNKNOWN),
            (200, -1, Outcome.FATAL),
            (500, 12345, Outcome.UNKNOWN),
            (200, 6, Outcome.DEFER),  # a recipient's code for several recipients: nobody failed
        ],
    )
    def test_whole_request_codes(self, status: int, code: object, outcome: Outcome) -> None:
        r = self.p.parse_response(self.batch, _response(status, {"code": code, "msg": "m"}))
        assert r.outcome is outcome and r.code == str(code) and r.message == "m" and r.recipients is None

    def test_recipient_code_for_one_recipient_fails_it(self) -> None:
        one = Batch(2, _msgs(1))
        assert self.p.parse_response(one, _response(200, {"code": 6})).outcome is Outcome.FAILED

    def test_throttle_retry_after(self) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"code": 13008}, {"retry-after": "2"}))
        assert r.outcome is Outcome.THROTTLED and r.retry_after == 2.0

    @pytest.mark.parametrize("path", ["data", "data.items", "data.list"])
    def test_items_matched_by_id_with_partial_failure(self, path: str) -> None:
        items = [
            {"messageId": self.ids[2], "code": 0},
            {"sysMessageId": self.ids[0], "code": "6", "message": "invalid number"},
            {"messageId": self.ids[1] + "-1234567890"},  # no code: the request's code applies
        ]
        data: object = items
        for name in reversed(path.split(".")[1:]):
            data = {name: data}
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": data}))
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [(x.outcome, x.code, x.provider_id) for x in r.recipients] == [
            (Outcome.FAILED, "6", self.ids[0]),
            (Outcome.SENT, None, self.ids[1] + "-1234567890"),
            (Outcome.SENT, None, self.ids[2]),
        ]

    def test_items_matched_by_position(self) -> None:
        items = [{"code": 0}, {"code": 27}, {"code": 4}]
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": items}))
        assert r.recipients is not None
        assert [x.outcome for x in r.recipients] == [Outcome.SENT, Outcome.DEFER, Outcome.FAILED]

    def test_string_items_are_ids_and_all_accepted_collapses(self) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": list(reversed(IDS))}))
        assert r.outcome is Outcome.SENT and r.recipients is None  # nothing the keys do not give

    def test_fewer_items_than_recipients(self) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": [{"code": 0}]}))
        assert r.recipients is not None
        assert all(x.outcome is Outcome.UNKNOWN and x.code == "NoResult" for x in r.recipients)
        assert r.outcome is Outcome.UNKNOWN

    def test_all_items_throttled_is_a_batch_throttle(self) -> None:
        items = [{"code": 13008}] * 3
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": items}))
        assert r.outcome is Outcome.THROTTLED and r.recipients is None

    def test_configurable_paths_and_id_fields(self) -> None:
        p = NxcloudSms(credentials=CREDS, run_tag="r1", item_paths=[("result", "rows")], id_fields=["mid"])
        items = [{"mid": self.ids[1], "code": 6}, {"mid": self.ids[0], "code": 0}]
        r = p.parse_response(self.batch, _response(200, {"code": 0, "result": {"rows": items}}))
        assert r.recipients is not None
        assert [x.outcome for x in r.recipients] == [Outcome.SENT, Outcome.FAILED, Outcome.UNKNOWN]
        # the default paths are not looked at any more
        r = p.parse_response(self.batch, _response(200, {"code": 0, "data": items}))
        assert r.outcome is Outcome.SENT and r.recipients is None

    def test_non_item_data_is_ignored(self) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": [1, 2, 3]}))
        assert r.outcome is Outcome.SENT and r.recipients is None
        r = self.p.parse_response(self.batch, _response(200, {"code": 0, "data": {"messageId": "m-1"}}))
        assert r.outcome is Outcome.SENT and r.provider_id == "m-1"

    def test_success_code_with_an_error_status_is_unknown(self) -> None:
        assert self.p.parse_response(self.batch, _response(502, {"code": 0})).outcome is Outcome.UNKNOWN

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
        r = self.p.parse_response(self.batch, _response(status, body))
        assert r.outcome is outcome and r.code == f"HTTP{status}"

    @given(st.binary(max_size=200), st.sampled_from([200, 400, 429, 500]))
    def test_garbage_bytes_never_raise(self, body: bytes, status: int) -> None:
        assert isinstance(self.p.parse_response(self.batch, _response(status, body)).outcome, Outcome)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False)
            | st.text(max_size=5) | st.sampled_from(["0", "6", "13008", *IDS]),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["code", "data", "items", "list", "messageId", "sysMessageId", "message"]),
                inner,
                max_size=5,
            ),
            max_leaves=20,
        ),
        st.sampled_from([200, 400, 500]),
    )  # fmt: skip
    def test_garbage_json_never_raises(self, body: object, status: int) -> None:
        r = self.p.parse_response(self.batch, _response(status, orjson.dumps(body)))
        assert r.recipients is None or len(r.recipients) == 3


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
