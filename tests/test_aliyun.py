"""providers.aliyun at unit level: official vectors, SDK captures, codes, requests, responses."""

from __future__ import annotations

import base64
import calendar
import json
import urllib.parse
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.aliyun import (
    CODE_CLASSES,
    TEST_CREDENTIALS,
    AliyunCredentials,
    AliyunSms,
    CredentialsError,
    classify,
    percent_encode,
    rpc_signature,
    rpc_string_to_sign,
    v3_canonical_request,
    v3_signature,
    verify_v2,
    verify_v3,
)
from providers.base import Batch, Message, Outcome
from tests.conftest import SHARED

SMS_DOC = {  # A1: the SMS "HTTP protocol and signature" page
    "AccessKeyId": "testId", "Action": "SendSms", "Format": "XML", "OutId": "123",
    "PhoneNumbers": "15300000001", "RegionId": "cn-hangzhou", "SignName": "阿里云短信测试专用",
    "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0", "TemplateCode": "SMS_71390007", "TemplateParam": '{"customer":"test"}',
    "Timestamp": "2017-07-12T02:42:19Z", "Version": "2017-05-25",
}  # fmt: skip
ECS = {  # A2: the RPC signature page
    "AccessKeyId": "testid", "Action": "DescribeRegions", "Format": "XML", "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf", "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z", "Version": "2014-05-26",
}  # fmt: skip
BATCH = {  # A4/A5 (computed)
    "AccessKeyId": "testid", "Action": "SendBatchSms", "Format": "JSON", "RegionId": "cn-hangzhou",
    "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0", "Timestamp": "2024-01-01T00:00:00Z", "Version": "2017-05-25",
    "PhoneNumberJson": '["13800000001","13800000002"]', "SignNameJson": '["阿里云短信测试","阿里云短信测试"]',
    "TemplateCode": "SMS_154950909", "TemplateParamJson": '[{"code":"1234"},{"code":"5678"}]',
}  # fmt: skip


class TestVectors:
    def test_a1_official_sms_doc(self) -> None:
        assert rpc_string_to_sign("GET", SMS_DOC).startswith(
            "GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms%26Format%3DXML%26OutId%3D123"
        )
        assert rpc_signature("GET", SMS_DOC, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="

    def test_a1_trap_lowercased_secret(self) -> None:
        assert rpc_signature("GET", SMS_DOC, "testsecret") == "EpROzuoKhdewdxdmVWhll2qdKbk="

    def test_a2_a3_official_ecs(self) -> None:
        assert rpc_signature("GET", ECS, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
        old = dict(ECS)
        old["TimeStamp"] = old.pop("Timestamp")
        assert rpc_signature("GET", old, "testsecret") == "CT9X0VtwR86fNWSnsc6v8YGOjuE="

    def test_a4_a5_computed_batch(self) -> None:
        assert rpc_signature("GET", BATCH, "testsecret") == "kWdCqAjOxQ3VNSDLW3Kve4X8S9U="
        assert rpc_signature("POST", BATCH, "testsecret") == "ywShTrJGUAfUykLIWXfsIaP47iM="

    def test_b1_official_v3(self) -> None:
        headers = {
            "host": "ecs.cn-shanghai.aliyuncs.com", "x-acs-action": "RunInstances",
            "x-acs-version": "2014-05-26", "x-acs-date": "2023-10-26T10:22:32Z",
            "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
            "x-acs-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        }  # fmt: skip
        query = [
            ("ImageId", "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd"),
            ("RegionId", "cn-shanghai"),
        ]
        signed = sorted(headers)
        cr = v3_canonical_request("POST", "/", query, headers, signed, headers["x-acs-content-sha256"])
        import hashlib

        assert hashlib.sha256(cr.encode()).hexdigest() == (
            "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        )
        assert v3_signature(cr, "YourAccessKeySecret") == (
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        )

    def test_b2_computed_send_batch_sms_request(self) -> None:
        msgs = [
            Message(1, "1", "8613800000001", {"code": "1234"}, "阿里云短信测试"),
            Message(2, "2", "8613800000002", {"code": "5678"}, "阿里云短信测试"),
        ]
        p = AliyunSms(
            credentials=TEST_CREDENTIALS,
            template_code="SMS_154950909",
            clock=lambda: calendar.timegm((2024, 1, 1, 0, 0, 0)),
            nonce=lambda: "3156853299f313e23d1673dc12e1703d",
        )
        r = p.build_request(Batch(1, msgs))
        assert r.headers["x-acs-content-sha256"] == (
            "81e341631b5ff4b3daf44ae2b88e482a65166e2392d05663fe5d43df2100f94b"
        )
        assert r.headers["authorization"].endswith(
            "Signature=7501771fece9af0e86c07210bd26fa174a0ee9ac96b1fa35791b31fc85d93201"
        )
        assert str(r.url) == "https://dysmsapi.aliyuncs.com/?TemplateCode=SMS_154950909"


def _capture(path: Path) -> tuple[str, str, list[tuple[str, str]], dict[str, str], bytes]:
    req = json.loads(path.read_text())["requests"][0]
    body = base64.b64decode(req["body_b64"]) if req.get("body_b64") else b""
    headers = {k.lower(): v for k, v in req["headers"]}
    query = urllib.parse.parse_qsl(req["query_raw"], keep_blank_values=True)
    return req["method"], req["path"], query, headers, body


CAPTURES = sorted((SHARED / "captures").glob("*.json"))


class TestSdkCaptures:
    @pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
    def test_accepted_and_a_changed_byte_rejected(self, path: Path) -> None:
        method, uri, query, headers, body = _capture(path)
        secret = "testsecret"
        if "authorization" in headers:
            assert verify_v3(method, uri, query, headers, body, secret)
            if body:
                assert not verify_v3(method, uri, query, headers, body[:-1] + b"X", secret)
            changed = [(k, v + "1") if k == query[0][0] else (k, v) for k, v in query]
            assert not verify_v3(method, uri, changed, headers, body, secret)
            assert not verify_v3(
                method, uri, query, {**headers, "x-acs-date": "2020-01-01T00:00:00Z"}, body, secret
            )
        else:
            params = dict(query)
            params.update(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
            assert verify_v2(method, params, secret)
            key = "PhoneNumberJson" if "PhoneNumberJson" in params else next(iter(params))
            assert not verify_v2(method, {**params, key: params[key] + " "}, secret)


class TestPercentEncode:
    @given(st.text())
    def test_same_bytes_as_quote(self, s: str) -> None:
        assert percent_encode(s) == urllib.parse.quote(s, safe="-_.~")

    def test_examples(self) -> None:
        assert percent_encode("a b*c~") == "a%20b%2Ac~"


def _msgs(n: int, sign: str = "Acme", params: dict[str, str] | None = None) -> list[Message]:
    return [
        Message(i, str(i), f"86139{i:08d}", dict(params or {"code": "1 *~"}), sign) for i in range(1, n + 1)
    ]


class TestRequests:
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_round_trip_verifies(self, signature: str) -> None:
        p = AliyunSms(
            credentials=TEST_CREDENTIALS,
            template_code="SMS_1",
            endpoint="http://127.0.0.1:9",
            signature="v2" if signature == "v2" else "v3",
            region_id="cn-hangzhou",
        )
        batch = Batch(7, _msgs(3, sign="阿里云 测试", params={"name": "Ann & co + *~ 张三"}), out_id="r-7-1")
        r = p.build_request(batch)
        query = urllib.parse.parse_qsl(r.url.query.decode(), keep_blank_values=True)
        form = dict(urllib.parse.parse_qsl(r.content.decode(), keep_blank_values=True))
        assert orjson.loads(form["PhoneNumberJson"]) == ["13900000001", "13900000002", "13900000003"]
        assert orjson.loads(form["SignNameJson"]) == ["阿里云 测试"] * 3
        assert dict(query)["OutId"] == "r-7-1"
        assert b"+" not in r.content and "+" not in str(r.url)  # spaces are %20
        if signature == "v3":
            headers = {k.lower(): v for k, v in r.headers.items()}
            assert verify_v3("POST", "/", query, headers, r.content, "testsecret")
            assert not verify_v3("POST", "/", query, headers, r.content, "wrong")
        else:
            assert verify_v2("POST", {**dict(query), **form}, "testsecret")

    def test_international_numbers_keep_their_country_code(self) -> None:
        p = AliyunSms(credentials=TEST_CREDENTIALS, template_code="T")
        msgs = [Message(1, "1", "85212345678", {}, "A"), Message(2, "2", "8613900000001", {}, "A")]
        form = dict(urllib.parse.parse_qsl(p.build_request(Batch(1, msgs)).content.decode()))
        assert orjson.loads(form["PhoneNumberJson"]) == ["85212345678", "13900000001"]
        assert "TemplateParamJson" not in form  # no params at all

    @pytest.mark.anyio
    async def test_sent_through_an_httpx_client(self) -> None:
        got: list[bool] = []

        def handler(request: httpx.Request) -> httpx.Response:
            query = urllib.parse.parse_qsl(request.url.query.decode(), keep_blank_values=True)
            headers = {k.lower(): v for k, v in request.headers.items()}
            got.append(verify_v3("POST", "/", query, headers, request.content, "testsecret"))
            return httpx.Response(200, json={"Code": "OK", "Message": "OK", "BizId": "1^0", "RequestId": "R"})

        p = AliyunSms(credentials=TEST_CREDENTIALS, template_code="T", endpoint="http://sim.test")
        batch = Batch(1, _msgs(2), out_id="o")
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            response = await client.send(p.build_request(batch))
        outcome = p.parse_response(batch, response)
        assert got == [True]
        assert outcome.outcome is Outcome.SENT and outcome.provider_id == "1^0"


def _response(
    status: int, body: bytes | dict[str, object], headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.Response(status, content=content, headers=headers or {})


class TestResponses:
    p = AliyunSms(credentials=TEST_CREDENTIALS, template_code="T")
    batch = Batch(1, _msgs(2))

    @pytest.mark.parametrize(
        ("status", "code", "outcome"),
        [
            (200, "isv.MOBILE_NUMBER_ILLEGAL", Outcome.FAILED),
            (200, "isv.AMOUNT_NOT_ENOUGH", Outcome.FATAL),
            (200, "isv.BUSINESS_LIMIT_CONTROL", Outcome.DEFER),
            (400, "Throttling.User", Outcome.THROTTLED),
            (400, "SignatureNonceUsed", Outcome.RETRY),
            (404, "InvalidAccessKeyId.NotFound", Outcome.FATAL),
            (500, "InternalError", Outcome.UNKNOWN),
            (200, "isp.SYSTEM_ERROR", Outcome.UNKNOWN),
            (200, "isv.SOMETHING_NEW", Outcome.FATAL),
            (502, "SomethingNew", Outcome.UNKNOWN),
        ],
    )
    def test_codes(self, status: int, code: str, outcome: Outcome) -> None:
        r = self.p.parse_response(
            self.batch, _response(status, {"Code": code, "Message": "m", "RequestId": "R"})
        )
        assert r.outcome is outcome and r.code == code

    def test_retry_after_header(self) -> None:
        r = self.p.parse_response(
            self.batch, _response(400, {"Code": "Throttling.User"}, {"x-acs-retry-after": "1500"})
        )
        assert r.outcome is Outcome.THROTTLED and r.retry_after == 1.5

    @pytest.mark.parametrize(
        ("status", "body", "outcome"),
        [
            (200, b'{"Code":"O', Outcome.UNKNOWN),
            (200, b"", Outcome.UNKNOWN),
            (200, b"[1,2]", Outcome.UNKNOWN),
            (503, b"<html>busy</html>", Outcome.UNKNOWN),
            (403, b"<html>forbidden</html>", Outcome.FATAL),
            (429, b"slow down", Outcome.THROTTLED),
        ],
    )
    def test_unreadable_bodies_never_raise(self, status: int, body: bytes, outcome: Outcome) -> None:
        assert self.p.parse_response(self.batch, _response(status, body)).outcome is outcome


DOCUMENTED = {
    Outcome.SENT: ["OK"],
    Outcome.FAILED: [
        "isv.MOBILE_NUMBER_ILLEGAL", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED", "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.SMS_CONTENT_ILLEGAL", "isv.TEMPLATE_PARAMS_ILLEGAL", "isv.PARAM_NOT_SUPPORT_URL",
        "isv.PARAM_LENGTH_LIMIT",
    ],
    Outcome.FATAL: [
        "SignatureDoesNotMatch", "IncompleteSignature", "InvalidAccessKeyId.NotFound", "Forbidden.RAM",
        "isp.RAM_PERMISSION_DENY", "isv.DENY_IP_RANGE", "isv.AMOUNT_NOT_ENOUGH", "isv.OUT_OF_SERVICE",
        "isv.PRODUCT_UN_SUBSCRIPT", "isv.PRODUCT_UNSUBSCRIBE", "isv.ACCOUNT_NOT_EXISTS",
        "isv.ACCOUNT_ABNORMAL",
        "isv.DAY_LIMIT_CONTROL", "isv.MONTH_LIMIT_CONTROL", "isv.SMS_TEMPLATE_ILLEGAL",
        "isv.SMS_SIGNATURE_ILLEGAL", "isv.SMS_SIGN_ILLEGAL", "isv.SIGN_STATE_ILLEGAL",
        "isv.SMS_SIGNATURE_SCENE_ILLEGAL", "isv.TEMPLATE_MISSING_PARAMETERS", "isv.INVALID_PARAMETERS",
        "isv.INVALID_JSON_PARAM", "isv.MOBILE_COUNT_OVER_LIMIT", "isv.EXTEND_CODE_ERROR", "MissingParameter",
        "InvalidParameter",
    ],
    Outcome.RETRY: ["InvalidTimeStamp.Expired", "SignatureNonceUsed"],
    Outcome.THROTTLED: ["Throttling.User", "Throttling.Api", "Throttling"],
    Outcome.DEFER: ["isv.BUSINESS_LIMIT_CONTROL"],
    Outcome.UNKNOWN: ["isp.SYSTEM_ERROR", "isp.UNKNOWN_ERROR", "InternalError", "ServiceUnavailable"],
}  # fmt: skip


class TestCodeClasses:
    @pytest.mark.parametrize("outcome", list(DOCUMENTED), ids=lambda o: o.value)
    def test_every_documented_code_is_classified(self, outcome: Outcome) -> None:
        for code in DOCUMENTED[outcome]:
            assert CODE_CLASSES[code] is outcome, code
            assert classify(code, 200) is outcome

    def test_no_code_left_out(self) -> None:
        assert set(CODE_CLASSES) == {c for codes in DOCUMENTED.values() for c in codes}


class TestCredentials:
    def test_repr_hides_the_secret(self) -> None:
        c = AliyunCredentials("id-1", "s3cr3t-value")
        assert "s3cr3t-value" not in repr(c) and "s3cr3t-value" not in str(c)

    def test_from_env_names_the_missing_variable(self) -> None:
        with pytest.raises(CredentialsError, match="ALIYUN_ACCESS_KEY_SECRET") as info:
            AliyunCredentials.from_env({"ALIYUN_ACCESS_KEY_ID": "visible-id"})
        assert "visible-id" not in str(info.value)
        c = AliyunCredentials.from_env({"ALIYUN_ACCESS_KEY_ID": "a", "ALIYUN_ACCESS_KEY_SECRET": "b"})
        assert c == AliyunCredentials("a", "b")
