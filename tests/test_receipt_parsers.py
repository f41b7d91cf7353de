"""Each provider's receipt push parser (``ProviderKind.receipts``), at unit level.

The four seed pages show no receipt push, so the pushes below are built from the field lists
of PROTOCOLS.md (§1.9 Aliyun SmsReport, §2.6 SUBMAIL SUBHOOK, §3.6 NXCloud DR): every field
the documentation names, with made-up values.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
from typing import ClassVar
from urllib.parse import urlencode

import orjson
import pytest

from providers import registry
from providers.spec import BadReceipt, BadSignature, PushRequest, Receipt, ReceiptPush

KEY = "subhook-key-0123"


def push_of(kind: str) -> ReceiptPush:
    spec = registry.lookup(kind)
    assert spec is not None and spec.receipts is not None
    return spec.receipts


def request(
    body: bytes = b"",
    content_type: str = "application/x-www-form-urlencoded",
    method: str = "POST",
    query: dict[str, str] | None = None,
) -> PushRequest:
    return PushRequest(method, body, content_type, query or {}, {"content-type": content_type})


def beijing(text: str) -> float:
    """``yyyy-MM-dd HH:mm:ss`` read as UTC+8, computed independently of the parsers."""
    date, clock = text.split()
    fields = [int(x) for x in date.split("-")] + [int(x) for x in clock.split(":")]
    return float(calendar.timegm((*fields, 0, 0, 0))) - 8 * 3600


class TestDeclarations:
    def test_each_receipt_protocol_is_served_at_one_path(self) -> None:
        pushes = registry.receipt_pushes()
        assert list(pushes) == ["aliyun", "submail", "nxcloud"]
        assert push_of("aliyun-card") is push_of("aliyun")  # card SMS reports come as SmsReport
        assert orjson.loads(pushes["aliyun"].answer) == {"code": 0, "msg": "成功"}
        assert pushes["aliyun"].answer_type == "application/json"
        assert pushes["submail"].answer == pushes["nxcloud"].answer == b"success"
        assert pushes["submail"].key_env == "SUBMAIL_SUBHOOK_KEY"
        assert pushes["aliyun"].key_env is None and pushes["nxcloud"].key_env is None
        assert pushes["submail"].batch_ref_chars == 32  # tag: "32 个字符以内" (seed 002)
        assert pushes["aliyun"].methods == pushes["submail"].methods == frozenset({"POST"})
        assert pushes["nxcloud"].methods is None  # the query string of older accounts

    def test_a_path_is_one_providers_and_not_the_listeners(self) -> None:
        base = registry.lookup("aliyun")
        assert base is not None
        for path, problem in (("submail", "another provider's"), ("__stats", "not starting with '_'")):
            clash = dataclasses.replace(
                base, kind="clash", receipts=dataclasses.replace(push_of("aliyun"), path=path)
            )
            with pytest.raises(ValueError, match=problem):
                registry.register(clash)
            assert registry.lookup("clash") is None


class TestAliyunSmsReport:
    REPORTS: ClassVar[list[dict[str, object]]] = [
        {
            "phone_number": "13900000001",
            "send_time": "2026-03-01 10:00:00",
            "report_time": "2026-03-01 10:00:05",
            "success": True,
            "err_code": "DELIVERED",
            "err_msg": "用户接收成功",
            "sms_size": "1",
            "biz_id": "932702304080415357^0",
            "out_id": "r1-7",
        },
        {
            "phone_number": "13900000002",
            "send_time": "2026-03-01 10:00:00",
            "report_time": "2026-03-01 23:59:59",
            "success": False,
            "err_code": "MK:0001",
            "err_msg": "failed",
            "sms_size": "2",
            "biz_id": "932702304080415357^0",
            "out_id": "r1-7",
        },
    ]

    def test_every_report_becomes_a_receipt_in_order(self) -> None:
        body = orjson.dumps(self.REPORTS)
        got = push_of("aliyun").parse(request(body, "application/json"), None)
        assert got == [
            Receipt(
                "aliyun",
                "13900000001",
                True,
                "DELIVERED",
                beijing("2026-03-01 10:00:05"),
                provider_id="932702304080415357^0",
                batch_ref="r1-7",
                batch_id="932702304080415357^0",
            ),
            Receipt(
                "aliyun",
                "13900000002",
                False,
                "MK:0001",
                beijing("2026-03-01 23:59:59"),
                provider_id="932702304080415357^0",
                batch_ref="r1-7",
                batch_id="932702304080415357^0",
            ),
        ]
        assert got[1].reported_at == calendar.timegm((2026, 3, 1, 15, 59, 59, 0, 0, 0))

    def test_missing_code_and_time_and_string_success(self) -> None:
        body = orjson.dumps(
            [{"phone_number": "139", "success": "true"}, {"phone_number": "138", "success": 0}]
        )
        ok, failed = push_of("aliyun").parse(request(body, "application/json"), None)
        assert (ok.delivered, ok.code, ok.reported_at, ok.batch_ref) == (True, "DELIVERED", None, "")
        assert (failed.delivered, failed.code) == (False, "UNKNOWN")

    @pytest.mark.parametrize(
        "body",
        [
            b"[{not json",
            b'{"phone_number":"1","success":true}',
            b"[]",
            b'[{"success":true}]',
            b'[{"phone_number":"1"}]',
        ],
    )
    def test_what_is_not_an_sms_report_is_refused(self, body: bytes) -> None:
        with pytest.raises(BadReceipt):
            push_of("aliyun").parse(request(body, "application/json"), None)


def signed(event: dict[str, str], key: str = KEY, token: str = "4c1f0d") -> dict[str, str]:
    return {**event, "token": token, "signature": hashlib.md5((token + key).encode()).hexdigest()}


class TestSubmailSubhook:
    EVENT: ClassVar[dict[str, str]] = {
        "events": "delivered",
        "send_id": "093c0a7df143c087d6cba9cdf0cf3738",
        "address": "13900000001",
        "app": "10001",
        "tag": "r1-7",
        "timestamp": "1772330405",
    }

    def test_a_signed_form_event(self) -> None:
        body = urlencode(signed(self.EVENT)).encode()
        assert push_of("submail").parse(request(body), KEY) == [
            Receipt(
                "submail",
                "13900000001",
                True,
                "DELIVRD",
                1772330405.0,
                provider_id="093c0a7df143c087d6cba9cdf0cf3738",
                batch_ref="r1-7",
            )
        ]

    def test_a_signed_json_event_with_its_report_code(self) -> None:
        event = signed({**self.EVENT, "events": "dropped", "report": "UNDELIV"})
        event["signature"] = event["signature"].upper()  # compared without regard to case
        (got,) = push_of("submail").parse(request(orjson.dumps(event), "application/json"), KEY)
        assert (got.delivered, got.code, got.phone) == (False, "UNDELIV", "13900000001")

    def test_unknown_settles_as_undelivered(self) -> None:
        body = urlencode(signed({**self.EVENT, "events": "unknown", "timestamp": "x"})).encode()
        (got,) = push_of("submail").parse(request(body), KEY)
        assert (got.delivered, got.code, got.reported_at) == (False, "UNKNOWN", None)

    @pytest.mark.parametrize("kind", ["request", "sending", "mo", "template_accept", "template_reject"])
    def test_events_that_settle_nothing_give_no_receipt(self, kind: str) -> None:
        body = urlencode(signed({**self.EVENT, "events": kind})).encode()
        assert push_of("submail").parse(request(body), KEY) == []

    def test_a_bad_or_unverifiable_signature_is_refused(self) -> None:
        good = urlencode(signed(self.EVENT)).encode()
        with pytest.raises(BadSignature):
            push_of("submail").parse(request(good), None)  # no key configured
        with pytest.raises(BadSignature):
            push_of("submail").parse(request(good), "another-key")
        with pytest.raises(BadSignature):
            push_of("submail").parse(request(urlencode(self.EVENT).encode()), KEY)  # unsigned

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            (b"{not json", "application/json"),
            (b"[]", "application/json"),
            (b"\xff\xfe", "application/x-www-form-urlencoded"),
        ],
    )
    def test_a_body_that_is_no_event_is_refused(self, body: bytes, content_type: str) -> None:
        with pytest.raises(BadReceipt):
            push_of("submail").parse(request(body, content_type), KEY)

    @pytest.mark.parametrize("missing", ["events", "send_id", "address"])
    def test_a_signed_event_lacking_a_field_is_refused(self, missing: str) -> None:
        event = {k: v for k, v in self.EVENT.items() if k != missing}
        with pytest.raises(BadReceipt):
            push_of("submail").parse(request(urlencode(signed(event)).encode()), KEY)


class TestNxcloudDr:
    DR: ClassVar[dict[str, str]] = {
        "phone": "8613900000001",
        "messageid": "r1-0123456789abcdef0123456789abcdef",
        "status": "2",
        "result": "DELIVRD",
        "drtime": "2026-03-01 10:00:05",
        "sendtime": "2026-03-01 10:00:00",
        "size": "1",
        "price": "0.0310",
        "currency": "USD",
        "rate": "1",
        "ext": "",
    }

    def expected(self, **changes: object) -> Receipt:
        base = Receipt(
            "nxcloud",
            "8613900000001",
            True,
            "DELIVRD",
            beijing("2026-03-01 10:00:05"),
            provider_id=self.DR["messageid"],
            message_id=self.DR["messageid"],
        )
        return dataclasses.replace(base, **changes)

    def test_a_form_post(self) -> None:
        assert push_of("nxcloud").parse(request(urlencode(self.DR).encode()), None) == [self.expected()]

    def test_the_query_string_of_older_accounts(self) -> None:
        got = push_of("nxcloud").parse(request(method="GET", query=self.DR), None)
        assert got == [self.expected()]

    @pytest.mark.parametrize(("status", "result"), [("5", "UNDELIV"), ("6", "REJECTD"), ("7", "EXPIRED")])
    def test_any_status_but_2_is_undelivered(self, status: str, result: str) -> None:
        body = urlencode({**self.DR, "status": status, "result": result}).encode()
        assert push_of("nxcloud").parse(request(body), None) == [self.expected(delivered=False, code=result)]

    def test_a_dr_without_result_or_time(self) -> None:
        body = urlencode({"messageid": "m1", "status": "12"}).encode()
        (got,) = push_of("nxcloud").parse(request(body), None)
        assert (got.delivered, got.code, got.reported_at, got.phone, got.message_id) == (
            False,
            "status12",
            None,
            "",
            "m1",
        )

    @pytest.mark.parametrize("missing", ["messageid", "status"])
    def test_a_dr_lacking_its_id_or_status_is_refused(self, missing: str) -> None:
        body = urlencode({k: v for k, v in self.DR.items() if k != missing}).encode()
        with pytest.raises(BadReceipt):
            push_of("nxcloud").parse(request(body), None)
