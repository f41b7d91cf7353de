"""providers.aliyun_card: SendBatchCardSms requests and outcomes, GetCardSmsDetails."""

from __future__ import annotations

import calendar
import json
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import pytest

from providers.aliyun import CODE_CLASSES, TEST_CREDENTIALS
from providers.aliyun_card import AliyunCardSms, CardSendRecord, parse_card_details
from providers.base import Batch, BatchOutcome, Message, Outcome, RecipientOutcome
from providers.simulator import SimulatorConfig, serve
from providers.simulator.aliyun_verify import verify_v2, verify_v3
from tests.conftest import SHARED

CAPTURES = SHARED / "captures"
SECRET = "testsecret"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
NEW_YEAR_2024 = calendar.timegm((2024, 1, 1, 0, 0, 0))
NONCE = "3156853299f313e23d1673dc12e1703d"
BUSINESS = (
    "CardTemplateCode", "CardTemplateParamJson", "FallbackType", "PhoneNumberJson", "SignNameJson",
    "SmsTemplateCode", "SmsTemplateParamJson", "TemplateCode", "TemplateParamJson",
)  # fmt: skip
URL = "http://example.invalid/x?a=1&b=2"
CAPTURE_TEXT_PARAMS = [
    {"code": "1234", "name": "张三"},
    {"code": "5678", "name": "Ann O'Neil & co + *~"},
    {"code": "9012", "name": "a=b/c?d#e%f"},
]


def card(signature: str = "v3", **kw: Any) -> AliyunCardSms:
    kw.setdefault("fallback_type", "SMS")
    if kw["fallback_type"] == "SMS":
        kw.setdefault("sms_template_code", "SMS_154950909")
    if kw["fallback_type"] == "DIGITALSMS":
        kw.setdefault("digital_template_code", "DIGITAL_1")
    return AliyunCardSms(
        credentials=TEST_CREDENTIALS,
        card_template_code=kw.pop("card_template_code", "CARD_SMS_6277"),
        signature="v2" if signature == "v2" else "v3",
        clock=kw.pop("clock", lambda: NEW_YEAR_2024),
        nonce=kw.pop("nonce", lambda: NONCE),
        **kw,
    )


def messages(n: int, params: dict[str, str] | None = None, sign: str = "阿里云短信测试") -> list[Message]:
    return [Message(i, f"k{i}", f"86139{i:08d}", dict(params or {}), sign) for i in range(1, n + 1)]


def received(request: httpx.Request) -> tuple[list[tuple[str, str]], dict[str, str], bytes]:
    """(decoded query, lower-case headers, body) as a server sees them."""
    query = urllib.parse.parse_qsl(request.url.query.decode(), keep_blank_values=True, strict_parsing=True)
    return query, {k.lower(): v for k, v in request.headers.items()}, request.read()


def verified(request: httpx.Request) -> bool:
    query, headers, body = received(request)
    if "authorization" in headers:
        return verify_v3(request.method, request.url.path, query, headers, body, SECRET)
    return verify_v2(request.method, dict(query), SECRET)


def response(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.Response(status, content=content, headers=headers)


def ok(**data: Any) -> httpx.Response:
    base = {"BizCardId": "C^0", "BizSmsId": "S^0", "BizDigitalId": "D^0", "CardTmpState": 1,
            "MediaMobiles": "", "NotMediaMobiles": ""}  # fmt: skip
    return response(200, {"Code": "OK", "Success": True, "RequestId": "R", "Data": {**base, **data}})


# -- the official SDK's requests ------------------------------------------------------------------
class TestCaptures:
    @staticmethod
    def load(name: str) -> tuple[str, list[tuple[str, str]], dict[str, str], bytes]:
        data = json.loads((CAPTURES / f"{name}.json").read_text(encoding="utf-8"))
        (req,) = data["requests"]
        query = urllib.parse.parse_qsl(req["query_raw"], keep_blank_values=True, strict_parsing=True)
        headers = {k.lower(): v for k, v in req["headers"]}
        return req["method"], query, headers, req["body_text"].encode()

    def test_tea_v3_verifies(self) -> None:
        method, query, headers, body = self.load("tea_v3_SendBatchCardSms")
        assert verify_v3(method, "/", query, headers, body, SECRET)
        assert not verify_v3(method, "/", [*query[:-1], (query[-1][0], "[]")], headers, body, SECRET)

    @pytest.mark.parametrize("name", ["tea_v2_SendBatchCardSms", "classic_SendBatchCardSms_CommonRequest"])
    def test_v2_verifies(self, name: str) -> None:
        method, query, _, body = self.load(name)
        params = dict(query)
        assert not body and verify_v2(method, params, SECRET)
        assert not verify_v2(method, {**params, "FallbackType": "NONE"}, SECRET)

    @pytest.mark.parametrize("name", ["tea_v3_SendBatchCardSms", "tea_v2_SendBatchCardSms"])
    def test_tea_sends_every_business_parameter_in_the_query(self, name: str) -> None:
        _, query, headers, body = self.load(name)
        assert body == b"" and "content-type" not in headers
        assert set(BUSINESS) <= dict(query).keys()

    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_ours_matches_the_capture_shape(self, signature: str) -> None:
        _, captured, _, _ = self.load(f"tea_{signature}_SendBatchCardSms")
        msgs = [
            Message(i, f"k{i}", f"861380000000{i}", {"card.customUrl": URL, **p}, sign)
            for i, (p, sign) in enumerate(
                zip(CAPTURE_TEXT_PARAMS, ["阿里云短信测试", "Peer Test", "阿里云短信测试"], strict=True), 1
            )
        ]
        request = card(signature, template_code="SMS_154950909").build_request(Batch(1, msgs))
        query, headers, body = received(request)
        assert body == b"" and "content-type" not in headers and verified(request)
        ours, theirs = dict(query), dict(captured)
        assert {k: ours[k] for k in BUSINESS} == {
            **{k: theirs[k] for k in BUSINESS},
            # the SDK was given "+8613800000003"; we send mainland numbers bare
            "PhoneNumberJson": '["13800000001","13800000002","13800000003"]',
        }
        assert ours.keys() - set(BUSINESS) == theirs.keys() - set(BUSINESS) - {"SignatureType"}


# -- construction ---------------------------------------------------------------------------------
class TestConstructor:
    def test_protocol_facts(self) -> None:
        p = card()
        assert (p.name, p.max_batch_size, p.recommended_timeout) == ("aliyun-card", 100, 3.0)
        a, b = messages(2)
        b.sign_name, b.phone = "Other", "85212345678"
        assert p.batch_key(a) == p.batch_key(b)

    @pytest.mark.parametrize(
        ("kw", "named"),
        [
            ({"card_template_code": ""}, "card_template_code"),
            ({"fallback_type": "MMS"}, "fallback_type"),
            ({"fallback_type": "SMS", "sms_template_code": None}, "sms_template_code"),
            ({"fallback_type": "DIGITALSMS", "digital_template_code": ""}, "digital_template_code"),
            ({"fallback_type": "NONE", "sms_template_code": "SMS_1"}, "sms_template_code"),
            ({"fallback_type": "SMS", "digital_template_code": "D_1"}, "digital_template_code"),
            ({"fallback_type": "NONE", "digital_template_code": "D_1"}, "digital_template_code"),
            ({"signature": "v4"}, "signature"),
            ({"endpoint": "ftp://x"}, "endpoint"),
        ],
    )
    def test_invalid(self, kw: dict[str, Any], named: str) -> None:
        signature = kw.pop("signature", "v3")
        with pytest.raises(ValueError, match=named):
            if signature != "v3":
                AliyunCardSms(
                    credentials=TEST_CREDENTIALS,
                    card_template_code="C",
                    fallback_type="NONE",
                    signature=signature,
                )
            else:
                card(**kw)

    @pytest.mark.parametrize("fallback", ["SMS", "DIGITALSMS", "NONE"])
    def test_valid_fallbacks(self, fallback: str) -> None:
        assert card(fallback_type=fallback).fallback_type == fallback

    def test_check_params(self) -> None:
        card(template_code="T").check_params(["card.customUrl", "sms.code", "text.name", "name"])
        card(fallback_type="DIGITALSMS").check_params(["digital.code", "code", "card.dyncParams"])
        card(fallback_type="NONE").check_params(["card.customUrl"])
        with pytest.raises(ValueError, match=r"params 'text.name', 'digital.x' reach no template"):
            card().check_params(["card.x", "sms.y", "code", "text.name", "digital.x"])
        with pytest.raises(ValueError, match=r"'code'"):
            card(fallback_type="NONE").check_params(["card.customUrl", "code"])


# -- requests -------------------------------------------------------------------------------------
class TestBuildRequest:
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_round_trip_verifies(self, signature: str) -> None:
        p = card(signature, template_code="TEXT_1", region_id="cn-hangzhou")
        msgs = messages(3, {"card.customUrl": URL, "name": "Ann & co*~", "text.link": "a b"}, "阿里 云")
        msgs[1].phone = "85212345678"
        request = p.build_request(Batch(7, msgs, out_id="run 7/b*~"))
        assert verified(request)
        query, headers, body = received(request)
        q = dict(query)
        assert body == b"" and request.method == "POST" and request.url.path == "/"
        assert orjson.loads(q["PhoneNumberJson"]) == ["13900000001", "85212345678", "13900000003"]
        assert orjson.loads(q["SignNameJson"]) == ["阿里 云"] * 3
        assert orjson.loads(q["CardTemplateParamJson"]) == [{"customUrl": URL}] * 3
        assert orjson.loads(q["SmsTemplateParamJson"]) == [{"name": "Ann & co*~"}] * 3
        assert orjson.loads(q["TemplateParamJson"]) == [{"name": "Ann & co*~", "link": "a b"}] * 3
        assert (q["CardTemplateCode"], q["FallbackType"], q["SmsTemplateCode"], q["TemplateCode"]) == (
            "CARD_SMS_6277",
            "SMS",
            "SMS_154950909",
            "TEXT_1",
        )
        assert q["OutId"] == "run 7/b*~" and "DigitalTemplateCode" not in q
        assert headers["accept"] == "application/json"
        raw = request.url.raw_path
        assert b"+" not in raw.replace(b"%2B", b"") and b"*" not in raw and b"%20" in raw
        # one changed byte in the query breaks it
        url = httpx.URL(str(request.url).replace("run%207", "run%208"))
        assert not verified(httpx.Request("POST", url, headers=request.headers))

    def test_v3_headers(self) -> None:
        request = card(endpoint="http://127.0.0.1:8080").build_request(Batch(1, messages(1)))
        _, headers, _ = received(request)
        assert headers["host"] == "127.0.0.1:8080"
        assert headers["x-acs-action"] == "SendBatchCardSms" and headers["x-acs-version"] == "2017-05-25"
        assert (headers["x-acs-date"], headers["x-acs-signature-nonce"]) == ("2024-01-01T00:00:00Z", NONCE)
        assert headers["x-acs-content-sha256"] == EMPTY_SHA256
        assert "content-type" not in headers
        assert headers["content-length"] == "0"
        assert headers["authorization"].startswith(
            "ACS3-HMAC-SHA256 Credential=testid,SignedHeaders="
            "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature="
        )

    def test_v2_common_parameters(self) -> None:
        request = card("v2", region_id="cn-hangzhou").build_request(Batch(1, messages(1), out_id="o"))
        query, headers, _ = received(request)
        q = dict(query)
        assert "authorization" not in headers and not any(h.startswith("x-acs-") for h in headers)
        expected = {
            "Action": "SendBatchCardSms", "Version": "2017-05-25", "Format": "JSON", "AccessKeyId": "testid",
            "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "SignatureNonce": NONCE,
            "Timestamp": "2024-01-01T00:00:00Z", "RegionId": "cn-hangzhou", "OutId": "o",
        }  # fmt: skip
        assert {k: q[k] for k in expected} == expected
        assert query[-1][0] == "Signature" and verified(request)

    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_no_out_id_no_region_no_params(self, signature: str) -> None:
        request = card(signature).build_request(Batch(1, messages(2)))
        names = {k for k, _ in received(request)[0]}
        assert not names & {
            "OutId",
            "RegionId",
            "CardTemplateParamJson",
            "SmsTemplateParamJson",
            "TemplateParamJson",
            "TemplateCode",
        }
        assert verified(request)

    def test_digital_fallback_routes_shared_and_digital_keys(self) -> None:
        msgs = messages(2, {"code": "1", "digital.code": "2", "sms.x": "dropped", "text.y": "dropped"})
        msgs[1].params = {}
        request = card(fallback_type="DIGITALSMS").build_request(Batch(1, msgs))
        q = dict(received(request)[0])
        assert (q["FallbackType"], q["DigitalTemplateCode"]) == ("DIGITALSMS", "DIGITAL_1")
        assert orjson.loads(q["DigitalTemplateParamJson"]) == [{"code": "2"}, {}]  # aligned by index
        assert not q.keys() & {
            "SmsTemplateCode",
            "SmsTemplateParamJson",
            "TemplateParamJson",
            "CardTemplateParamJson",
        }

    def test_none_fallback_sends_only_card_params(self) -> None:
        msgs = messages(2, {"card.dyncParams": '{"k":"v"}', "name": "dropped"})
        q = dict(received(card(fallback_type="NONE").build_request(Batch(1, msgs)))[0])
        assert q["FallbackType"] == "NONE" and "SmsTemplateCode" not in q
        assert orjson.loads(q["CardTemplateParamJson"]) == [{"dyncParams": '{"k":"v"}'}] * 2
        assert "SmsTemplateParamJson" not in q and "TemplateParamJson" not in q

    def test_unknown_prefix_is_a_shared_name(self) -> None:
        msgs = messages(1, {"foo.bar": "1", "card.": "2"})
        q = dict(received(card().build_request(Batch(1, msgs)))[0])
        assert orjson.loads(q["SmsTemplateParamJson"]) == [{"foo.bar": "1", "card.": "2"}]

    def test_clock_and_nonce_per_request(self) -> None:
        now, nonces = [float(NEW_YEAR_2024)], iter(["n1", "n2"])
        p = card(clock=lambda: now[0], nonce=lambda: next(nonces))
        first = p.build_request(Batch(1, messages(1)))
        now[0] += 61.9
        second = p.build_request(Batch(1, messages(1)))
        assert (first.headers["x-acs-signature-nonce"], second.headers["x-acs-signature-nonce"]) == (
            "n1",
            "n2",
        )
        assert second.headers["x-acs-date"] == "2024-01-01T00:01:01Z"

    def test_a_full_batch_fits_the_simulator_head_limit(self) -> None:
        params = {
            "card.customUrl": "https://example.com/promo?id=123456&ref=sms",
            "name": "张三丰",
            "code": "123456",
        }
        request = card(template_code="T").build_request(Batch(1, messages(100, params), out_id="r-1-1"))
        assert 30_000 < len(request.url.raw_path) < 64 * 1024


# -- responses ------------------------------------------------------------------------------------
SENT = Outcome.SENT


class TestParseResponse:
    batch = Batch(1, messages(3))

    def parse(self, r: httpx.Response, provider: AliyunCardSms | None = None) -> BatchOutcome:
        return (provider or card()).parse_response(self.batch, r)

    def test_all_card(self) -> None:
        out = self.parse(ok(MediaMobiles="13900000001,13900000002,13900000003"))
        assert out.outcome is SENT and out.provider_id == "C^0"
        assert out.recipients == [RecipientOutcome(SENT, provider_id="card:C^0")] * 3
        assert out.extra == {"request_id": "R", "card_tmp_state": 1}

    @pytest.mark.parametrize(
        ("fallback", "expected"),
        [
            ("SMS", RecipientOutcome(SENT, provider_id="sms:S^0")),
            ("DIGITALSMS", RecipientOutcome(SENT, provider_id="digital:D^0")),
            ("NONE", RecipientOutcome(Outcome.FAILED, code="CardNotSupported")),
        ],
    )
    def test_card_and_fallback(self, fallback: str, expected: RecipientOutcome) -> None:
        out = self.parse(
            ok(MediaMobiles="13900000002", NotMediaMobiles="13900000001,13900000003"),
            card(fallback_type=fallback),
        )
        assert out.outcome is SENT
        assert out.recipients == [expected, RecipientOutcome(SENT, provider_id="card:C^0"), expected]

    def test_all_fell_back_without_fallback_fails(self) -> None:
        out = self.parse(
            ok(NotMediaMobiles=["13900000001", "13900000002", "13900000003"]), card(fallback_type="NONE")
        )
        assert out.outcome is Outcome.FAILED and out.code == "CardNotSupported"
        assert out.recipients == [RecipientOutcome(Outcome.FAILED, code="CardNotSupported")] * 3

    @pytest.mark.parametrize(
        "media",
        [
            "13900000001,13900000002,13900000003",
            " 13900000001 , 8613900000002,+8613900000003 ",
            ["13900000001", "+8613900000002", "008613900000003"],
            [13900000001, 8613900000002, 13900000003],
            '["13900000001","13900000002","13900000003"]',
        ],
    )
    def test_list_and_string_forms(self, media: object) -> None:
        out = self.parse(ok(MediaMobiles=media))
        assert out.recipients == [RecipientOutcome(SENT, provider_id="card:C^0")] * 3

    def test_international_numbers_match(self) -> None:
        b = Batch(1, [Message(1, "k", "85212345678", {}, "S"), Message(2, "k2", "12025550100", {}, "S")])
        out = card().parse_response(b, ok(MediaMobiles="+85212345678", NotMediaMobiles=["0012025550100"]))
        assert out.recipients == [
            RecipientOutcome(SENT, provider_id="card:C^0"),
            RecipientOutcome(SENT, provider_id="sms:S^0"),
        ]

    def test_missing_numbers_are_unknown(self) -> None:
        out = self.parse(ok(MediaMobiles="13900000001", NotMediaMobiles="13800000000"))
        unknown = RecipientOutcome(Outcome.UNKNOWN, code="NotListed")
        assert out.outcome is SENT
        assert out.recipients == [RecipientOutcome(SENT, provider_id="card:C^0"), unknown, unknown]

    @pytest.mark.parametrize("empty", ["", [], None, 7, {"a": 1}])
    def test_no_numbers_listed(self, empty: object) -> None:
        out = self.parse(ok(MediaMobiles=empty, NotMediaMobiles=empty))
        assert out.outcome is Outcome.UNKNOWN
        assert out.recipients == [RecipientOutcome(Outcome.UNKNOWN, code="NotListed")] * 3

    def test_empty_ids_keep_the_channel(self) -> None:
        out = self.parse(
            ok(
                MediaMobiles="13900000001",
                NotMediaMobiles="13900000002,13900000003",
                BizCardId="",
                BizSmsId=None,
            )
        )
        assert out.provider_id is None
        assert [r.provider_id for r in out.recipients or []] == ["card:", "sms:", "sms:"]

    @pytest.mark.parametrize(
        ("state", "code"), [(0, "CardTemplateUnderReview"), ("2", "CardTemplateRejected")]
    )
    def test_template_not_approved_and_nothing_sent(self, state: object, code: str) -> None:
        out = self.parse(ok(CardTmpState=state))
        assert (out.outcome, out.code, out.recipients) == (Outcome.FATAL, code, None)
        assert "CARD_SMS_6277" in (out.message or "") and "nothing was sent" in (out.message or "")

    def test_rejected_template_with_no_fallback(self) -> None:
        out = self.parse(
            ok(CardTmpState=2, NotMediaMobiles="13900000001,13900000002"), card(fallback_type="NONE")
        )
        assert (out.outcome, out.code) == (Outcome.FATAL, "CardTemplateRejected")

    def test_rejected_template_but_the_fallback_sent(self) -> None:
        out = self.parse(ok(CardTmpState=2, NotMediaMobiles="13900000001,13900000002,13900000003"))
        assert out.outcome is SENT and out.extra["card_tmp_state"] == 2
        assert out.recipients == [RecipientOutcome(SENT, provider_id="sms:S^0")] * 3

    def test_capture_answer(self) -> None:
        """What the capture peer answered: OK, a rejected template, nothing listed."""
        data = json.loads((CAPTURES / "tea_v3_SendBatchCardSms.json").read_text())["sdk_response"]
        out = self.parse(response(200, data))
        assert (out.outcome, out.code) == (Outcome.FATAL, "CardTemplateRejected")

    def test_simulator_answer(self) -> None:
        data = {"Code": "OK", "Success": True, "RequestId": "R",
                "Data": {"BizCardId": "9^0", "BizSmsId": "", "BizDigitalId": "",
                         "MediaMobiles": "13900000001,13900000002,13900000003", "NotMediaMobiles": "",
                         "CardTmpState": 1}}  # fmt: skip
        out = self.parse(response(200, data))
        assert out.outcome is SENT and out.recipients == [RecipientOutcome(SENT, provider_id="card:9^0")] * 3

    @pytest.mark.parametrize(
        ("status", "code", "outcome"),
        [
            (200, "isv.MOBILE_NUMBER_ILLEGAL", Outcome.SPLIT),  # 3 numbers: split (test_split.py)
            (200, "isv.AMOUNT_NOT_ENOUGH", Outcome.FATAL),
            (200, "isv.SMS_TEMPLATE_ILLEGAL", Outcome.FATAL),
            (400, "SignatureDoesNotMatch", Outcome.FATAL),
            (400, "InvalidTimeStamp.Expired", Outcome.RETRY),
            (400, "Throttling.User", Outcome.THROTTLED),
            (200, "isv.BUSINESS_LIMIT_CONTROL", Outcome.SPLIT),
            (200, "isp.SYSTEM_ERROR", Outcome.UNKNOWN),
            (500, "InternalError", Outcome.UNKNOWN),
            (200, "isv.SOMETHING_NEW", Outcome.FATAL),
            (502, "SomethingNew", Outcome.UNKNOWN),
        ],
    )
    def test_codes(self, status: int, code: str, outcome: Outcome) -> None:
        out = self.parse(response(status, {"Code": code, "Message": "why", "RequestId": "R"}))
        extra = {"request_id": "R"} | ({"alone": CODE_CLASSES[code]} if outcome is Outcome.SPLIT else {})
        assert (out.outcome, out.code, out.message, out.extra) == (outcome, code, "why", extra)
        assert out.recipients is None

    def test_throttle_retry_after(self) -> None:
        r = response(400, {"Code": "Throttling.User", "Message": "m"}, {"x-acs-retry-after": "1500"})
        assert self.parse(r).retry_after == 1.5

    def test_error_code_with_a_template_state(self) -> None:
        body = {"Code": "isv.SMS_TEMPLATE_ILLEGAL", "Message": "bad", "Data": {"CardTmpState": 0}}
        out = self.parse(response(200, body))
        assert (out.outcome, out.code) == (Outcome.FATAL, "CardTemplateUnderReview")
        assert "isv.SMS_TEMPLATE_ILLEGAL: bad" in (out.message or "")
        # a code that may mean "accepted" stays ambiguous whatever the template state
        body = {"Code": "isp.SYSTEM_ERROR", "Data": {"CardTmpState": 2}}
        assert self.parse(response(200, body)).outcome is Outcome.UNKNOWN

    @pytest.mark.parametrize(
        ("status", "body", "outcome", "code"),
        [
            (200, b"not json", Outcome.UNKNOWN, "HTTP200"),
            (200, [1, 2], Outcome.UNKNOWN, "HTTP200"),
            (403, b"", Outcome.FATAL, "HTTP403"),
            (429, b"", Outcome.THROTTLED, "HTTP429"),
            (502, b"<html>", Outcome.UNKNOWN, "HTTP502"),
            (500, {"Code": "OK", "Data": {}}, Outcome.UNKNOWN, "HTTP500"),
            (200, {"Code": "OK", "Success": False, "Data": {"MediaMobiles": "13900000001"}},
             Outcome.UNKNOWN, "SuccessFalse"),
            (200, {"Code": "OK", "Success": True}, Outcome.UNKNOWN, "NoData"),
            (200, {"Code": "OK", "Data": "x"}, Outcome.UNKNOWN, "NoData"),
        ],
    )  # fmt: skip
    def test_malformed(self, status: int, body: object, outcome: Outcome, code: str) -> None:
        out = self.parse(response(status, body))
        assert (out.outcome, out.code, out.recipients) == (outcome, code, None)


# -- GetCardSmsDetails ------------------------------------------------------------------------------
class TestCardDetails:
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_request(self, signature: str) -> None:
        request = card(signature).card_details_request(
            "8613900000001", "20240101", biz_card_id="C^0", biz_digit_id="D^0", page=2, page_size=10
        )
        assert verified(request)
        query, headers, body = received(request)
        q = dict(query)
        assert body == b""
        assert {k: q[k] for k in ("PhoneNumber", "SendDate", "PageSize", "CurrentPage", "BizCardId",
                                  "BizDigitId")} == {
            "PhoneNumber": "13900000001", "SendDate": "20240101", "PageSize": "10", "CurrentPage": "2",
            "BizCardId": "C^0", "BizDigitId": "D^0",
        }  # fmt: skip
        assert "BizSmsId" not in q and "BizDigitalId" not in q
        action = headers.get("x-acs-action") or q["Action"]
        assert action == "GetCardSmsDetails"

    @pytest.mark.parametrize(
        ("kw", "named"),
        [({"send_date": "2024-01-01"}, "send_date"), ({"page": 0}, "page"), ({"page_size": 51}, "page_size")],
    )
    def test_invalid(self, kw: dict[str, Any], named: str) -> None:
        args: dict[str, Any] = {"phone": "8613900000001", "send_date": "20240101", **kw}
        with pytest.raises(ValueError, match=named):
            card().card_details_request(**args)

    def test_parse(self) -> None:
        body = {
            "Code": "OK", "RequestId": "R",
            "CardSendDetailDTO": {"TotalCount": 7, "PageSize": 2, "CurrentPage": 1, "Records": [
                {"OutId": "run-1-1", "SendStatus": 3, "ErrCode": "DELIVERED", "RenderStatus": 1},
                {"OutId": "run-2-1", "SendStatus": "4", "ErrCode": "ADDR_FAIL"},
                {"SendStatus": None},
                "junk",
            ]},
        }  # fmt: skip
        code, total, records = parse_card_details(response(200, body))
        assert (code, total) == ("OK", 7)
        assert records == [
            CardSendRecord("run-1-1", 3, "DELIVERED"),
            CardSendRecord("run-2-1", 4, "ADDR_FAIL"),
            CardSendRecord("", 0, ""),
        ]

    def test_parse_wrapped_records_and_errors(self) -> None:
        body = {"Code": "OK", "CardSendDetailDTO": {"Records": {"Record": [{"OutId": "o", "SendStatus": 2}]}}}
        assert parse_card_details(response(200, body)) == ("OK", 1, [CardSendRecord("o", 2, "")])
        assert parse_card_details(response(200, {"Code": "isv.X"})) == ("isv.X", 0, [])
        assert parse_card_details(response(502, b"<html>")) == ("HTTP502", 0, [])


# -- against a server ----------------------------------------------------------------------------------
class TestExchange:
    def test_mock_gateway(self) -> None:
        """A gateway that checks the signature and answers with a card and an SMS fallback."""

        def gateway(request: httpx.Request) -> httpx.Response:
            if not verified(request):
                return response(400, {"Code": "SignatureDoesNotMatch"})
            phones = orjson.loads(dict(received(request)[0])["PhoneNumberJson"])
            return ok(MediaMobiles=",".join(phones[:1]), NotMediaMobiles=phones[1:])

        p = card()
        batch = Batch(1, messages(3), out_id="o-1")
        with httpx.Client(transport=httpx.MockTransport(gateway)) as client:
            out = p.parse_response(batch, client.send(p.build_request(batch)))
        assert [r.provider_id for r in out.recipients or []] == ["card:C^0", "sms:S^0", "sms:S^0"]

    @pytest.mark.anyio
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_simulator_accepts_it(self, tmp_path: Path, signature: Literal["v3", "v2"]) -> None:
        config = SimulatorConfig(credentials=(TEST_CREDENTIALS,), receipts=tmp_path / "receipts.jsonl")
        async with serve(config) as sim, httpx.AsyncClient(timeout=10) as client:
            p = AliyunCardSms(
                credentials=TEST_CREDENTIALS,
                card_template_code="CARD_1",
                fallback_type="SMS",
                sms_template_code="SMS_1",
                endpoint=sim.base_url,
                signature=signature,
            )
            batch = Batch(1, messages(3, {"card.customUrl": URL, "code": "1"}), out_id="o-1")
            out = p.parse_response(batch, await client.send(p.build_request(batch)))
        assert out.outcome is SENT and out.provider_id
        assert out.recipients == [RecipientOutcome(SENT, provider_id=f"card:{out.provider_id}")] * 3
        lines = [orjson.loads(x) for x in (tmp_path / "receipts.jsonl").read_bytes().splitlines()]
        assert [(x["phone"], x["out_id"], x["template"]) for x in lines] == [
            (f"139{i:08d}", "o-1", "CARD_1") for i in (1, 2, 3)
        ]
