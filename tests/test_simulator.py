"""The simulator over real loopback sockets, with httpx as the client."""

from __future__ import annotations

import base64
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials, AliyunSms, percent_encode, rpc_signature
from providers.base import Batch, Message
from providers.simulator import FAULT_KINDS, Simulator, SimulatorConfig, default_credentials, serve
from providers.simulator.core import FaultPlan, NonceCache
from providers.simulator.server import parse_urlencoded, unquote_form
from tests.conftest import REPO, SHARED

CAPTURES = sorted((SHARED / "captures").glob("*.json"))
GATEWAY_KEYS = {"RequestId", "HostId", "Code", "Message", "Recommend"}
TRANSPORT_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """Both loops: the CLI serves on uvloop, tests and embedders usually on asyncio's own."""
    return request.param  # type: ignore[no-any-return]


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def batch(n: int, *, out_id: str = "out-1", first: int = 1, sign: str = "Acme") -> Batch:
    msgs = [Message(i, f"k{i}", f"86139{i:08d}", {"code": f"{i:06d}"}, sign) for i in range(first, first + n)]
    return Batch(1, msgs, out_id=out_id)


def provider(sim: Simulator, signature: str = "v3", **kw: Any) -> AliyunSms:
    return AliyunSms(
        credentials=kw.pop("credentials", TEST_CREDENTIALS),
        template_code="SMS_154950909",
        endpoint=sim.base_url,
        signature="v2" if signature == "v2" else "v3",
        **kw,
    )


def signed_v2(sim: Simulator, params: dict[str, str], secret: str = "testsecret") -> httpx.Request:
    """A GET with every parameter in the query, RPC V2 signed (for hand-made parameter sets)."""
    params = {
        "Version": "2017-05-25", "Format": "JSON", "AccessKeyId": "testid", "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0", "SignatureNonce": os.urandom(16).hex(),
        "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **params,
    }
    params["Signature"] = rpc_signature("GET", params, secret)
    qs = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in params.items())
    return httpx.Request("GET", f"{sim.base_url}/?{qs}")


def send_params(n: int, **overrides: str) -> dict[str, str]:
    params = {
        "Action": "SendBatchSms",
        "TemplateCode": "SMS_154950909",
        "PhoneNumberJson": orjson.dumps([f"139{i:08d}" for i in range(n)]).decode(),
        "SignNameJson": orjson.dumps(["Acme"] * n).decode(),
        "TemplateParamJson": orjson.dumps([{"code": "1"}] * n).decode(),
    }
    params.update(overrides)
    return params


def receipts(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@asynccontextmanager
async def running(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    kw.setdefault("credentials", (TEST_CREDENTIALS,))
    kw.setdefault("receipts", tmp_path / "receipts.jsonl")
    async with serve(SimulatorConfig(**kw)) as sim, httpx.AsyncClient(timeout=10) as client:
        yield sim, client


@pytest.mark.anyio
class TestSend:
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_success_records_each_recipient(self, tmp_path: Path, signature: str) -> None:
        async with running(tmp_path) as (sim, client):
            r = await client.send(provider(sim, signature).build_request(batch(3, out_id="o-7")))
            data = r.json()
            assert r.status_code == 200 and data["Code"] == "OK" and data["Message"] == "OK"
            assert data["BizId"].endswith("^0") and data["BizId"][:-2].isdigit() and data["RequestId"]
            assert sim.stats()["accepted_recipients"] == 3 and sim.accepted == 3
        lines = receipts(tmp_path / "receipts.jsonl")
        assert [x["phone"] for x in lines] == ["13900000001", "13900000002", "13900000003"]
        for x in lines:
            assert set(x) == {"phone", "out_id", "biz_id", "template", "sign", "t"}
            assert (x["out_id"], x["biz_id"], x["template"], x["sign"]) == (
                "o-7", data["BizId"], "SMS_154950909", "Acme")
            assert abs(x["t"] - time.time()) < 60

    async def test_per_recipient_sign_names(self, tmp_path: Path) -> None:
        b = batch(2)
        b.messages[1].sign_name = 'Sign "two"'
        async with running(tmp_path) as (sim, client):
            r = await client.send(provider(sim).build_request(b))
            assert r.json()["Code"] == "OK"
        assert [x["sign"] for x in receipts(tmp_path / "receipts.jsonl")] == ["Acme", 'Sign "two"']

    async def test_100_numbers_accepted_101_rejected(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            ok = await client.send(provider(sim).build_request(batch(100)))
            over = await client.send(provider(sim).build_request(batch(101, first=1000)))
            assert ok.json()["Code"] == "OK"
            assert over.status_code == 200
            assert set(over.json()) == {"Code", "Message", "RequestId"}
            assert over.json()["Code"] == "isv.MOBILE_COUNT_OVER_LIMIT"
            assert sim.stats()["rejected"] == {"isv.MOBILE_COUNT_OVER_LIMIT": 1}
        assert len(receipts(tmp_path / "receipts.jsonl")) == 100

    @pytest.mark.parametrize(
        ("overrides", "status", "code"),
        [
            ({"SignNameJson": '["Acme"]'}, 200, "isv.INVALID_PARAMETERS"),
            ({"TemplateParamJson": '[{"code":"1"}]'}, 200, "isv.INVALID_PARAMETERS"),
            ({"TemplateParamJson": '[{"code":1},{"code":2}]'}, 200, "isv.INVALID_JSON_PARAM"),
            ({"PhoneNumberJson": '["139000", "12a"]'}, 200, "isv.MOBILE_NUMBER_ILLEGAL"),
            ({"PhoneNumberJson": "[not json"}, 200, "isv.INVALID_JSON_PARAM"),
            ({"TemplateCode": ""}, 400, "MissingParameter"),
            ({"Action": "NoSuchAction"}, 404, "InvalidAction.NotFound"),
        ],
    )
    async def test_invalid_parameters(
        self, tmp_path: Path, overrides: dict[str, str], status: int, code: str
    ) -> None:
        params = {k: v for k, v in send_params(2, **overrides).items() if v}
        async with running(tmp_path) as (sim, client):
            r = await client.send(signed_v2(sim, params))
            assert (r.status_code, r.json()["Code"]) == (status, code)
            assert set(r.json()) == (GATEWAY_KEYS if status != 200 else {"Code", "Message", "RequestId"})
            assert sim.accepted == 0

    async def test_template_params_are_optional(self, tmp_path: Path) -> None:
        params = send_params(2)
        del params["TemplateParamJson"]
        async with running(tmp_path) as (sim, client):
            r = await client.send(signed_v2(sim, params))
            assert r.json()["Code"] == "OK" and sim.accepted == 2


@pytest.mark.anyio
class TestAuth:
    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_bad_signature_rejected(self, tmp_path: Path, signature: str) -> None:
        wrong = AliyunCredentials("testid", "not-the-secret")
        async with running(tmp_path) as (sim, client):
            r = await client.send(provider(sim, signature, credentials=wrong).build_request(batch(2)))
            assert r.status_code == 400 and set(r.json()) == GATEWAY_KEYS
            assert r.json()["Code"] == "SignatureDoesNotMatch"
            assert sim.accepted == 0 and sim.stats()["rejected"] == {"SignatureDoesNotMatch": 1}

    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_unknown_access_key(self, tmp_path: Path, signature: str) -> None:
        stranger = AliyunCredentials("nobody", "testsecret")
        async with running(tmp_path) as (sim, client):
            r = await client.send(provider(sim, signature, credentials=stranger).build_request(batch(2)))
            assert (r.status_code, r.json()["Code"]) == (404, "InvalidAccessKeyId.NotFound")

    @pytest.mark.parametrize(("signature", "skew"), [("v3", 16 * 60), ("v2", 32 * 60)])
    async def test_expired_timestamp(self, tmp_path: Path, signature: str, skew: int) -> None:
        async with running(tmp_path) as (sim, client):
            p = provider(sim, signature, clock=lambda: time.time() - skew)
            r = await client.send(p.build_request(batch(2)))
            assert (r.status_code, r.json()["Code"]) == (400, "InvalidTimeStamp.Expired")
            fresh = provider(sim, signature, clock=lambda: time.time() - skew + 120)
            assert (await client.send(fresh.build_request(batch(2)))).json()["Code"] == "OK"
        async with running(tmp_path, check_time=False) as (sim, client):
            p = provider(sim, signature, clock=lambda: time.time() - 86_400)
            assert (await client.send(p.build_request(batch(2)))).json()["Code"] == "OK"

    @pytest.mark.parametrize("signature", ["v3", "v2"])
    async def test_nonce_reuse(self, tmp_path: Path, signature: str) -> None:
        async with running(tmp_path) as (sim, client):
            req = provider(sim, signature).build_request(batch(2))
            assert (await client.send(req)).json()["Code"] == "OK"
            again = await client.send(req)
            assert (again.status_code, again.json()["Code"]) == (400, "SignatureNonceUsed")
            assert sim.accepted == 2
        async with running(tmp_path, check_nonce=False) as (sim, client):
            req = provider(sim, signature).build_request(batch(2))
            for _ in range(2):
                assert (await client.send(req)).json()["Code"] == "OK"

    async def test_verification_off_accepts_any_signature(self, tmp_path: Path) -> None:
        wrong = AliyunCredentials("whoever", "whatever")
        async with running(tmp_path, verify=False) as (sim, client):
            r = await client.send(provider(sim, credentials=wrong).build_request(batch(2)))
            assert r.json()["Code"] == "OK"
        minimal = SimulatorConfig.minimal(qps=5)
        assert minimal.qps == 5 and not (minimal.verify or minimal.index_receipts or minimal.check_time)

    def test_default_credentials(self) -> None:
        env = {"ALIYUN_ACCESS_KEY_ID": "id1", "ALIYUN_ACCESS_KEY_SECRET": "s1"}
        assert default_credentials(env) == AliyunCredentials("id1", "s1")
        assert default_credentials({"ALIYUN_ACCESS_KEY_ID": "id1"}) == TEST_CREDENTIALS


@pytest.mark.anyio
class TestThrottle:
    async def test_excess_in_one_window_is_throttled(self, tmp_path: Path) -> None:
        clock = FakeClock(1000.25)
        results: list[httpx.Response] = []
        async with running(tmp_path, qps=10, monotonic=clock) as (sim, client):
            p = provider(sim)

            async def one(i: int) -> None:
                results.append(await client.send(p.build_request(batch(2, first=10 * i))))

            async with anyio.create_task_group() as tg:
                for i in range(15):
                    tg.start_soon(one, i)
            codes = sorted(r.json()["Code"] for r in results)
            assert codes == ["OK"] * 10 + ["Throttling.User"] * 5
            throttled = [r for r in results if r.status_code == 400]
            assert len(throttled) == 5 and all(set(r.json()) == GATEWAY_KEYS for r in throttled)
            assert {r.headers["x-acs-retry-after"] for r in throttled} == {"750"}
            assert sim.stats()["throttled"] == 5 and sim.accepted == 20
            clock.t = 1001.0  # the next window
            assert (await client.send(p.build_request(batch(2, first=500)))).json()["Code"] == "OK"
        assert len(receipts(tmp_path / "receipts.jsonl")) == 22

    async def test_windows_are_per_access_key(self, tmp_path: Path) -> None:
        other = AliyunCredentials("otherid", "othersecret")
        async with running(tmp_path, qps=1, monotonic=FakeClock(5.0),
                           credentials=(TEST_CREDENTIALS, other)) as (sim, client):
            assert (await client.send(provider(sim).build_request(batch(1)))).json()["Code"] == "OK"
            r = await client.send(provider(sim, credentials=other).build_request(batch(1)))
            assert r.json()["Code"] == "OK"
            r = await client.send(provider(sim).build_request(batch(1)))
            assert r.json()["Code"] == "Throttling.User"

    async def test_retry_after_header_optional(self, tmp_path: Path) -> None:
        cfg = {"qps": 1, "monotonic": FakeClock(5.0), "retry_after_header": False}
        async with running(tmp_path, **cfg) as (sim, client):
            await client.send(provider(sim).build_request(batch(1)))
            r = await client.send(provider(sim).build_request(batch(1)))
            assert r.json()["Code"] == "Throttling.User" and "x-acs-retry-after" not in r.headers


@pytest.mark.anyio
class TestFaults:
    @pytest.mark.parametrize(
        ("kind", "status", "code", "recorded"),
        [
            ("http500", 500, "InternalError", False),
            ("http503", 503, "ServiceUnavailable", False),
            ("throttle", 400, "Throttling.User", False),
            ("business_error", 200, "isv.MOBILE_NUMBER_ILLEGAL", False),
        ],
    )
    async def test_answered_faults(
        self, tmp_path: Path, kind: str, status: int, code: str, recorded: bool
    ) -> None:
        async with running(tmp_path, fault_rate=1.0, fault_mix={kind: 1}) as (sim, client):
            r = await client.send(provider(sim).build_request(batch(3)))
            assert (r.status_code, r.json()["Code"]) == (status, code)
            assert sim.stats()["faults"] == {kind: 1}
            assert sim.accepted == (3 if recorded else 0)
        assert receipts(tmp_path / "receipts.jsonl") == []

    @pytest.mark.parametrize(("kind", "recorded"), [("drop_before", 0), ("drop_after", 3), ("reset", 3)])
    async def test_connection_faults(self, tmp_path: Path, kind: str, recorded: int) -> None:
        async with running(tmp_path, fault_rates={kind: 1.0}) as (sim, client):
            with pytest.raises(TRANSPORT_ERRORS):
                await client.send(provider(sim).build_request(batch(3)))
            assert sim.stats()["faults"] == {kind: 1}
            assert sim.accepted == recorded
        assert len(receipts(tmp_path / "receipts.jsonl")) == recorded

    async def test_slow_exceeds_the_client_timeout(self, tmp_path: Path) -> None:
        async with running(tmp_path, fault_rate=1.0, fault_mix={"slow": 1}, slow_ms=5_000) as (sim, _):
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.send(provider(sim).build_request(batch(3)))
            assert sim.accepted == 3 and sim.stats()["faults"] == {"slow": 1}
        assert len(receipts(tmp_path / "receipts.jsonl")) == 3

    async def test_garbage_is_not_json(self, tmp_path: Path) -> None:
        async with running(tmp_path, fault_rate=1.0, fault_mix={"garbage": 1}) as (sim, client):
            r = await client.send(provider(sim).build_request(batch(3)))
            assert r.status_code == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(r.content)
            assert sim.accepted == 3
        assert len(receipts(tmp_path / "receipts.jsonl")) == 3

    async def test_connection_survives_answered_faults(self, tmp_path: Path) -> None:
        async with running(tmp_path, fault_rate=0.5, fault_mix={"http500": 1}, seed=3) as (sim, client):
            codes = [(await client.send(provider(sim).build_request(batch(1, first=i)))).json()["Code"]
                     for i in range(40)]
            assert set(codes) == {"OK", "InternalError"}
            assert sim.stats()["faults"]["http500"] == codes.count("InternalError")
            assert sim.accepted == codes.count("OK") and sim.stats()["connections"] == 1

    def test_plan_is_reproducible_and_weighted(self) -> None:
        import random

        def draws(seed: int) -> list[str | None]:
            plan = FaultPlan(0.5, {"http500": 3, "reset": 1}, {"slow": 0.1}, random.Random(seed))
            return [plan.draw() for _ in range(4000)]

        a = draws(1)
        assert a == draws(1) and a != draws(2)
        assert 1500 < a.count(None) < 1700  # 40 % of the draws have no fault
        assert a.count("http500") > 2 * a.count("reset") > 0 and a.count("slow") > 0
        with pytest.raises(ValueError, match="unknown fault kind"):
            FaultPlan(0.1, {"nope": 1}, {}, random.Random(0))
        with pytest.raises(ValueError, match="at most 1"):
            FaultPlan(0.9, {"http500": 1}, {"slow": 0.2}, random.Random(0))


@pytest.mark.anyio
class TestQuerySendDetails:
    async def test_finds_a_sent_phone_by_out_id(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            sent = [(await client.send(provider(sim).build_request(batch(2, out_id=out_id)))).json()
                    for out_id in ("run1-b1", "run1-b2")]
            date = time.strftime("%Y%m%d", time.gmtime(time.time() + 8 * 3600))
            query = {"Action": "QuerySendDetails", "PhoneNumber": "13900000002", "SendDate": date,
                     "PageSize": "10", "CurrentPage": "1"}
            data = (await client.send(signed_v2(sim, query))).json()
            assert data["Code"] == "OK" and data["TotalCount"] == 2
            rows = data["SmsSendDetailDTOs"]["SmsSendDetailDTO"]
            assert [r["OutId"] for r in rows] == ["run1-b1", "run1-b2"]
            assert rows[0]["PhoneNum"] == "13900000002" and rows[0]["SendStatus"] == 3
            assert rows[0]["ErrCode"] == "DELIVERED" and rows[0]["TemplateCode"] == "SMS_154950909"
            by_biz = (await client.send(signed_v2(sim, {**query, "BizId": sent[1]["BizId"]}))).json()
            assert [r["OutId"] for r in by_biz["SmsSendDetailDTOs"]["SmsSendDetailDTO"]] == ["run1-b2"]
            page2 = (await client.send(signed_v2(sim, {**query, "PageSize": "1", "CurrentPage": "2"}))).json()
            assert page2["TotalCount"] == 2
            assert [r["OutId"] for r in page2["SmsSendDetailDTOs"]["SmsSendDetailDTO"]] == ["run1-b2"]
            e164 = (await client.send(signed_v2(sim, {**query, "PhoneNumber": "+8613900000002"}))).json()
            assert e164["TotalCount"] == 2
            other_day = (await client.send(signed_v2(sim, {**query, "SendDate": "20000101"}))).json()
            assert other_day["TotalCount"] == 0

    async def test_needs_the_index(self, tmp_path: Path) -> None:
        async with running(tmp_path, index_receipts=False) as (sim, client):
            query = {"Action": "QuerySendDetails", "PhoneNumber": "13900000002", "SendDate": "20260101",
                     "PageSize": "10", "CurrentPage": "1"}
            r = await client.send(signed_v2(sim, query))
            assert (r.status_code, r.json()["Code"]) == (503, "ServiceUnavailable")


def capture_request(
    path: Path, base_url: str, mutate: Callable[[bytes], bytes] | None = None
) -> httpx.Request:
    """The captured SDK request, byte for byte (Host header included), aimed at ``base_url``."""
    rec = orjson.loads(path.read_bytes())["requests"][0]
    body = base64.b64decode(rec["body_b64"])
    assert len(body) == rec["body_len"]
    head = f"{rec['method']} {rec['target']}\n".encode() + b"".join(
        f"{k}: {v}\n".encode() for k, v in rec["headers"] if k.lower() != "content-length")
    if mutate is not None:
        head, body = (mutate(x) for x in (head, body))
    lines = head.decode().splitlines()
    method, target = lines[0].split(" ", 1)
    headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:])]
    req = httpx.Request(method, base_url + target, headers=headers, content=body)
    assert req.url.raw_path == target.encode()  # httpx sends the target unchanged
    return req


@pytest.mark.anyio
class TestCaptures:
    @pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
    async def test_official_sdk_requests_are_accepted(self, tmp_path: Path, path: Path) -> None:
        async with running(tmp_path, check_time=False) as (sim, client):
            r = await client.send(capture_request(path, sim.base_url))
            assert (r.status_code, r.json()["Code"]) == (200, "OK"), r.text
            assert sim.accepted == 3
        phones = [x["phone"] for x in receipts(tmp_path / "receipts.jsonl")]
        assert phones == ["13800000001", "13800000002", "+8613800000003"]

    @pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
    async def test_a_changed_byte_is_rejected(self, tmp_path: Path, path: Path) -> None:
        def change_number(data: bytes) -> bytes:
            return data.replace(b"13800000001", b"13800000009", 1)

        async with running(tmp_path, check_time=False) as (sim, client):
            r = await client.send(capture_request(path, sim.base_url, change_number))
            assert (r.status_code, r.json()["Code"]) == (400, "SignatureDoesNotMatch")
            assert sim.accepted == 0

    async def test_captures_are_old(self, tmp_path: Path) -> None:
        """With the time check on, a capture more than its window old is refused as expired."""
        path = next(p for p in CAPTURES if "v3_SendBatchSms" in p.name)
        async with running(tmp_path, clock=lambda: time.time() + 86_400 * 365) as (sim, client):
            r = await client.send(capture_request(path, sim.base_url))
            assert (r.status_code, r.json()["Code"]) == (400, "InvalidTimeStamp.Expired")


async def raw_exchange(sim: Simulator, data: bytes) -> bytes:
    """Write ``data`` on a fresh connection and read until the server closes it."""
    async with await anyio.connect_tcp(sim.host, sim.port) as stream:
        await stream.send(data)
        out = b""
        with anyio.fail_after(10):
            try:
                while True:
                    out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return out


@pytest.mark.anyio
class TestHttp:
    @pytest.mark.parametrize(
        ("data", "status"),
        [
            (b"NONSENSE\r\n\r\n", b"400"),
            (b"GET /__stats HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
            (b"GET /__stats HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
            (b"GET /__stats HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
            (b"GET /__stats HTTP/1.1\nHost: x\n\n", b"400"),
            (b"GET /__stats HTTP/2.0\r\n\r\n", b"505"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
            (b"GET /" + b"x" * 70_000, b"431"),
        ],
    )
    async def test_malformed_requests(self, tmp_path: Path, data: bytes, status: bytes) -> None:
        async with running(tmp_path) as (sim, _):
            out = await raw_exchange(sim, data)
            assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:80]
            assert b"Connection: close" in out

    async def test_pipelined_requests_answered_in_order_then_close(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, _):
            reqs = [provider(sim).build_request(batch(1, first=i, out_id=f"p{i}")) for i in range(3)]
            data = b""
            for i, req in enumerate(reqs):
                head = f"POST {req.url.raw_path.decode()} HTTP/1.1\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
                head += "Connection: close\r\n" if i == 2 else ""
                data += head.encode() + b"\r\n" + req.content
            out = await raw_exchange(sim, data)
            assert out.count(b"HTTP/1.1 200 OK") == 3 and out.endswith(b"}")
            assert out.count(b"Connection: close") == 1
        assert [x["out_id"] for x in receipts(tmp_path / "receipts.jsonl")] == ["p0", "p1", "p2"]

    async def test_keep_alive_and_stats(self, tmp_path: Path) -> None:
        async with running(tmp_path, latency_ms=20) as (sim, client):
            for i in range(3):
                r = await client.send(provider(sim).build_request(batch(2, first=i * 2)))
                assert r.json()["Code"] == "OK"
            stats = (await client.get(f"{sim.base_url}/__stats")).json()
            assert stats["requests"] == 3 and stats["accepted_recipients"] == 6
            assert stats["accepted_requests"] == 3 and stats["connections"] == 1
            assert (await client.get(f"{sim.base_url}/nowhere")).status_code == 404

    async def test_expect_100_continue(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, _), await anyio.connect_tcp(sim.host, sim.port) as stream:
            await stream.send(b"POST /__stats HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            assert await stream.receive() == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send(b"{}")
            assert (await stream.receive()).startswith(b"HTTP/1.1 405 ")

    async def test_latency_does_not_block_other_connections(self, tmp_path: Path) -> None:
        async with running(tmp_path, latency_ms=60_000) as (sim, client):
            pending: list[BaseException] = []

            async def slow_send() -> None:
                try:
                    await client.send(provider(sim).build_request(batch(2)))
                except BaseException as exc:  # cancelled below, as intended
                    pending.append(exc)
                    raise

            async with httpx.AsyncClient() as other, anyio.create_task_group() as tg:
                tg.start_soon(slow_send)
                with anyio.fail_after(10):
                    while (await other.get(f"{sim.base_url}/__stats")).json()["accepted_recipients"] < 2:
                        pass  # each poll is a full round trip on a second connection
                tg.cancel_scope.cancel()
            assert pending and sim.accepted == 2  # recorded, answer still held back

    @given(st.text(alphabet="%+=&aZ09fF\r\n é~_-.*/\u4e2d", max_size=24))
    def test_fast_form_decoding_matches_urllib(self, s: str) -> None:
        from urllib.parse import parse_qsl, quote, unquote_plus

        assert unquote_form(s) == unquote_plus(s)
        assert parse_urlencoded(s) == parse_qsl(s, keep_blank_values=True)
        encoded = quote(s, safe="")
        lower_hex = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)
        assert unquote_form(encoded) == s and unquote_form(lower_hex) == s

    def test_refuses_a_non_loopback_host(self) -> None:
        with pytest.raises(ValueError, match="non-loopback"):
            SimulatorConfig(host="0.0.0.0")
        assert SimulatorConfig(host="0.0.0.0", allow_remote=True).host == "0.0.0.0"
        assert SimulatorConfig(host="::1").host == "::1"

    def test_nonce_cache_is_bounded(self) -> None:
        cache = NonceCache(max_size=64)
        assert not cache.seen("a", 0.0, 10.0) and cache.seen("a", 5.0, 10.0)
        assert not cache.seen("a", 10.5, 10.0)  # expired, usable again
        for i in range(1000):
            cache.seen(f"n{i}", 11.0, 10.0)
        assert len(cache._expiry) <= 64


@pytest.mark.anyio
class TestCli:
    async def test_prints_url_first_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        out = tmp_path / "receipts.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIYUN_")}
        cmd = [sys.executable, "-m", "providers.simulator", "--port", "0", "--receipts", str(out)]
        async with await anyio.open_process(cmd, cwd=REPO, env=env) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            first = b""
            with anyio.fail_after(30):
                while not first.endswith(b"\n"):
                    first += await proc.stdout.receive(1)
            url = first.decode().strip()
            assert url.startswith("http://127.0.0.1:") and url.rsplit(":", 1)[1].isdigit()
            p = AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_154950909", endpoint=url)
            async with httpx.AsyncClient() as client:
                assert (await client.send(p.build_request(batch(3)))).json()["Code"] == "OK"
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await proc.wait()
                rest = b"".join([chunk async for chunk in proc.stdout])
                err = b"".join([chunk async for chunk in proc.stderr])
        assert code == 0 and rest == b""
        stats = orjson.loads(err.splitlines()[-1])
        assert stats["accepted_recipients"] == 3
        assert len(receipts(out)) == 3

    def test_parser_builds_the_config(self) -> None:
        from providers.simulator.__main__ import build_parser, config_from_args

        argv = ["--qps", "7", "--fault-rate", ".2", "--fault-mix", "http500=2,reset", "--minimal", "--seed=4"]
        cfg = config_from_args(build_parser().parse_args(argv))
        assert (cfg.qps, cfg.fault_rate, cfg.seed) == (7, 0.2, 4)
        assert dict(cfg.fault_mix) == {"http500": 2, "reset": 1}
        assert not (cfg.verify or cfg.check_time or cfg.check_nonce or cfg.index_receipts)
        assert set(FAULT_KINDS) >= set(cfg.fault_mix)
