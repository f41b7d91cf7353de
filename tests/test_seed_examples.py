"""Every example response of the four seed pages, parsed by its provider module to the documented outcome.

The fixtures are exact copies (tests/fixtures/seeds/README.md names each one's seed file and
section). Where a page masks a number (``1390000****``, ``138xxxxxx``) the test fills the mask
with the batch's own numbers, in order, since a masked number can match no recipient.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson
import pytest

from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.aliyun_card import AliyunCardSms
from providers.base import Batch, BatchOutcome, Message, Outcome, Provider
from providers.nxcloud import NxcloudCredentials, NxcloudSms
from providers.submail import SubmailCredentials, SubmailSms
from tests.conftest import SHARED

FIXTURES = Path(__file__).parent / "fixtures" / "seeds"
SEEDS = SHARED / "seeds"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def without_comments(text: bytes) -> bytes:
    """The SUBMAIL page annotates its JSON with ``//`` comments (never inside its strings)."""
    return re.sub(rb"\s*//[^\n]*", b"", text)


def fill_masks(text: bytes, pattern: bytes, numbers: list[str]) -> bytes:
    """Each masked number (``pattern``), in order, replaced by the next of ``numbers``."""
    it = iter(numbers)
    return re.sub(pattern, lambda _: next(it).encode(), text)


def parse(provider: Provider, batch: Batch, body: bytes, status: int = 200) -> BatchOutcome:
    """The body as a response from the provider's endpoint, through an httpx client."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with httpx.Client(transport=transport) as client:
        response = client.send(provider.build_request(batch))
    return provider.parse_response(batch, response)


def per_recipient(result: BatchOutcome, n: int) -> list[tuple[Outcome, str | None, str | None]]:
    """(outcome, code, message) of each recipient, whether given per recipient or for the batch."""
    if result.recipients is None:
        return [(result.outcome, result.code, None)] * n
    return [(r.outcome, r.code, r.message) for r in result.recipients]


def test_every_fixture_is_in_its_seed() -> None:
    """The fixtures are copies, not paraphrases: each one's text occurs in its seed file."""
    if not SEEDS.is_dir():
        pytest.skip("the seeds are not next to this checkout")
    names = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".json", ".jsonc"))
    assert len(names) == 7
    for name in names:
        seed = next(SEEDS.glob(name[:3] + "_*.txt")).read_text()
        assert fixture(name).decode().strip() in seed, name


# -- NXCloud: seeds/003, /v1/sms/multi/mt ----------------------------------------------------------
NX_CREDS = NxcloudCredentials("fme2na3kdi3ki", "abciiiko2k3", "appKey")


def nx_batch() -> tuple[NxcloudSms, Batch]:
    """The seed's request example: two items with sysMessageId msg001 and msg002."""
    provider = NxcloudSms(credentials=NX_CREDS, id_for=lambda tag, key: key)
    msgs = [
        Message(1, "msg001", "8618651883168", {}, "", "content1"),
        Message(2, "msg002", "8618651883279", {}, "", "content2"),
    ]
    return provider, Batch(1, msgs)


class TestNxcloud:
    def test_success(self) -> None:  # 成功示例
        provider, batch = nx_batch()
        r = parse(provider, batch, fixture("003_nxcloud_success.json"))
        assert r.outcome is Outcome.SENT and r.code == "0"
        assert per_recipient(r, 2) == [(Outcome.SENT, "0", None)] * 2

    def test_partial_failure(self) -> None:  # 部分失败示例
        provider, batch = nx_batch()
        r = parse(provider, batch, fixture("003_nxcloud_partial_failure.json"))
        assert r.recipients is not None
        assert per_recipient(r, 2) == [
            (Outcome.SENT, None, None),
            (Outcome.FAILED, "Failure", "Incorrect phone number format"),
        ]
        assert [x.provider_id for x in r.recipients] == ["msg001", "msg002"]

    def test_every_item_failure(self) -> None:  # the partial-failure example with both items Failure
        provider, batch = nx_batch()
        body = fixture("003_nxcloud_partial_failure.json")
        body = body.replace(b'"status": "Success"', b'"status": "Failure",\n"message": "Blacklisted"')
        r = parse(provider, batch, body)
        assert r.outcome is Outcome.FAILED
        assert per_recipient(r, 2) == [
            (Outcome.FAILED, "Failure", "Blacklisted"),
            (Outcome.FAILED, "Failure", "Incorrect phone number format"),
        ]

    @pytest.mark.parametrize(
        ("name", "code", "message"),
        [
            ("003_nxcloud_parameter_error.json", "9000", "Request parameter error"),  # 参数错误示例
            ("003_nxcloud_app_error.json", "13002", "Unavailable app or incorrect key"),  # 应用错误示例
        ],
    )
    def test_whole_request_errors_stop_the_run(self, name: str, code: str, message: str) -> None:
        provider, batch = nx_batch()
        r = parse(provider, batch, fixture(name))
        assert (r.outcome, r.code, r.message, r.recipients) == (Outcome.FATAL, code, message, None)


# -- Aliyun SendBatchCardSms: seeds/000 ------------------------------------------------------------
class TestAliyunCard:
    def provider(self) -> AliyunCardSms:
        return AliyunCardSms(
            credentials=TEST_CREDENTIALS,
            card_template_code="CARD_SMS_3**5",
            fallback_type="SMS",
            sms_template_code="SMS_23425****",
        )

    def batch(self) -> Batch:
        return Batch(1, [Message(i, f"k{i}", f"86139000{i:05d}", {}, "阿里云") for i in (1, 2)])

    def test_normal_response(self) -> None:  # 正常返回示例
        """``MediaMobiles`` got the card (``BizCardId``), ``NotMediaMobiles`` the fallback (``BizSmsId``)."""
        body = fill_masks(
            fixture("000_aliyun_card_normal.json"), rb"1390000\*\*\*\*", ["13900000001", "13900000002"]
        )
        r = parse(self.provider(), self.batch(), body)
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [(x.outcome, x.provider_id) for x in r.recipients] == [
            (Outcome.SENT, "card:123"),
            (Outcome.SENT, "sms:3256"),
        ]

    def test_masked_numbers_are_never_sent(self) -> None:
        """As printed (masked), the lists name no recipient of the batch: none is recorded sent."""
        r = parse(self.provider(), self.batch(), fixture("000_aliyun_card_normal.json"))
        assert Outcome.SENT not in {o for o, _, _ in per_recipient(r, 2)}

    def test_error_table_forbidden_action(self) -> None:  # 错误码: 200 ForbiddenAction
        body = orjson.dumps(
            {
                "Code": "ForbiddenAction",
                "Message": "Access to the account is denied. Please contact the administrator.",
                "RequestId": "A90E4451-FED7-49D2-87C8-00700A8C4D0D",
            }
        )
        r = parse(self.provider(), self.batch(), body)
        assert (r.outcome, r.code, r.recipients) == (Outcome.FATAL, "ForbiddenAction", None)


# -- Aliyun SendBatchSms: seeds/001 (output parameters only) ---------------------------------------
def test_aliyun_batch_output_parameters() -> None:
    """出参列表's sample values: RequestId 8906582E-6722, Code OK, Message 请求成功, BizId 134523^4351232"""
    body = orjson.dumps(
        {"RequestId": "8906582E-6722", "Code": "OK", "Message": "请求成功", "BizId": "134523^4351232"}
    )
    provider = AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_0000")
    batch = Batch(1, [Message(i, f"k{i}", f"861500000000{i}", {"code": "1234"}, "云通信") for i in (0, 1)])
    r = parse(provider, batch, body)
    assert (r.outcome, r.code, r.provider_id, r.recipients) == (Outcome.SENT, "OK", "134523^4351232", None)


# -- SUBMAIL sms/batchsend: seeds/002 --------------------------------------------------------------
class TestSubmail:
    def provider(self) -> SubmailSms:
        creds = SubmailCredentials("10001", "abcdef0123456789abcdef0123456789")
        return SubmailSms(credentials=creds, mode="batchsend")

    def batch(self) -> Batch:
        text = "【SUBMAIL】您的验证码是4438"
        numbers = ("8613800000001", "8613900000002")
        return Batch(1, [Message(i, f"k{i}", n, {}, "SUBMAIL", text) for i, n in enumerate(numbers, 1)])

    def test_response(self) -> None:  # 代码示例 › 响应
        body = without_comments(fixture("002_submail_success.jsonc"))
        body = fill_masks(body, rb"13[89]xxxxxx", ["13800000001", "13900000002"])
        r = parse(self.provider(), self.batch(), body)
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [(x.outcome, x.provider_id, x.fee) for x in r.recipients] == [
            (Outcome.SENT, "007cb85168d1450e7aca462462ef12b8", 1),
            (Outcome.SENT, "de4e69f475d24aad62948ac601e1c0ac", 1),
        ]

    def test_request_failed(self) -> None:  # 代码示例 › 请求失败
        """A request-level error: nothing was sent, and no recipient is at fault."""
        r = parse(self.provider(), self.batch(), fixture("002_submail_request_failed.json"))
        assert r.recipients is None and r.code == "1xx" and r.message == "error message"
        assert r.outcome not in (Outcome.SENT, Outcome.FAILED)
