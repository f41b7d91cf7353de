"""providers.submail at unit level: vectors C1-C4, requests, codes, per-recipient results."""

from __future__ import annotations

import urllib.parse

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batch import Batcher
from providers.base import Batch, Message, Outcome, RecipientOutcome, match_entries, summarize
from providers.submail import (
    CODE_CLASSES,
    CredentialsError,
    SubmailCredentials,
    SubmailError,
    SubmailSms,
    classify,
    parse_log,
    parse_timestamp,
    string_to_sign,
    submail_phone,
    submail_signature,
    submail_text,
    verify,
)

CREDS = SubmailCredentials("10001", "abcdef0123456789abcdef0123456789")
KEYS = "10001abcdef0123456789abcdef0123456789"
C_CONTENT = "【SUBMAIL】您的验证码是1234"
C1 = {
    "appid": "10001", "to": "13800000001,13800000002", "content": C_CONTENT, "timestamp": "1700000000",
    "sign_type": "md5", "sign_version": "2", "tag": "batch-42",
}  # fmt: skip
C4 = {
    "appid": "10001", "project": "ThJBE4", "timestamp": "1700000000", "sign_type": "md5", "sign_version": "2",
    "multi": '[{"to":"13800000001","vars":{"code":"1234"}},{"to":"13800000002","vars":{"code":"5678"}}]',
}  # fmt: skip


def _clock() -> float:
    return 1700000000.4


def _msgs(n: int, content: str | None = C_CONTENT, sign: str = "SUBMAIL") -> list[Message]:
    return [
        Message(i, f"k{i}", f"86138{i:08d}", {"code": f"{i:04d}"}, sign, content) for i in range(1, n + 1)
    ]


def _form(request: httpx.Request) -> dict[str, str]:
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    return dict(urllib.parse.parse_qsl(request.content.decode(), keep_blank_values=True, strict_parsing=True))


def _response(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, content=body if isinstance(body, bytes) else orjson.dumps(body))


class TestVectors:
    def test_c1_batchsend_md5_v2(self) -> None:
        assert string_to_sign(C1, "10001", CREDS.appkey, ("content",)) == (
            f"{KEYS}appid=10001&sign_type=md5&sign_version=2&timestamp=1700000000"
            f"&to=13800000001,13800000002{KEYS}"
        )
        assert submail_signature(C1, "10001", CREDS.appkey, "md5", ("content",)) == (
            "c933ae88697c93884bb7beaed86b14c6"
        )

    def test_c2_sha1(self) -> None:
        params = {**C1, "sign_type": "sha1"}
        assert submail_signature(params, "10001", CREDS.appkey, "sha1", ("content",)) == (
            "c5b2567b0f4f94e44a77f366c8bc93cdb41c6bb0"
        )

    def test_c3_without_sign_version_content_is_signed(self) -> None:
        params = {k: v for k, v in C1.items() if k != "sign_version"}
        assert f"&content={C_CONTENT}&" in string_to_sign(params, "10001", CREDS.appkey)
        assert submail_signature(params, "10001", CREDS.appkey, "md5") == "c41c516e99b8d0f985d67a927c7f167e"

    def test_c4_multixsend(self) -> None:
        assert string_to_sign(C4, "10001", CREDS.appkey, ("multi", "content")) == (
            f"{KEYS}appid=10001&project=ThJBE4&sign_type=md5&sign_version=2&timestamp=1700000000{KEYS}"
        )
        assert submail_signature(C4, "10001", CREDS.appkey, "md5", ("multi", "content")) == (
            "3011644d5c52f8c5fd724874af512037"
        )

    @pytest.mark.parametrize(
        ("sign_type", "sign_version", "digest"),
        [
            ("md5", 2, "c933ae88697c93884bb7beaed86b14c6"),
            ("sha1", 2, "c5b2567b0f4f94e44a77f366c8bc93cdb41c6bb0"),
            ("md5", None, "c41c516e99b8d0f985d67a927c7f167e"),
        ],
    )
    def test_c1_c2_c3_through_build_request(
        self, sign_type: str, sign_version: int | None, digest: str
    ) -> None:
        p = SubmailSms(
            credentials=CREDS,
            sign_type="sha1" if sign_type == "sha1" else "md5",
            sign_version=2 if sign_version else None,
            clock=_clock,
        )
        form = _form(p.build_request(Batch(1, _msgs(2), out_id="batch-42")))
        assert form["signature"] == digest
        assert form["to"] == "13800000001,13800000002" and form["content"] == C_CONTENT
        assert form["tag"] == "batch-42" and form["timestamp"] == "1700000000"

    def test_c4_through_build_request(self) -> None:
        p = SubmailSms(credentials=CREDS, mode="multixsend", project="ThJBE4", clock=_clock)
        msgs = _msgs(2)
        msgs[0].params, msgs[1].params = {"code": "1234"}, {"code": "5678"}
        form = _form(p.build_request(Batch(1, msgs)))
        assert form["signature"] == "3011644d5c52f8c5fd724874af512037"
        assert form["multi"] == C4["multi"] and "tag" not in form


class TestRequests:
    @pytest.mark.parametrize("mode", ["batchsend", "multisend", "multixsend"])
    @pytest.mark.parametrize("sign_type", ["md5", "sha1"])
    def test_round_trip_verifies(self, mode: str, sign_type: str) -> None:
        p = SubmailSms(
            credentials=CREDS,
            mode="batchsend" if mode == "batchsend" else "multisend" if mode == "multisend" else "multixsend",
            content="【Acme】Hi @var(name) & co + 100% *~" if mode == "multisend" else None,
            project="ThJBE4" if mode == "multixsend" else None,
            sign_type="sha1" if sign_type == "sha1" else "md5",
        )
        msgs = [Message(1, "a", "8613800000001", {"name": "张三 & +"}, "Acme", "text & more + 50%")]
        msgs.append(Message(2, "b", "8613900000002", {"name": "O'Neil=1"}, "Acme", "text & more + 50%"))
        r = p.build_request(Batch(1, msgs, out_id="run-1-1"))
        assert r.method == "POST" and str(r.url) == f"https://api-v4.mysubmail.com/sms/{mode}"
        form = _form(r)
        assert verify(f"sms/{mode}", form, CREDS)
        assert not verify(f"sms/{mode}", form, SubmailCredentials("10001", "other"))
        assert form["sign_type"] == sign_type and form["sign_version"] == "2"
        if mode == "batchsend":
            assert form["content"] == "【Acme】text & more + 50%"
            assert not verify(mode, {**form, "to": form["to"] + ",13800000003"}, CREDS)
        else:
            assert orjson.loads(form["multi"]) == [
                {"to": "13800000001", "vars": {"name": "张三 & +"}},
                {"to": "13900000002", "vars": {"name": "O'Neil=1"}},
            ]
            # multi is unsigned with sign_version=2: changing it keeps the signature valid
            assert verify(f"sms/{mode}", {**form, "multi": "[]"}, CREDS)

    def test_json_body_has_only_string_values(self) -> None:
        p = SubmailSms(credentials=CREDS, mode="multixsend", project="P1", body_format="json", clock=_clock)
        r = p.build_request(Batch(1, _msgs(2), out_id="o-1"))
        assert r.headers["content-type"] == "application/json"
        body = orjson.loads(r.content)
        assert all(isinstance(v, str) for v in body.values())
        assert verify("sms/multixsend", body, CREDS) and body["tag"] == "o-1"

    def test_normal_mode_sends_the_key_and_no_timestamp(self) -> None:
        p = SubmailSms(credentials=CREDS, sign_type="normal")
        form = _form(p.build_request(Batch(1, _msgs(1))))
        assert form["signature"] == CREDS.appkey
        assert "timestamp" not in form and "sign_type" not in form and not p.requires_server_time
        assert verify("sms/batchsend", form, CREDS)

    def test_tag_is_truncated_to_32_and_unsigned(self) -> None:
        p = SubmailSms(credentials=CREDS, clock=_clock)
        form = _form(p.build_request(Batch(1, _msgs(1), out_id="x" * 40)))
        assert form["tag"] == "x" * 32
        assert verify("sms/batchsend", {**form, "tag": "changed"}, CREDS)

    def test_phones_and_sign_prefix(self) -> None:
        assert submail_phone("8613800000001") == "13800000001"
        assert submail_phone("85212345678") == "+85212345678"
        assert submail_text("Acme", "hello") == "【Acme】hello"
        assert submail_text("【Acme】", "hello") == "【Acme】hello"
        assert submail_text("Acme", "【Other】hello") == "【Other】hello"
        assert submail_text("", "hello") == "hello"

    def test_multisend_without_a_signature_in_the_template(self) -> None:
        p = SubmailSms(credentials=CREDS, mode="multisend", content="Hi @var(code)", clock=_clock)
        assert p.batch_key(_msgs(1, sign="A")[0]) != p.batch_key(_msgs(1, sign="B")[0])
        form = _form(p.build_request(Batch(1, _msgs(1, sign="A"))))
        assert form["content"] == "【A】Hi @var(code)"
        signed = SubmailSms(credentials=CREDS, mode="multisend", content="【X】Hi @var(code)")
        assert signed.batch_key(_msgs(1, sign="A")[0]) == signed.batch_key(_msgs(1, sign="B")[0])

    def test_a_batch_that_cannot_share_a_request_is_refused(self) -> None:
        msgs = _msgs(2)
        msgs[1].content = "【SUBMAIL】other"
        with pytest.raises(ValueError, match="one text"):
            SubmailSms(credentials=CREDS).build_request(Batch(1, msgs))
        p = SubmailSms(credentials=CREDS, mode="multisend", content="Hi @var(code)")
        with pytest.raises(ValueError, match="one signature"):
            p.build_request(Batch(1, [*_msgs(1, sign="A"), *_msgs(1, sign="B")]))

    def test_batchsend_needs_content(self) -> None:
        p = SubmailSms(credentials=CREDS)
        with pytest.raises(ValueError, match="content"):
            p.build_request(Batch(1, _msgs(1, content=None)))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"mode": "multisend"},
            {"mode": "multixsend"},
            {"mode": "batchsend", "content": "x"},
            {"mode": "batchsend", "project": "p"},
            {"mode": "batchsend", "batch_size": 10_001},
            {"mode": "batchsend", "batch_size": 0},
            {"mode": "batchsend", "endpoint": "ftp://x"},
            {"mode": "batchsend", "sms_signature": "【A】"},
            {"mode": "send"},
        ],
    )
    def test_bad_configuration(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            SubmailSms(credentials=CREDS, **kwargs)  # type: ignore[arg-type]

    def test_batch_size_and_endpoint(self) -> None:
        p = SubmailSms(credentials=CREDS, batch_size=10_000, endpoint="http://127.0.0.1:8080/")
        assert p.max_batch_size == 10_000
        assert str(p.build_request(Batch(1, _msgs(1))).url) == "http://127.0.0.1:8080/sms/batchsend"
        assert SubmailSms(credentials=CREDS).max_batch_size == 200

    def test_configurable_v2_exclusions(self) -> None:
        p = SubmailSms(credentials=CREDS, mode="multixsend", project="P", v2_excluded=(), clock=_clock)
        form = _form(p.build_request(Batch(1, _msgs(1))))
        assert form["signature"] == submail_signature(form, "10001", CREDS.appkey, "md5")  # multi signed

    @pytest.mark.anyio
    async def test_sent_through_an_httpx_client(self) -> None:
        seen: list[bool] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(verify(request.url.path, _form(request), CREDS))
            return httpx.Response(200, json=[{"status": "success", "send_id": "s1", "fee": 1}])

        p = SubmailSms(credentials=CREDS, mode="multixsend", project="P")
        batch = Batch(1, _msgs(1), out_id="o")
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            response = await client.send(p.build_request(batch))
        outcome = p.parse_response(batch, response)
        assert seen == [True] and outcome.outcome is Outcome.SENT
        assert outcome.recipients == [RecipientOutcome(Outcome.SENT, provider_id="s1", fee=1)]


class TestBatching:
    def test_batchsend_groups_by_the_text_sent(self) -> None:
        p = SubmailSms(credentials=CREDS, batch_size=3)
        msgs = [Message(i, str(i), f"86138{i:08d}", {}, "Acme", "A" if i % 2 else "B") for i in range(1, 8)]
        msgs.append(Message(8, "8", "8613800000008", {}, "Other", "A"))  # same content, other signature
        batcher = Batcher(p.max_batch_size, p.batch_key)
        batches = batcher.add(msgs) + batcher.drain()
        texts = sorted((_form(p.build_request(b))["content"], len(b.messages)) for b in batches)
        assert texts == [("【Acme】A", 1), ("【Acme】A", 3), ("【Acme】B", 3), ("【Other】A", 1)]

    def test_multi_modes_share_requests(self) -> None:
        p = SubmailSms(credentials=CREDS, mode="multixsend", project="P")
        keys = {p.batch_key(m) for m in _msgs(5)}
        assert len(keys) == 1


class TestTimestamp:
    def test_offset_is_applied(self) -> None:
        now = [1000.0]
        p = SubmailSms(credentials=CREDS, clock=lambda: now[0])
        assert p.requires_server_time and p.server_offset is None and p.timestamp() == "1000"
        p.set_server_offset(1700000000.0, 1000.0)
        assert p.server_offset == 1699999000.0 and p.offset_measured_at == 1000.0
        now[0] = 1003.7
        form = _form(p.build_request(Batch(1, _msgs(2), out_id="batch-42")))
        assert form["timestamp"] == "1700000003"
        assert form["signature"] == submail_signature(form, "10001", CREDS.appkey, "md5", ("content",))
        with pytest.raises(ValueError):
            p.set_server_offset(float("nan"), 1.0)

    def test_timestamp_request_and_parse(self) -> None:
        p = SubmailSms(credentials=CREDS)
        r = p.timestamp_request()
        assert r.method == "GET" and str(r.url) == "https://api-v4.mysubmail.com/service/timestamp"

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"timestamp": 1414253462})

        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            assert parse_timestamp(client.send(r)) == 1414253462.0

    @pytest.mark.parametrize(
        "body", [b"", b"{}", b'{"timestamp":"x"}', b'{"timestamp":true}', b"[1]", b'{"timestamp":-1}']
    )
    def test_bad_timestamp_raises_submail_error(self, body: bytes) -> None:
        with pytest.raises(SubmailError):
            parse_timestamp(_response(200, body))


DOCUMENTED = {
    Outcome.FAILED: ["114", "253", "251", "252", "408", "405"],
    Outcome.FATAL: [
        "101", "102", "103", "104", "105", "106", "107", "110", "108", "109", "111", "113", "119",
        "901", "903", "904", "905",
        "116", "117", "118", "120", "305", "306", "406", "407", "307", "310",
        "401", "402", "403", "404", "411", "412", "413", "414", "415", "416", "417", "418", "419",
        "410", "420", "422",
    ],
    Outcome.RETRY: ["151", "152"],
    Outcome.DEFER: ["115", "409"],
}  # fmt: skip


class TestCodeClasses:
    @pytest.mark.parametrize("outcome", list(DOCUMENTED), ids=lambda o: o.value)
    def test_every_documented_code_is_classified(self, outcome: Outcome) -> None:
        for code in DOCUMENTED[outcome]:
            assert CODE_CLASSES[code] is outcome, code
            assert classify(code, 400) is outcome and classify(code, 500) is outcome

    def test_no_code_left_out(self) -> None:
        assert set(CODE_CLASSES) == {c for codes in DOCUMENTED.values() for c in codes}

    @pytest.mark.parametrize(
        ("code", "status", "outcome"),
        [("999", 200, Outcome.FATAL), ("999", 400, Outcome.FATAL), ("999", 503, Outcome.UNKNOWN),
         ("999", 429, Outcome.THROTTLED), (None, 400, Outcome.FATAL), (None, 500, Outcome.UNKNOWN)],
    )  # fmt: skip
    def test_unknown_codes(self, code: str | None, status: int, outcome: Outcome) -> None:
        assert classify(code, status) is outcome


class TestResponses:
    p = SubmailSms(credentials=CREDS)
    multi = SubmailSms(credentials=CREDS, mode="multixsend", project="P")
    batch = Batch(1, _msgs(3))

    def test_batchsend_success_matched_by_to(self) -> None:
        body = {
            "status": "success", "batchlist": "B1", "total_fee": 3,
            "responses": [
                {"status": "success", "to": "13800000003", "send_id": "s3", "fee": 1},
                {"status": "success", "to": "13800000001", "send_id": "s1", "fee": 2},
                {"status": "success", "to": "13800000002", "send_id": "s2", "fee": 0},
            ],
        }  # fmt: skip
        r = self.p.parse_response(self.batch, _response(200, body))
        assert r.outcome is Outcome.SENT and r.provider_id == "B1" and r.extra == {"total_fee": 3}
        assert r.recipients is not None
        assert [(x.outcome, x.provider_id, x.fee) for x in r.recipients] == [
            (Outcome.SENT, "s1", 2), (Outcome.SENT, "s2", 0), (Outcome.SENT, "s3", 1)
        ]  # fmt: skip

    def test_batchsend_partial_with_an_error_entry_without_to(self) -> None:
        body = {
            "status": "success", "batchlist": "B1",
            "responses": [
                {"status": "success", "to": "13800000001", "send_id": "s1", "fee": 1},
                {"status": "error", "code": 114, "msg": "blocked"},
                {"status": "success", "to": "13800000003", "send_id": "s3", "fee": 1},
            ],
        }  # fmt: skip
        r = self.p.parse_response(self.batch, _response(200, body))
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [(x.outcome, x.code) for x in r.recipients] == [
            (Outcome.SENT, None), (Outcome.FAILED, "114"), (Outcome.SENT, None)
        ]  # fmt: skip

    def test_multi_array_matched_by_position(self) -> None:
        body = [
            {"status": "error", "code": "253", "msg": "unsubscribed"},
            {"status": "success", "send_id": "s2", "fee": 1},
            {"status": "error", "code": 115, "msg": "too often"},
        ]
        r = self.multi.parse_response(self.batch, _response(200, body))
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [(x.outcome, x.code, x.provider_id) for x in r.recipients] == [
            (Outcome.FAILED, "253", None), (Outcome.SENT, None, "s2"), (Outcome.DEFER, "115", None)
        ]  # fmt: skip

    def test_short_array_leaves_the_unmatched_unknown(self) -> None:
        body = [{"status": "success", "to": "13800000002", "send_id": "s2"}, {"status": "error", "code": 114}]
        r = self.multi.parse_response(self.batch, _response(200, body))
        assert r.recipients is not None
        assert [(x.outcome, x.code) for x in r.recipients] == [
            (Outcome.UNKNOWN, "NoResult"), (Outcome.SENT, None), (Outcome.UNKNOWN, "NoResult")
        ]  # fmt: skip
        assert r.outcome is Outcome.SENT

    def test_all_failed_and_all_refused(self) -> None:
        failed = [{"status": "error", "code": 114}, {"status": "error", "code": 252}, {"status": "error"}]
        r = self.multi.parse_response(self.batch, _response(200, failed))
        assert r.outcome is Outcome.DEFER  # the code-less error is a refusal we do not understand
        failed[2] = {"status": "error", "code": "405"}
        r = self.multi.parse_response(self.batch, _response(200, failed))
        assert r.outcome is Outcome.FAILED and r.recipients is not None
        stale = [{"status": "error", "code": "152"}] * 3
        r = self.multi.parse_response(self.batch, _response(200, stale))
        assert r.outcome is Outcome.RETRY and r.recipients is None and r.code == "152"

    def test_mixed_sent_and_balance_keeps_the_sent(self) -> None:
        body = [{"status": "success", "send_id": "s1"}, {"status": "error", "code": 903}]
        body.append({"status": "error", "code": 903})
        r = self.multi.parse_response(self.batch, _response(200, body))
        assert r.outcome is Outcome.SENT and r.recipients is not None
        assert [x.outcome for x in r.recipients] == [Outcome.SENT, Outcome.FATAL, Outcome.FATAL]

    @pytest.mark.parametrize(
        ("status", "code", "outcome"),
        [
            (400, "108", Outcome.FATAL),
            (400, "152", Outcome.RETRY),
            (200, 151, Outcome.RETRY),
            (400, "903", Outcome.FATAL),
            (400, "409", Outcome.DEFER),
            (400, "115", Outcome.SPLIT),  # 3 recipients: split (test_split.py)
            (400, "420", Outcome.FATAL),
            (400, "999", Outcome.FATAL),
            (500, "999", Outcome.UNKNOWN),
            (429, "999", Outcome.THROTTLED),
        ],
    )
    def test_whole_request_errors(self, status: int, code: str | int, outcome: Outcome) -> None:
        r = self.p.parse_response(
            self.batch, _response(status, {"status": "error", "code": code, "msg": "m"})
        )
        assert r.outcome is outcome and r.code == str(code) and r.message == "m" and r.recipients is None

    def test_whole_request_recipient_code(self) -> None:
        body = {"status": "error", "code": "252", "msg": "bad address"}
        assert self.p.parse_response(self.batch, _response(400, body)).outcome is Outcome.SPLIT
        one = Batch(2, _msgs(1))
        assert self.p.parse_response(one, _response(400, body)).outcome is Outcome.FAILED

    def test_success_without_responses_and_contradictions(self) -> None:
        r = self.p.parse_response(self.batch, _response(200, {"status": "success", "batchlist": "B"}))
        assert r.outcome is Outcome.SENT and r.provider_id == "B" and r.recipients is None
        r = self.p.parse_response(self.batch, _response(500, {"status": "success"}))
        assert r.outcome is Outcome.UNKNOWN

    @pytest.mark.parametrize(
        ("status", "body", "outcome"),
        [
            (200, b"", Outcome.UNKNOWN),
            (200, b"[]", Outcome.UNKNOWN),
            (200, b'{"status":"succ', Outcome.UNKNOWN),
            (200, b"<html>ok</html>", Outcome.UNKNOWN),
            (502, b"<html>bad gateway</html>", Outcome.UNKNOWN),
            (500, b"", Outcome.UNKNOWN),
            (403, b"<html>forbidden</html>", Outcome.FATAL),
            (404, b'{"status":"weird"}', Outcome.FATAL),
            (429, b"slow down", Outcome.THROTTLED),
        ],
    )
    def test_unreadable_bodies(self, status: int, body: bytes, outcome: Outcome) -> None:
        r = self.p.parse_response(self.batch, _response(status, body))
        assert r.outcome is outcome and r.code == f"HTTP{status}"

    @given(st.binary(max_size=200), st.sampled_from([200, 400, 429, 500]))
    def test_garbage_bytes_never_raise(self, body: bytes, status: int) -> None:
        for p in (self.p, self.multi):
            assert isinstance(p.parse_response(self.batch, _response(status, body)).outcome, Outcome)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False)
            | st.text(max_size=5)
            | st.sampled_from(["success", "error", "13800000001", "114", "152"]),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["status", "code", "to", "send_id", "fee", "responses", "batchlist", "msg"]),
                inner,
                max_size=5,
            ),
            max_leaves=20,
        ),
        st.sampled_from([200, 400, 500]),
    )  # fmt: skip
    def test_garbage_json_never_raises(self, body: object, status: int) -> None:
        raw = orjson.dumps(body)
        for p in (self.p, self.multi):
            r = p.parse_response(self.batch, _response(status, raw))
            assert r.recipients is None or len(r.recipients) == 3


class TestHelpers:
    def test_match_entries(self) -> None:
        def key_of(entry: object) -> list[str]:
            return [entry["to"]] if isinstance(entry, dict) and "to" in entry else []

        a, b, c = {"to": "a"}, {"to": "b"}, {"x": 1}
        assert match_entries([b, a], ["a", "b"], key_of) == [a, b]
        assert match_entries([a, c], ["a", "b"], key_of) == [a, c]  # position fallback
        assert match_entries([c], ["a", "b"], key_of) == [None, None]  # no position when lengths differ
        assert match_entries([a, a], ["a", "a"], key_of) == [a, a]  # duplicate numbers
        assert match_entries([{"to": "zz"}, b], ["a", "b"], key_of) == [{"to": "zz"}, b]

    def test_summarize(self) -> None:
        sent, failed = RecipientOutcome(Outcome.SENT), RecipientOutcome(Outcome.FAILED, "114")
        throttled, fatal = RecipientOutcome(Outcome.THROTTLED, "x"), RecipientOutcome(Outcome.FATAL, "903")
        assert summarize([sent, failed]).outcome is Outcome.SENT
        assert summarize([failed, failed]).outcome is Outcome.FAILED
        assert summarize([failed, throttled]).outcome is Outcome.DEFER
        assert summarize([throttled, fatal]).outcome is Outcome.FATAL
        only = summarize([throttled, throttled], retry_after=2.0)
        assert only.outcome is Outcome.THROTTLED and only.recipients is None and only.retry_after == 2.0
        assert summarize([RecipientOutcome(Outcome.UNKNOWN), failed]).outcome is Outcome.UNKNOWN


class TestLog:
    def test_log_request_is_signed_with_filters(self) -> None:
        p = SubmailSms(credentials=CREDS, clock=_clock)
        r = p.log_request(to="8613800000001", sendlist="B1", start_date=1700000000, rows=100, offset=0)
        assert str(r.url) == "https://api-v4.mysubmail.com/sms/log"
        form = _form(r)
        assert form["to"] == "13800000001" and form["sendlist"] == "B1" and form["rows"] == "100"
        assert form["offset"] == "0" and form["start_date"] == "1700000000" and "sign_version" not in form
        assert verify("sms/log", form, CREDS)

    def test_parse_log(self) -> None:
        rows = [{"sendID": "s1", "to": "138", "status": "delivered", "report_state": "DELIVRD"}, 5]
        body = {"status": "success", "total": 1, "offset": 0, "results": 50, "data": rows}
        assert parse_log(_response(200, body)) == [rows[0]]
        assert parse_log(_response(200, {"status": "success"})) == []

    @pytest.mark.parametrize(
        "response",
        [
            _response(400, {"status": "error", "code": "108", "msg": "bad signature"}),
            _response(200, b"<html/>"),
            _response(500, b""),
            _response(200, {"status": "success", "data": "nope"}),
            _response(500, {"status": "success", "data": []}),
        ],
    )
    def test_failed_log_raises_instead_of_returning_nothing(self, response: httpx.Response) -> None:
        with pytest.raises(SubmailError):
            parse_log(response)


class TestCredentials:
    def test_repr_hides_the_key(self) -> None:
        c = SubmailCredentials("10001", "s3cr3t-value")
        assert "s3cr3t-value" not in repr(c) and "s3cr3t-value" not in str(c) and "10001" in repr(c)

    def test_from_env_names_the_missing_variable(self) -> None:
        with pytest.raises(CredentialsError, match="SUBMAIL_APPKEY") as info:
            SubmailCredentials.from_env({"SUBMAIL_APPID": "visible-id", "SUBMAIL_APPKEY": "  "})
        assert "visible-id" not in str(info.value)
        with pytest.raises(CredentialsError, match="SUBMAIL_APPID and SUBMAIL_APPKEY"):
            SubmailCredentials.from_env({})
        assert SubmailCredentials.from_env({"SUBMAIL_APPID": "a", "SUBMAIL_APPKEY": "b"}) == (
            SubmailCredentials("a", "b")
        )


@given(
    st.lists(
        st.fixed_dictionaries({"name": st.text(st.characters(exclude_categories=("Cs",)), max_size=6)}),
        min_size=1,
        max_size=5,
    )
)
def test_form_body_is_urlencode_with_quote(vars_: list[dict[str, str]]) -> None:
    """The form body (encoded a value at a time in C) is byte for byte urllib's
    ``urlencode(params, quote_via=quote)``, for any text in the vars (Chinese names...)."""
    sender = SubmailSms(
        credentials=SubmailCredentials("10001", "key"), mode="multixsend", project="p1", sign_type="normal"
    )
    batch = Batch(1, [Message(i, str(i), f"861380000{i:04d}", v, "Acme") for i, v in enumerate(vars_)], "t1")
    expected = urllib.parse.urlencode(sender.params(batch), quote_via=urllib.parse.quote).encode()
    assert sender.build_request(batch).content == expected
