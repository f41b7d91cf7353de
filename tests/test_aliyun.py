"""providers.aliyun: published vectors, official-SDK captures, requests, verification, outcomes."""

from __future__ import annotations

import base64
import calendar
import dataclasses
import hashlib
import json
import string
import urllib.parse
from pathlib import Path
from typing import Any

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
    aliyun_phone,
    classify,
    percent_encode,
    rpc_signature,
    rpc_string_to_sign,
    v3_canonical_request,
    v3_sign_headers,
    v3_signature,
)
from providers.base import Batch, BatchOutcome, Message, Outcome
from providers.simulator.aliyun_verify import parse_v3_authorization, verify_v2, verify_v3

CAPTURE_DIR = Path(__file__).parents[2] / "shared" / "captures"
SECRET = "testsecret"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
NEW_YEAR_2024 = calendar.timegm((2024, 1, 1, 0, 0, 0))


def quote(s: str) -> str:
    """The reference encoding (PROTOCOLS.md §1.3 step 2)."""
    return urllib.parse.quote(s, safe="-_.~")


def flip(s: str) -> str:
    """``s`` with its last character changed."""
    return s[:-1] + ("0" if s[-1] != "0" else "1")


def flip_byte(b: bytes, at: int = -1) -> bytes:
    i = at % len(b)
    return b[:i] + (b"0" if b[i : i + 1] != b"0" else b"1") + b[i + 1 :]


def form_params(body: bytes) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))


# -- published and computed vectors (PROTOCOLS.md §1.5) -------------------------------------------
A1_PARAMS = {
    "AccessKeyId": "testId", "Action": "SendSms", "Format": "XML", "OutId": "123",
    "PhoneNumbers": "15300000001", "RegionId": "cn-hangzhou", "SignName": "阿里云短信测试专用",
    "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0", "TemplateCode": "SMS_71390007", "TemplateParam": '{"customer":"test"}',
    "Timestamp": "2017-07-12T02:42:19Z", "Version": "2017-05-25",
}  # fmt: skip
A1_STRING_TO_SIGN = (
    "GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms%26Format%3DXML%26OutId%3D123"
    "%26PhoneNumbers%3D15300000001%26RegionId%3Dcn-hangzhou%26SignName%3D%25E9%2598%25BF"
    "%25E9%2587%258C%25E4%25BA%2591%25E7%259F%25AD%25E4%25BF%25A1%25E6%25B5%258B%25E8%25AF"
    "%2595%25E4%25B8%2593%25E7%2594%25A8%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D"
    "45e25e9b-0a6f-4070-8c85-2956eda1b466%26SignatureVersion%3D1.0%26TemplateCode%3D"
    "SMS_71390007%26TemplateParam%3D%257B%2522customer%2522%253A%2522test%2522%257D"
    "%26Timestamp%3D2017-07-12T02%253A42%253A19Z%26Version%3D2017-05-25"
)
A2_PARAMS = {
    "AccessKeyId": "testid", "Action": "DescribeRegions", "Format": "XML", "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf", "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z", "Version": "2014-05-26",
}  # fmt: skip
A4_PARAMS = {
    "AccessKeyId": "testid", "Action": "SendBatchSms", "Format": "JSON", "RegionId": "cn-hangzhou",
    "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0", "Timestamp": "2024-01-01T00:00:00Z", "Version": "2017-05-25",
    "PhoneNumberJson": '["13800000001","13800000002"]', "SignNameJson": '["阿里云短信测试","阿里云短信测试"]',
    "TemplateCode": "SMS_154950909", "TemplateParamJson": '[{"code":"1234"},{"code":"5678"}]',
}  # fmt: skip
B1_QUERY = [("ImageId", "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd"), ("RegionId", "cn-shanghai")]
B1_HEADERS = {
    "host": "ecs.cn-shanghai.aliyuncs.com", "x-acs-action": "RunInstances", "x-acs-version": "2014-05-26",
    "x-acs-date": "2023-10-26T10:22:32Z", "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
}  # fmt: skip
B2_BODY = (
    b"PhoneNumberJson=%5B%2213800000001%22%2C%2213800000002%22%5D&SignNameJson=%5B%22%E9%98%BF%E9%87%8C"
    b"%E4%BA%91%E7%9F%AD%E4%BF%A1%E6%B5%8B%E8%AF%95%22%2C%22%E9%98%BF%E9%87%8C%E4%BA%91%E7%9F%AD%E4%BF%A1"
    b"%E6%B5%8B%E8%AF%95%22%5D&TemplateParamJson=%5B%7B%22code%22%3A%221234%22%7D%2C%7B%22code%22%3A"
    b"%225678%22%7D%5D"
)
B2_SIGNATURE = "7501771fece9af0e86c07210bd26fa174a0ee9ac96b1fa35791b31fc85d93201"
SIGNED_BY_US = (
    "content-type;host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version"
)


def vector_messages() -> list[Message]:
    """The two recipients of A4/A5/B2, as the engine hands them over (E.164 digits)."""
    return [
        Message(1, "k1", "8613800000001", {"code": "1234"}, "阿里云短信测试"),
        Message(2, "k2", "8613800000002", {"code": "5678"}, "阿里云短信测试"),
    ]


class TestVectors:
    def test_a1_official_string_to_sign_and_signature(self) -> None:
        assert rpc_string_to_sign("GET", A1_PARAMS) == A1_STRING_TO_SIGN
        assert rpc_signature("GET", A1_PARAMS, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        assert percent_encode("zJDF+Lrzhj/ThnlvIToysFRq6t4=") == "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D"

    def test_a1_prime_the_secret_is_case_sensitive(self) -> None:
        assert rpc_signature("GET", A1_PARAMS, "testsecret") == "EpROzuoKhdewdxdmVWhll2qdKbk="

    def test_a2_official_rpc_doc(self) -> None:
        assert rpc_signature("GET", A2_PARAMS, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="

    def test_a3_old_ecs_doc_timestamp_spelling(self) -> None:
        old = {("TimeStamp" if k == "Timestamp" else k): v for k, v in A2_PARAMS.items()}
        assert rpc_signature("GET", old, "testsecret") == "CT9X0VtwR86fNWSnsc6v8YGOjuE="

    def test_a4_a5_computed_send_batch_sms(self) -> None:
        assert rpc_signature("GET", A4_PARAMS, SECRET) == "kWdCqAjOxQ3VNSDLW3Kve4X8S9U="
        assert rpc_signature("POST", A4_PARAMS, SECRET) == "ywShTrJGUAfUykLIWXfsIaP47iM="
        # The Signature parameter itself is never signed.
        signed = {**A4_PARAMS, "Signature": "ywShTrJGUAfUykLIWXfsIaP47iM="}
        assert rpc_signature("POST", signed, SECRET) == "ywShTrJGUAfUykLIWXfsIaP47iM="

    def test_a5_reproduced_by_build_request(self) -> None:
        sms = AliyunSms(
            credentials=TEST_CREDENTIALS,
            template_code="SMS_154950909",
            signature="v2",
            region_id="cn-hangzhou",
            clock=lambda: NEW_YEAR_2024,
            nonce=lambda: "45e25e9b-0a6f-4070-8c85-2956eda1b466",
        )
        request = sms.build_request(Batch(1, vector_messages()))
        query = dict(urllib.parse.parse_qsl(request.url.query.decode(), strict_parsing=True))
        assert query["Signature"] == "ywShTrJGUAfUykLIWXfsIaP47iM="
        assert {**query, **dict(form_params(request.content))} == {
            **A4_PARAMS,
            "Signature": "ywShTrJGUAfUykLIWXfsIaP47iM=",
        }
        assert request.content == B2_BODY  # same form body as B2

    def test_b1_official_v3(self) -> None:
        headers = {**B1_HEADERS, "x-acs-content-sha256": EMPTY_SHA256}
        signed = sorted(headers)
        canonical = v3_canonical_request("POST", "/", B1_QUERY, headers, signed, EMPTY_SHA256)
        assert hashlib.sha256(canonical.encode()).hexdigest() == (
            "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        )
        assert v3_signature(canonical, "YourAccessKeySecret") == (
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        )
        creds = AliyunCredentials("YourAccessKeyId", "YourAccessKeySecret")
        out = v3_sign_headers("POST", "/", B1_QUERY, B1_HEADERS, b"", creds)
        assert out["x-acs-content-sha256"] == EMPTY_SHA256
        assert out["authorization"] == (
            "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;"
            "x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,"
            "Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        )
        assert verify_v3("POST", "/", B1_QUERY, out, b"", "YourAccessKeySecret")

    def test_b2_computed_v3_send_batch_sms(self) -> None:
        headers = {
            "host": "dysmsapi.aliyuncs.com", "x-acs-action": "SendBatchSms", "x-acs-version": "2017-05-25",
            "x-acs-date": "2024-01-01T00:00:00Z", "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
            "content-type": "application/x-www-form-urlencoded",
        }  # fmt: skip
        out = v3_sign_headers(
            "POST", "/", [("TemplateCode", "SMS_154950909")], headers, B2_BODY, TEST_CREDENTIALS
        )
        assert (
            out["x-acs-content-sha256"] == "81e341631b5ff4b3daf44ae2b88e482a65166e2392d05663fe5d43df2100f94b"
        )
        assert out["authorization"].endswith(f"SignedHeaders={SIGNED_BY_US},Signature={B2_SIGNATURE}")

    def test_b2_reproduced_by_build_request(self) -> None:
        sms = AliyunSms(
            credentials=TEST_CREDENTIALS,
            template_code="SMS_154950909",
            clock=lambda: NEW_YEAR_2024 + 0.75,  # fractions of a second are dropped
            nonce=lambda: "3156853299f313e23d1673dc12e1703d",
        )
        request = sms.build_request(Batch(1, vector_messages()))
        assert request.content == B2_BODY
        assert request.url.raw_path == b"/?TemplateCode=SMS_154950909"
        assert request.headers["x-acs-date"] == "2024-01-01T00:00:00Z"
        assert request.headers["authorization"] == (
            f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={SIGNED_BY_US},Signature={B2_SIGNATURE}"
        )


# -- official-SDK captures (S1-S6) -----------------------------------------------------------------
CAPTURE_SIGNATURES = {
    "classic_SendBatchSms": "BUAr/fQiGlhDUHxk7FSHeLvMdgU=",
    "classic_SendBatchCardSms_CommonRequest": "o9lIB2QjwL83ikHESZUFbAbB+Fw=",
    "tea_v2_SendBatchSms": "uZ6RJK2kTqb+8e9K6vOLjQdpTXk=",
    "tea_v2_SendBatchCardSms": "Cag7CQi7WgKcIx6V7bT7Xor605M=",
    "tea_v3_SendBatchSms": "1505ecb896d51f211f6712e9641a055c4e32a98884b2624c44320c2eb9f78a74",
    "tea_v3_SendBatchCardSms": "16cbf0744ce8d0c647634ff63f9d78e5aec82bd2ce8b01f246de80c16cc73ced",
}


@dataclasses.dataclass
class Captured:
    """One captured request, decoded as the simulator decodes what it receives."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    @classmethod
    def load(cls, name: str) -> Captured:
        data = json.loads((CAPTURE_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert data["access_key_id"] == TEST_CREDENTIALS.access_key_id
        assert data["access_key_secret"] == TEST_CREDENTIALS.access_key_secret
        (req,) = data["requests"]
        return cls(
            method=req["method"],
            path=req["path"],
            query=urllib.parse.parse_qsl(req["query_raw"], keep_blank_values=True, strict_parsing=True),
            headers={k.lower(): v for k, v in req["headers"]},
            body=base64.b64decode(req["body_b64"] or ""),
        )

    def v2_params(self, body: bytes | None = None) -> dict[str, str]:
        return {**dict(self.query), **dict(form_params(self.body if body is None else body))}

    def verify_v3(self, **changes: Any) -> bool:
        fields = {**dataclasses.asdict(self), **changes}
        return verify_v3(
            fields["method"], fields["path"], fields["query"], fields["headers"], fields["body"], SECRET
        )


V2_CAPTURES = sorted(k for k in CAPTURE_SIGNATURES if not k.startswith("tea_v3"))
V3_CAPTURES = sorted(k for k in CAPTURE_SIGNATURES if k.startswith("tea_v3"))


class TestSdkCaptures:
    def test_all_six_captures_are_present(self) -> None:
        assert {p.stem for p in CAPTURE_DIR.glob("*.json")} == set(CAPTURE_SIGNATURES)

    @pytest.mark.parametrize("name", V2_CAPTURES)
    def test_v2_signature_reproduced(self, name: str) -> None:
        cap = Captured.load(name)
        params = cap.v2_params()
        assert params["Signature"] == CAPTURE_SIGNATURES[name]
        assert rpc_signature(cap.method, params, SECRET) == CAPTURE_SIGNATURES[name]
        assert verify_v2(cap.method, params, SECRET)

    def test_tea_v2_signs_the_form_body(self) -> None:
        cap = Captured.load("tea_v2_SendBatchSms")
        assert cap.body and "PhoneNumberJson" not in dict(cap.query)
        assert not verify_v2(cap.method, dict(cap.query), SECRET)  # the body fields are signed
        assert verify_v2(cap.method, cap.v2_params(), SECRET)

    @pytest.mark.parametrize("name", V2_CAPTURES)
    def test_v2_one_changed_byte_is_rejected(self, name: str) -> None:
        cap = Captured.load(name)
        params = cap.v2_params()
        for key in params:
            if params[key]:
                assert not verify_v2(cap.method, {**params, key: flip(params[key])}, SECRET), key
        assert not verify_v2(cap.method, {**params, "Extra": "1"}, SECRET)
        assert not verify_v2("GET", params, SECRET)
        assert not verify_v2(cap.method, params, "testsecreT")
        if cap.body:  # a byte of the raw form body, as received
            at = cap.body.index(b"13800000001") + 5
            assert not verify_v2(cap.method, cap.v2_params(flip_byte(cap.body, at)), SECRET)

    @pytest.mark.parametrize("name", V3_CAPTURES)
    def test_v3_signature_reproduced(self, name: str) -> None:
        cap = Captured.load(name)
        parsed = parse_v3_authorization(cap.headers["authorization"])
        assert parsed is not None
        key_id, signed, signature = parsed
        assert (key_id, signature) == ("testid", CAPTURE_SIGNATURES[name])
        assert {"accept", "user-agent", "x-acs-credentials-provider"} <= set(signed)  # extra headers
        body_sha256 = hashlib.sha256(cap.body).hexdigest()
        assert cap.headers["x-acs-content-sha256"] == body_sha256
        canonical = v3_canonical_request(cap.method, cap.path, cap.query, cap.headers, signed, body_sha256)
        assert v3_signature(canonical, SECRET) == CAPTURE_SIGNATURES[name]
        assert cap.verify_v3()

    @pytest.mark.parametrize("name", V3_CAPTURES)
    def test_v3_one_changed_byte_is_rejected(self, name: str) -> None:
        cap = Captured.load(name)
        h = cap.headers
        # in a query parameter value
        for i, (k, v) in enumerate(cap.query):
            query = [*cap.query[:i], (k, flip(v)), *cap.query[i + 1 :]]
            assert not cap.verify_v3(query=query), k
        # in every signed header, including the extra ones the SDK signs (accept, user-agent)
        _, signed, _ = parse_v3_authorization(h["authorization"]) or ("", [], "")
        for header in signed:
            assert not cap.verify_v3(headers={**h, header: flip(h[header])}), header
        # in the signature, and with the wrong secret
        assert not cap.verify_v3(headers={**h, "authorization": flip(h["authorization"])})
        assert not verify_v3(cap.method, cap.path, cap.query, h, cap.body, "testsecreT")
        # in the body: caught by x-acs-content-sha256, and by the signature if that is updated too
        body = flip_byte(cap.body + b"x") if not cap.body else flip_byte(cap.body, len(cap.body) // 2)
        assert not cap.verify_v3(body=body)
        rehashed = {**h, "x-acs-content-sha256": hashlib.sha256(body).hexdigest()}
        assert not cap.verify_v3(body=body, headers=rehashed)
        # an unsigned header may change (proxies add and rewrite them)
        assert cap.verify_v3(headers={**h, "accept-encoding": "gzip", "connection": "close"})

    def test_v3_capture_query_spaces_sent_as_plus_are_signed_as_percent_20(self) -> None:
        cap = Captured.load("tea_v3_SendBatchCardSms")
        raw = json.loads((CAPTURE_DIR / "tea_v3_SendBatchCardSms.json").read_text())["requests"][0]
        assert "Peer+Test" in raw["query_raw"]
        assert ("SignNameJson", '["阿里云短信测试","Peer Test","阿里云短信测试"]') in cap.query
        assert cap.verify_v3()


# -- verification edge cases ------------------------------------------------------------------
def signed_v3(headers: dict[str, str], body: bytes = b"", signed: list[str] | None = None) -> dict[str, str]:
    """``headers`` with a valid authorization over ``signed`` (default: all of them)."""
    out = {**headers, "x-acs-content-sha256": hashlib.sha256(body).hexdigest()}
    names = sorted(out) if signed is None else signed
    sig = v3_signature(v3_canonical_request("POST", "/", [], out, names, out["x-acs-content-sha256"]), SECRET)
    out["authorization"] = (
        f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={';'.join(names)},Signature={sig}"
    )
    return out


class TestVerification:
    def test_parse_v3_authorization(self) -> None:
        assert parse_v3_authorization(
            "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host;x-acs-date,Signature=ab12"
        ) == ("id", ["host", "x-acs-date"], "ab12")
        assert parse_v3_authorization(
            "  ACS3-HMAC-SHA256 Credential=id, SignedHeaders=host, Signature=ab12 "
        ) == ("id", ["host"], "ab12")
        for bad in [
            "",
            "garbage",
            "ACS3-HMAC-SHA256",
            "ACS3-HMAC-SHA1 Credential=id,SignedHeaders=host,Signature=ab",
            "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host",
            "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=ab",
            "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host,Signature=ab,Signature=cd",
            "ACS3-HMAC-SHA256 Credential=id,SignedHeaders,Signature=ab",
        ]:
            assert parse_v3_authorization(bad) is None, bad

    def test_v3_signed_headers_must_cover_host_and_every_x_acs_header(self) -> None:
        base = {**B1_HEADERS}
        assert verify_v3("POST", "/", [], signed_v3(base), b"", SECRET)
        all_but_date = sorted(h for h in [*base, "x-acs-content-sha256"] if h != "x-acs-date")
        assert not verify_v3("POST", "/", [], signed_v3(base, signed=all_but_date), b"", SECRET)
        all_but_host = sorted(h for h in [*base, "x-acs-content-sha256"] if h != "host")
        assert not verify_v3("POST", "/", [], signed_v3(base, signed=all_but_host), b"", SECRET)

    def test_v3_signed_headers_must_be_sorted_lower_case_and_sent(self) -> None:
        names = sorted([*B1_HEADERS, "x-acs-content-sha256"])
        unsorted = [names[-1], *names[:-1]]
        assert not verify_v3("POST", "/", [], signed_v3(B1_HEADERS, signed=unsorted), b"", SECRET)
        h = signed_v3({**B1_HEADERS, "accept": "application/json"}, signed=["accept", *names])
        assert verify_v3("POST", "/", [], h, b"", SECRET)
        del h["accept"]
        assert not verify_v3("POST", "/", [], h, b"", SECRET)

    def test_v3_missing_or_malformed_parts(self) -> None:
        h = signed_v3(B1_HEADERS)
        assert not verify_v3(
            "POST", "/", [], {k: v for k, v in h.items() if k != "authorization"}, b"", SECRET
        )
        no_hash = {k: v for k, v in h.items() if k != "x-acs-content-sha256"}
        assert not verify_v3("POST", "/", [], no_hash, b"", SECRET)
        non_ascii = {**h, "authorization": h["authorization"][:-1] + "é"}
        assert not verify_v3("POST", "/", [], non_ascii, b"", SECRET)  # no TypeError
        assert not verify_v3("GET", "/", [], h, b"", SECRET)

    def test_v2_missing_or_malformed_signature(self) -> None:
        params = {**A4_PARAMS, "Signature": rpc_signature("POST", A4_PARAMS, SECRET)}
        assert verify_v2("POST", params, SECRET)
        assert not verify_v2("POST", A4_PARAMS, SECRET)
        assert not verify_v2("POST", {**params, "Signature": ""}, SECRET)
        assert not verify_v2("POST", {**params, "Signature": "é" + params["Signature"][1:]}, SECRET)
        other = {**A4_PARAMS, "SignatureMethod": "HMAC-SHA256"}
        assert not verify_v2("POST", {**other, "Signature": rpc_signature("POST", other, SECRET)}, SECRET)


# -- percent-encoding -------------------------------------------------------------------------
class TestPercentEncode:
    @given(st.text())
    def test_same_as_quote_for_any_text(self, s: str) -> None:
        assert percent_encode(s) == quote(s)

    @given(st.text(st.characters(max_codepoint=0x7F)))
    def test_same_as_quote_for_ascii(self, s: str) -> None:
        assert percent_encode(s) == quote(s)

    @given(st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=12), max_size=3), max_size=20))
    def test_same_as_quote_for_json_params(self, params: list[dict[str, str]]) -> None:
        s = orjson.dumps(params).decode()
        assert percent_encode(s) == quote(s)

    @pytest.mark.parametrize(
        ("raw", "encoded"),
        [
            ("", ""),
            ("SMS_154950909", "SMS_154950909"),
            ("a b*c~d+e/f", "a%20b%2Ac~d%2Be%2Ff"),
            ("%", "%25"),
            ("%25", "%2525"),
            ("é", "%C3%A9"),
            ("阿", "%E9%98%BF"),
            ("😀", "%F0%9F%98%80"),
            ("2017-07-12T02:42:19Z", "2017-07-12T02%3A42%3A19Z"),
            (string.punctuation, quote(string.punctuation)),  # many distinct characters
            ("\x00\x7f\n", "%00%7F%0A"),
        ],
    )
    def test_examples(self, raw: str, encoded: str) -> None:
        assert percent_encode(raw) == encoded

    def test_lone_surrogate_is_refused_like_quote(self) -> None:
        with pytest.raises(UnicodeEncodeError):
            quote("\ud800")
        with pytest.raises(UnicodeEncodeError):
            percent_encode("\ud800")


# -- building requests --------------------------------------------------------------------------
def provider(signature: str = "v3", **kwargs: Any) -> AliyunSms:
    options: dict[str, Any] = {
        "credentials": TEST_CREDENTIALS,
        "template_code": "SMS_154950909",
        "clock": lambda: NEW_YEAR_2024,
        "nonce": lambda: "3156853299f313e23d1673dc12e1703d",
        **kwargs,
    }
    return AliyunSms(signature="v2" if signature == "v2" else "v3", **options)


def messages(n: int, sign: str = "Acme", params: dict[str, str] | None = None) -> list[Message]:
    p = {"code": "1234"} if params is None else params
    return [Message(i, f"k{i}", f"86139{i:08d}", dict(p), sign) for i in range(1, n + 1)]


def received(request: httpx.Request) -> tuple[list[tuple[str, str]], dict[str, str], list[tuple[str, str]]]:
    """(query, lower-case headers, form) decoded the way a server decodes them."""
    raw_query = request.url.raw_path.partition(b"?")[2].decode("ascii")
    query = urllib.parse.parse_qsl(raw_query, keep_blank_values=True, strict_parsing=True)
    return query, {k.lower(): v for k, v in request.headers.items()}, form_params(request.content)


def verified(request: httpx.Request) -> bool:
    query, headers, form = received(request)
    assert request.url.path == "/"
    if "authorization" in headers:
        return verify_v3(request.method, request.url.path, query, headers, request.content, SECRET)
    return verify_v2(request.method, {**dict(query), **dict(form)}, SECRET)


TRICKY = {"name": "Ann O'Neil & co + *~ 张三", "url": "a=b/c?d#e%f", "code": "12 34"}


class TestBuildRequest:
    def test_provider_protocol_facts(self) -> None:
        sms = provider()
        assert (sms.name, sms.max_batch_size) == ("aliyun", 100)
        a, b = messages(2)
        b.sign_name, b.phone = "Other sign", "85212345678"
        assert sms.batch_key(a) == sms.batch_key(b)

    @pytest.mark.parametrize("signature", ["v3", "v2"])
    def test_round_trip_verifies(self, signature: str) -> None:
        sms = provider(signature, region_id="cn-hangzhou")
        msgs = messages(3, sign="阿里云 测试", params=TRICKY)
        msgs[1].sign_name = "Peer Test*~"
        request = sms.build_request(Batch(7, msgs, out_id="run 7/b*~"))
        assert verified(request)
        query, headers, form = received(request)
        fields = dict(form)
        assert list(fields) == ["PhoneNumberJson", "SignNameJson", "TemplateParamJson"]
        assert orjson.loads(fields["PhoneNumberJson"]) == ["13900000001", "13900000002", "13900000003"]
        assert orjson.loads(fields["SignNameJson"]) == ["阿里云 测试", "Peer Test*~", "阿里云 测试"]
        assert orjson.loads(fields["TemplateParamJson"]) == [TRICKY] * 3
        assert dict(query)["OutId"] == "run 7/b*~" and dict(query)["TemplateCode"] == "SMS_154950909"
        assert headers["content-type"] == "application/x-www-form-urlencoded"
        assert headers["accept"] == "application/json"
        assert b"+" not in request.content.replace(b"%2B", b"")  # spaces are %20, never '+'
        assert b"*" not in request.content and b"%7E" not in request.content
        # one changed byte anywhere in the body breaks it
        tampered = httpx.Request(
            "POST", request.url, headers=request.headers, content=request.content[:-1] + b"0"
        )
        assert not verified(tampered)

    def test_v3_headers(self) -> None:
        request = provider(endpoint="http://127.0.0.1:8080").build_request(
            Batch(1, messages(2), out_id="o-1")
        )
        _, headers, _ = received(request)
        assert headers["host"] == "127.0.0.1:8080"
        assert headers["x-acs-action"] == "SendBatchSms" and headers["x-acs-version"] == "2017-05-25"
        assert headers["x-acs-date"] == "2024-01-01T00:00:00Z"
        assert headers["x-acs-signature-nonce"] == "3156853299f313e23d1673dc12e1703d"
        assert headers["x-acs-content-sha256"] == hashlib.sha256(request.content).hexdigest()
        assert headers["authorization"].startswith(
            f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={SIGNED_BY_US},Signature="
        )
        assert request.url.raw_path == b"/?OutId=o-1&TemplateCode=SMS_154950909"
        assert str(request.url) == "http://127.0.0.1:8080/?OutId=o-1&TemplateCode=SMS_154950909"

    def test_v2_query_is_sent_exactly_as_signed(self) -> None:
        sms = provider("v2", region_id="cn-hangzhou")
        request = sms.build_request(Batch(1, messages(2), out_id="run 1/b*~"))
        query, headers, form = received(request)
        assert "authorization" not in headers and not any(h.startswith("x-acs-") for h in headers)
        params = {**dict(query), **dict(form)}
        signature = rpc_signature("POST", params, SECRET)
        expected = [
            ("Action", "SendBatchSms"), ("Version", "2017-05-25"), ("Format", "JSON"),
            ("AccessKeyId", "testid"), ("SignatureMethod", "HMAC-SHA1"), ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_154950909"),
            ("RegionId", "cn-hangzhou"), ("SignatureNonce", "3156853299f313e23d1673dc12e1703d"),
            ("Timestamp", "2024-01-01T00:00:00Z"), ("OutId", "run 1/b*~"), ("Signature", signature),
        ]  # fmt: skip
        target = "/?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in expected)
        assert request.url.raw_path == target.encode()
        assert b"OutId=run%201%2Fb%2A~&" in request.url.raw_path
        assert verify_v2("POST", params, SECRET)

    def test_no_out_id_and_no_region(self) -> None:
        for signature in ("v3", "v2"):
            request = provider(signature).build_request(Batch(1, messages(1)))
            query, _, _ = received(request)
            names = {k for k, _ in query}
            assert "OutId" not in names and "RegionId" not in names
            assert verified(request)

    def test_clock_and_nonce_are_used_per_request(self) -> None:
        now = [NEW_YEAR_2024]
        nonces = iter(["n1", "n2", "n3"])
        sms = provider(clock=lambda: now[0], nonce=lambda: next(nonces))
        first = sms.build_request(Batch(1, messages(1)))
        now[0] += 61
        second = sms.build_request(Batch(2, messages(1)))
        assert (first.headers["x-acs-signature-nonce"], second.headers["x-acs-signature-nonce"]) == (
            "n1",
            "n2",
        )
        assert second.headers["x-acs-date"] == "2024-01-01T00:01:01Z"
        v2 = provider("v2", clock=lambda: now[0], nonce=lambda: next(nonces))
        query, _, _ = received(v2.build_request(Batch(3, messages(1))))
        assert ("SignatureNonce", "n3") in query and ("Timestamp", "2024-01-01T00:01:01Z") in query

    @pytest.mark.parametrize(
        ("e164", "sent"),
        [
            ("8613900000001", "13900000001"),  # mainland mobile: bare 11 digits
            ("8619912345678", "19912345678"),
            ("85212345678", "85212345678"),  # Hong Kong: country code + number
            ("14155550100", "14155550100"),
            ("8602012345678", "8602012345678"),  # 86 + a landline: left as it is
            ("861390000000", "861390000000"),  # 86 + 10 digits: left as it is
        ],
    )
    def test_phone_formatting(self, e164: str, sent: str) -> None:
        assert aliyun_phone(e164) == sent
        msg = Message(1, "k", e164, {}, "Acme")
        form = dict(form_params(provider().build_request(Batch(1, [msg])).content))
        assert orjson.loads(form["PhoneNumberJson"]) == [sent]

    def test_template_params_omitted_only_when_all_empty(self) -> None:
        request = provider().build_request(Batch(1, messages(3, params={})))
        assert [k for k, _ in form_params(request.content)] == ["PhoneNumberJson", "SignNameJson"]
        msgs = messages(3, params={})
        msgs[1].params = {"code": "1"}
        form = dict(form_params(provider().build_request(Batch(1, msgs)).content))
        assert orjson.loads(form["TemplateParamJson"]) == [{}, {"code": "1"}, {}]

    def test_a_full_batch_of_mixed_sign_names(self) -> None:
        msgs = messages(100, params=TRICKY)
        for i, m in enumerate(msgs):
            m.sign_name = ["Acme", "阿里云短信测试", "Peer Test"][i % 3]
        for signature in ("v3", "v2"):
            request = provider(signature).build_request(Batch(1, msgs, out_id="b-100"))
            assert verified(request)
            form = dict(received(request)[2])
            assert orjson.loads(form["SignNameJson"]) == [m.sign_name for m in msgs]
            assert len(orjson.loads(form["PhoneNumberJson"])) == 100

    def test_unusual_phone_strings_are_still_encoded(self) -> None:
        msgs = [Message(1, "k", "+86 139", {}, "A")]
        request = provider().build_request(Batch(1, msgs))
        assert verified(request)
        assert orjson.loads(dict(received(request)[2])["PhoneNumberJson"]) == ["+86 139"]

    def test_bad_endpoint_is_refused(self) -> None:
        with pytest.raises(ValueError, match="endpoint"):
            provider(endpoint="dysmsapi.aliyuncs.com")

    @pytest.mark.anyio
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_sent_through_an_httpx_client(self, signature: str) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if not verified(request):
                return httpx.Response(400, json={"Code": "SignatureDoesNotMatch", "RequestId": "R0"})
            body = {"Code": "OK", "Message": "OK", "BizId": "900619746936498440^0", "RequestId": "R1"}
            return httpx.Response(200, json=body)

        sms = provider(signature, endpoint="http://sim.test:8080", region_id="cn-hangzhou")
        batch = Batch(1, messages(2, sign="阿里云短信测试", params=TRICKY), out_id="run-1 b1*~")
        request = sms.build_request(batch)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            response = await client.send(request)
        (sent,) = seen
        assert sent.url.raw_path == request.url.raw_path  # the target is not re-encoded on the way
        assert sent.content == request.content
        outcome = sms.parse_response(batch, response)
        assert outcome == BatchOutcome(
            Outcome.SENT, code="OK", provider_id="900619746936498440^0", extra={"request_id": "R1"}
        )


# -- responses ----------------------------------------------------------------------------------
def response(
    status: int, body: bytes | dict[str, Any] | list[Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers or {})


class TestParseResponse:
    sms = provider()
    batch = Batch(1, messages(2))

    def parse(self, r: httpx.Response) -> BatchOutcome:
        return self.sms.parse_response(self.batch, r)

    def test_ok(self) -> None:
        body = {"Code": "OK", "Message": "OK", "BizId": "900619746936498440^0", "RequestId": "F7DC"}
        out = self.parse(response(200, body))
        assert out == BatchOutcome(
            Outcome.SENT, code="OK", provider_id="900619746936498440^0", extra={"request_id": "F7DC"}
        )

    @pytest.mark.parametrize(
        ("status", "code", "outcome"),
        [
            (200, "isv.MOBILE_NUMBER_ILLEGAL", Outcome.SPLIT),  # a batch of 2: split (test_split.py)
            (200, "isv.BLACK_KEY_CONTROL_LIMIT", Outcome.SPLIT),
            (200, "isv.AMOUNT_NOT_ENOUGH", Outcome.FATAL),
            (200, "isv.SMS_TEMPLATE_ILLEGAL", Outcome.FATAL),
            (400, "SignatureDoesNotMatch", Outcome.FATAL),
            (404, "InvalidAccessKeyId.NotFound", Outcome.FATAL),
            (403, "Forbidden.RAM", Outcome.FATAL),
            (400, "InvalidTimeStamp.Expired", Outcome.RETRY),
            (400, "SignatureNonceUsed", Outcome.RETRY),
            (400, "Throttling.User", Outcome.THROTTLED),
            (400, "Throttling.Api", Outcome.THROTTLED),
            (200, "isv.BUSINESS_LIMIT_CONTROL", Outcome.SPLIT),
            (200, "isp.SYSTEM_ERROR", Outcome.UNKNOWN),
            (500, "InternalError", Outcome.UNKNOWN),
            (503, "ServiceUnavailable", Outcome.UNKNOWN),
            (200, "isv.SOMETHING_NEW", Outcome.FATAL),
            (400, "SomethingNew", Outcome.FATAL),
            (502, "SomethingNew", Outcome.UNKNOWN),
            (429, "SomethingNew", Outcome.THROTTLED),
        ],
    )
    def test_codes(self, status: int, code: str, outcome: Outcome) -> None:
        body = {"Code": code, "Message": "why", "RequestId": "R", "HostId": "dysmsapi.aliyuncs.com"}
        out = self.parse(response(status, body))
        extra = {"request_id": "R"} | ({"alone": CODE_CLASSES[code]} if outcome is Outcome.SPLIT else {})
        assert (out.outcome, out.code, out.message, out.extra) == (outcome, code, "why", extra)
        assert out.provider_id is None and out.recipients is None

    @pytest.mark.parametrize(
        ("headers", "seconds"),
        [
            ({"x-acs-retry-after": "1500"}, 1.5),  # milliseconds, as the Tea SDKs read it
            ({"x-acs-retry-after": " 80 "}, 0.08),
            ({"Retry-After": "2"}, 2.0),  # seconds
            ({"x-acs-retry-after": "250", "Retry-After": "9"}, 0.25),
            ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
            ({"x-acs-retry-after": "soon"}, None),
            ({"x-acs-retry-after": "-5"}, None),
            ({"x-acs-retry-after": "0"}, None),
            ({"Retry-After": "nan"}, None),
            ({"Retry-After": "inf"}, None),
            ({"Retry-After": "999999"}, 3600.0),
            ({}, None),
        ],
    )
    def test_throttling_retry_after(self, headers: dict[str, str], seconds: float | None) -> None:
        out = self.parse(response(400, {"Code": "Throttling.User", "Message": "flow control"}, headers))
        assert out.outcome is Outcome.THROTTLED and out.code == "Throttling.User"
        assert out.retry_after == (pytest.approx(seconds) if seconds is not None else None)

    @pytest.mark.parametrize(
        ("status", "body", "outcome"),
        [
            (200, b'{"Code":"O', Outcome.UNKNOWN),
            (200, b"", Outcome.UNKNOWN),
            (200, b"\xff\xfe\x00", Outcome.UNKNOWN),
            (200, b"[1,2]", Outcome.UNKNOWN),
            (200, b'{"Message":"no code"}', Outcome.UNKNOWN),
            (200, b'{"Code":5}', Outcome.UNKNOWN),
            (200, b'{"Code":""}', Outcome.UNKNOWN),
            (500, b'{"Code":"OK","BizId":"1"}', Outcome.UNKNOWN),  # contradicts itself
            (502, b"<html>bad gateway</html>", Outcome.UNKNOWN),
            (503, b"", Outcome.UNKNOWN),
            (403, b"<html>forbidden</html>", Outcome.FATAL),
            (404, b"null", Outcome.FATAL),
            (429, b"slow down", Outcome.THROTTLED),
        ],
    )
    def test_bodies_without_a_usable_code(self, status: int, body: bytes, outcome: Outcome) -> None:
        out = self.parse(response(status, body))
        assert out.outcome is outcome and out.code == f"HTTP{status}"

    def test_garbage_throttle_keeps_retry_after_and_request_id_header(self) -> None:
        out = self.parse(response(429, b"slow", {"Retry-After": "3", "x-acs-request-id": "RID"}))
        assert (out.outcome, out.retry_after, out.extra) == (Outcome.THROTTLED, 3.0, {"request_id": "RID"})

    def test_long_messages_are_cut(self) -> None:
        out = self.parse(response(200, {"Code": "isv.SMS_CONTENT_ILLEGAL", "Message": "x" * 5000}))
        assert out.message is not None and len(out.message) == 500

    @given(st.integers(100, 599), st.binary(max_size=64))
    def test_never_raises(self, status: int, body: bytes) -> None:
        assert isinstance(self.parse(response(status, body)).outcome, Outcome)

    @given(
        st.integers(200, 599),
        st.dictionaries(
            st.sampled_from(["Code", "Message", "RequestId", "BizId"]),
            st.one_of(st.none(), st.integers(), st.text(), st.lists(st.text())),
        ),
    )
    def test_never_raises_on_odd_json(self, status: int, body: dict[str, Any]) -> None:
        assert isinstance(self.parse(response(status, body)).outcome, Outcome)


# -- code classes (PROTOCOLS.md §1.7-1.8) ---------------------------------------------------------
DOCUMENTED = {
    Outcome.SENT: ["OK"],
    Outcome.FAILED: [
        "isv.MOBILE_NUMBER_ILLEGAL", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED", "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.SMS_CONTENT_ILLEGAL", "isv.TEMPLATE_PARAMS_ILLEGAL", "isv.PARAM_NOT_SUPPORT_URL",
        "isv.PARAM_LENGTH_LIMIT",
    ],
    Outcome.FATAL: [
        # auth
        "SignatureDoesNotMatch", "IncompleteSignature", "InvalidAccessKeyId.NotFound", "Forbidden.RAM",
        "isp.RAM_PERMISSION_DENY", "isv.DENY_IP_RANGE",
        # account / balance
        "isv.AMOUNT_NOT_ENOUGH", "isv.OUT_OF_SERVICE", "isv.PRODUCT_UN_SUBSCRIPT", "isv.PRODUCT_UNSUBSCRIBE",
        "isv.ACCOUNT_NOT_EXISTS", "isv.ACCOUNT_ABNORMAL", "isv.DAY_LIMIT_CONTROL", "isv.MONTH_LIMIT_CONTROL",
        # template / signature / params
        "isv.SMS_TEMPLATE_ILLEGAL", "isv.SMS_SIGNATURE_ILLEGAL", "isv.SMS_SIGN_ILLEGAL",
        "isv.SIGN_STATE_ILLEGAL",
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
    def test_every_documented_code(self, outcome: Outcome) -> None:
        for code in DOCUMENTED[outcome]:
            assert CODE_CLASSES[code] is outcome, code
            for status in (200, 400, 403, 404, 500, 503):
                assert classify(code, status) is outcome, (code, status)

    def test_exactly_the_documented_codes(self) -> None:
        documented = [c for codes in DOCUMENTED.values() for c in codes]
        assert len(documented) == len(set(documented)) == len(CODE_CLASSES) == 44
        assert set(CODE_CLASSES) == set(documented)

    @pytest.mark.parametrize(
        ("code", "status", "outcome"),
        [
            ("isv.SOMETHING_NEW", 200, Outcome.FATAL),  # whole batch: stop, recipients stay pending
            ("InvalidTimeStamp.Format", 400, Outcome.FATAL),
            ("InvalidVersion", 400, Outcome.FATAL),
            ("SomethingNew", 404, Outcome.FATAL),
            ("SomethingNew", 500, Outcome.UNKNOWN),
            ("SomethingNew", 504, Outcome.UNKNOWN),
            ("SomethingNew", 429, Outcome.THROTTLED),
            ("Throttling.Something", 400, Outcome.THROTTLED),
        ],
    )
    def test_unknown_codes(self, code: str, status: int, outcome: Outcome) -> None:
        assert classify(code, status) is outcome


# -- credentials --------------------------------------------------------------------------------
class TestCredentials:
    def test_repr_hides_the_secret(self) -> None:
        c = AliyunCredentials("id-1", "s3cr3t-value")
        for text in (repr(c), str(c), f"{c}", f"{[c]}"):
            assert "s3cr3t-value" not in text and "id-1" in text

    def test_frozen(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            TEST_CREDENTIALS.access_key_secret = "x"  # type: ignore[misc]

    def test_test_credentials(self) -> None:
        assert (TEST_CREDENTIALS.access_key_id, TEST_CREDENTIALS.access_key_secret) == (
            "testid",
            "testsecret",
        )

    def test_from_env(self) -> None:
        env = {"ALIYUN_ACCESS_KEY_ID": "an-id", "ALIYUN_ACCESS_KEY_SECRET": "a-secret", "OTHER": "x"}
        assert AliyunCredentials.from_env(env) == AliyunCredentials("an-id", "a-secret")

    @pytest.mark.parametrize(
        ("env", "missing"),
        [
            ({"ALIYUN_ACCESS_KEY_ID": "visible-id"}, ["ALIYUN_ACCESS_KEY_SECRET"]),
            ({"ALIYUN_ACCESS_KEY_SECRET": "hidden-secret"}, ["ALIYUN_ACCESS_KEY_ID"]),
            (
                {"ALIYUN_ACCESS_KEY_ID": "visible-id", "ALIYUN_ACCESS_KEY_SECRET": "  "},
                ["ALIYUN_ACCESS_KEY_SECRET"],
            ),
            ({}, ["ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET"]),
        ],
    )
    def test_from_env_names_the_missing_variable_not_values(
        self, env: dict[str, str], missing: list[str]
    ) -> None:
        with pytest.raises(CredentialsError) as info:
            AliyunCredentials.from_env(env)
        text = str(info.value)
        assert all(name in text for name in missing)
        assert "visible-id" not in text and "hidden-secret" not in text
