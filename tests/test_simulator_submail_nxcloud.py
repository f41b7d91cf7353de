"""The simulator's SUBMAIL and NXCloud gateways over real loopback sockets, with httpx as the client.

Requests are signed here by hand from the documented algorithms (PROTOCOLS.md
§2.2 and §3.2), not with the provider modules, so the simulator's verifiers
are checked against an independent signer, itself pinned to vectors C1-C4 and
D1-D5.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, Message
from providers.simulator import Simulator, SimulatorConfig, serve
from providers.simulator.config import (
    NXCLOUD_TEST_ACCOUNT,
    SUBMAIL_TEST_APP,
    NxcloudAccount,
    SubmailApp,
    default_nxcloud_accounts,
    default_submail_apps,
)
from providers.simulator.submail import segments

APPID, APPKEY = "10001", "abcdef0123456789abcdef0123456789"
AK, SECRET, APP_KEY, APP_SECRET = "fme2na3kdi3ki", "abciiiko2k3", "yourAppKey", "yourAppSecret"
V2_EXCLUDED = {
    "batchsend": ("content",), "multisend": ("multi", "content"), "multixsend": ("multi", "content")}
HEX32 = re.compile(r"[0-9a-f]{32}")
FIXTURES = Path(__file__).parent / "fixtures" / "seeds"
TRANSPORT_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- hand-made signers -----------------------------------------------------------------------
def submail_digest(params: Mapping[str, str], sign_type: str, exclude: tuple[str, ...] = ()) -> str:
    """§2.2: appid + appkey + k=v&… (A→Z, raw, minus signature/tag/exclusions) + appid + appkey."""
    skip = {"signature", "tag", *exclude}
    joined = "&".join(f"{k}={params[k]}" for k in sorted(params) if k not in skip)
    return hashlib.new(sign_type, f"{APPID}{APPKEY}{joined}{APPID}{APPKEY}".encode()).hexdigest()


def submail_params(
    api: str, params: Mapping[str, str], *, sign_type: str = "md5", sign_version: str | None = "2",
    ts: str | None = None,
) -> dict[str, str]:
    p = {"appid": APPID, **params}
    if sign_type == "normal":
        return {**p, "signature": APPKEY}
    p |= {"sign_type": sign_type, "timestamp": ts or str(int(time.time()))}
    if sign_version:
        p["sign_version"] = sign_version
    p["signature"] = submail_digest(p, sign_type, V2_EXCLUDED.get(api, ()) if sign_version == "2" else ())
    return p


def submail_post(sim: Simulator, api: str, params: Mapping[str, str], *, json: bool = False) -> httpx.Request:
    path = "/service/timestamp" if api == "timestamp" else f"/sms/{api}"
    url = f"{sim.base_url}{path}{'.json' if json else ''}"
    if json:
        return httpx.Request("POST", url, json=dict(params))
    return httpx.Request("POST", url, data=dict(params))


def nx_sign(body: bytes, ts: str, *, algorithm: str = "md5", action: str = "mtsend", biz: str = "3",
            ak: str = AK, secret: str = SECRET) -> str:
    """§3.2: accessKey=…&action=…&bizType=…&ts=…&body=<bytes>&accessSecret=…, lower-case hex."""
    text = f"accessKey={ak}&action={action}&bizType={biz}&ts={ts}".encode()
    text += (b"&body=" + body if body else b"") + f"&accessSecret={secret}".encode()
    return hashlib.new(algorithm, text).hexdigest()


def nx_request(
    sim: Simulator, body: bytes, *, ts: str | None = None, algorithm: str | None = None,
    drop: str | None = None, sent_body: bytes | None = None, **sign: str,
) -> httpx.Request:
    ts = ts or str(int(time.time() * 1000))
    headers = {
        "Content-Type": "application/json", "accessKey": sign.get("ak", AK), "ts": ts,
        "bizType": sign.get("biz", "3"), "action": sign.get("action", "mtsend"),
        "sign": nx_sign(body, ts, algorithm=algorithm or "md5", **sign),
    }
    if algorithm:
        headers["algorithm"] = algorithm
    if drop:
        del headers[drop]
    content = body if sent_body is None else sent_body
    return httpx.Request("POST", f"{sim.base_url}/v1/sms/multi/mt", headers=headers, content=content)


def nx_body(n: int, *, first: int = 0, app_key: str = APP_KEY, **extra: Any) -> bytes:
    items = [{"phone": f"86150{first + i:08d}", "content": f"Your code is {i:04d}",
              "sysMessageId": f"order-{first + i:09d}", **extra} for i in range(n)]
    return orjson.dumps({"appKey": app_key, "items": items})


async def nx_code(client: httpx.AsyncClient, request: httpx.Request) -> int:
    code: int = (await client.send(request)).json()["code"]
    return code


def numbers(n: int, first: int = 0) -> list[str]:
    return [f"138{first + i:08d}" for i in range(n)]


def receipts(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def beijing_day(t: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime((time.time() if t is None else t) + 8 * 3600))


@asynccontextmanager
async def running(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    kw.setdefault("submail_credentials", (SUBMAIL_TEST_APP,))
    kw.setdefault("nxcloud_credentials", (NXCLOUD_TEST_ACCOUNT,))
    kw.setdefault("credentials", (TEST_CREDENTIALS,))
    kw.setdefault("receipts", tmp_path / "receipts.jsonl")
    kw.setdefault("submail_log_interval_s", 0.0)
    async with serve(SimulatorConfig(**kw)) as sim, httpx.AsyncClient(timeout=10) as client:
        yield sim, client


C1 = {"to": "13800000001,13800000002", "content": "【SUBMAIL】您的验证码是1234", "tag": "batch-42"}
C4_MULTI = orjson.dumps([{"to": "13800000001", "vars": {"code": "1234"}},
                         {"to": "13800000002", "vars": {"code": "5678"}}]).decode()
D5_BODY = orjson.dumps({"appKey": "yourAppKey", "items": [
    {"phone": "8615088888888", "content": "Your code is 1234", "sysMessageId": "order-000000001"},
    {"phone": "8615088888889", "content": "Your code is 5678", "sysMessageId": "order-000000002"}]})


# -- the signers agree with the documented vectors ---------------------------------------------------
class TestVectors:
    def test_submail_c1_to_c4(self) -> None:
        base = {"appid": APPID, "timestamp": "1700000000", "sign_version": "2", **C1}
        assert submail_digest({**base, "sign_type": "md5"}, "md5", ("content",)) == \
            "c933ae88697c93884bb7beaed86b14c6"
        assert submail_digest({**base, "sign_type": "sha1"}, "sha1", ("content",)) == \
            "c5b2567b0f4f94e44a77f366c8bc93cdb41c6bb0"
        del base["sign_version"]
        assert submail_digest({**base, "sign_type": "md5"}, "md5") == "c41c516e99b8d0f985d67a927c7f167e"
        c4 = {"appid": APPID, "project": "ThJBE4", "multi": C4_MULTI, "timestamp": "1700000000",
              "sign_type": "md5", "sign_version": "2"}
        assert submail_digest(c4, "md5", ("multi", "content")) == "3011644d5c52f8c5fd724874af512037"

    def test_nxcloud_d1_to_d5(self) -> None:
        ts = "1655710885431"
        for body, want in [('{"name":"牛小信","id":10001}', "87c3560d3331ae23f1021e2025722354"),
                           ('{"id":10001,"name":"牛小信"}', "7750759da06333f20d0640be09355e34"),
                           ('{"id": 10001, "name": "牛小信"}', "d0c24a9886c629330d7f3f2056c65bc2")]:
            assert nx_sign(body.encode(), ts, action="send", biz="1") == want
        d4 = nx_sign('{"name":"牛小信","id":10001}'.encode(), ts, action="send", biz="1", algorithm="sha256")
        assert d4 == "e0eec2c99ef80f269a82795e2223f618ebfc0616c8b6c8c7d438021ec38ad0eb"
        assert nx_sign(D5_BODY, ts) == "95721084d3194bf5480c45717e144f30"


# -- SUBMAIL ---------------------------------------------------------------------------------------------
@pytest.mark.anyio
class TestSubmailSend:
    @pytest.mark.parametrize(("sign_type", "sign_version", "signature"), [
        ("md5", "2", "c933ae88697c93884bb7beaed86b14c6"),
        ("sha1", "2", "c5b2567b0f4f94e44a77f366c8bc93cdb41c6bb0"),
        ("md5", None, "c41c516e99b8d0f985d67a927c7f167e"),
    ])
    async def test_vectors_c1_to_c3_are_accepted(
        self, tmp_path: Path, sign_type: str, sign_version: str | None, signature: str
    ) -> None:
        params = {"appid": APPID, **C1, "timestamp": "1700000000", "sign_type": sign_type,
                  "signature": signature} | ({"sign_version": sign_version} if sign_version else {})
        async with running(tmp_path, clock=lambda: 1_700_000_003.0) as (sim, client):
            r = await client.send(submail_post(sim, "batchsend", params))
            assert r.status_code == 200, r.text
            data = r.json()
            assert list(data) == ["status", "batchlist", "total_fee", "responses"]
            assert data["status"] == "success" and data["total_fee"] == 2
            assert HEX32.fullmatch(data["batchlist"])
            for entry, to in zip(data["responses"], ("13800000001", "13800000002"), strict=True):
                assert list(entry) == ["status", "to", "send_id", "fee"]
                assert (entry["status"], entry["to"], entry["fee"]) == ("success", to, 1)
                assert HEX32.fullmatch(entry["send_id"])
        lines = receipts(tmp_path / "receipts.jsonl")
        assert [x["phone"] for x in lines] == ["13800000001", "13800000002"]
        for x, entry in zip(lines, data["responses"], strict=True):
            assert x == {"phone": entry["to"], "out_id": "batch-42", "provider": "submail",
                         "t": 1_700_000_003.0, "send_id": entry["send_id"], "appid": APPID,
                         "batchlist": data["batchlist"], "project": "", "fee": 1, "content": C1["content"]}

    async def test_vector_c4_multixsend_is_accepted(self, tmp_path: Path) -> None:
        params = {"appid": APPID, "project": "ThJBE4", "multi": C4_MULTI, "timestamp": "1700000000",
                  "sign_type": "md5", "sign_version": "2", "signature": "3011644d5c52f8c5fd724874af512037"}
        async with running(tmp_path, clock=lambda: 1_700_000_001.0) as (sim, client):
            r = await client.send(submail_post(sim, "multixsend", params))
            data = r.json()
            assert r.status_code == 200 and isinstance(data, list)
            assert [(e["status"], e["to"], e["fee"]) for e in data] == [
                ("success", "13800000001", 1), ("success", "13800000002", 1)]
            assert sim.accepted == 2

    @pytest.mark.parametrize("json_body", [False, True], ids=["form", "json"])
    async def test_bodies_and_json_suffix(self, tmp_path: Path, json_body: bool) -> None:
        async with running(tmp_path) as (sim, client):
            params = submail_params("batchsend", {"to": "13800000001", "content": "【Acme】hello"})
            r = await client.send(submail_post(sim, "batchsend", params, json=json_body))
            assert r.json()["status"] == "success" and sim.accepted == 1
            assert r.request.url.path.endswith(".json") == json_body

    async def test_normal_mode_and_auth_errors(self, tmp_path: Path) -> None:
        send = {"to": "13800000001", "content": "【Acme】hello"}
        cases: list[tuple[dict[str, str], str]] = [
            ({"appid": APPID, **send, "signature": "wrong"}, "109"),
            ({"appid": "99999", **send, "signature": APPKEY}, "101"),
            ({**send, "signature": APPKEY}, "101"),
            ({"appid": APPID, **send}, "111"),
            ({**submail_params("batchsend", send), "sign_type": "rsa"}, "107"),
            ({**submail_params("batchsend", send), "tag": "x" * 33}, "310"),
        ]
        async with running(tmp_path) as (sim, client):
            normal = submail_params("batchsend", send, sign_type="normal")
            ok = await client.send(submail_post(sim, "batchsend", normal))
            assert ok.json()["status"] == "success"
            for params, code in cases:
                r = await client.send(submail_post(sim, "batchsend", params))
                assert r.status_code == 400 and r.json()["status"] == "error", params
                assert r.json()["code"] == code and r.json()["msg"], params
            assert sim.accepted == 1
            assert sim.stats()["rejected"] == {"submail.109": 1, "submail.101": 2, "submail.111": 1,
                                               "submail.107": 1, "submail.310": 1}

    async def test_a_changed_byte_is_rejected(self, tmp_path: Path) -> None:
        send = {"to": "13800000001,13800000002", "content": "【Acme】hello"}
        async with running(tmp_path) as (sim, client):
            signed = submail_params("batchsend", send)
            r = await client.send(submail_post(sim, "batchsend", {**signed, "to": "13800000001,13800000003"}))
            assert (r.status_code, r.json()["code"]) == (400, "108")
            # sign_version=2 leaves content unsigned; without it, content is signed too.
            r = await client.send(submail_post(sim, "batchsend", {**signed, "content": "【Acme】changed"}))
            assert r.json()["status"] == "success"
            full = submail_params("batchsend", send, sign_version=None)
            r = await client.send(submail_post(sim, "batchsend", {**full, "content": "【Acme】changed"}))
            assert r.json()["code"] == "108"
            multi = orjson.dumps([{"to": "13800000001"}]).decode()
            m = submail_params("multisend", {"content": "【Acme】hi", "multi": multi}, sign_type="sha1")
            other = orjson.dumps([{"to": "13800000009"}]).decode()
            r = await client.send(submail_post(sim, "multisend", {**m, "multi": other}))
            assert r.status_code == 200
            m = submail_params("multisend", {"content": "【Acme】hi", "multi": multi}, sign_version=None)
            r = await client.send(submail_post(sim, "multisend", {**m, "multi": other}))
            assert r.json()["code"] == "108"
            assert sim.accepted == 3

    async def test_timestamps(self, tmp_path: Path) -> None:
        send = {"to": "13800000001", "content": "【Acme】hello"}
        async with running(tmp_path) as (sim, client):
            stale = submail_params("batchsend", send, ts=str(int(time.time()) - 10))
            assert (await client.send(submail_post(sim, "batchsend", stale))).json()["code"] == "152"
            future = submail_params("batchsend", send, ts=str(int(time.time()) + 10))
            assert (await client.send(submail_post(sim, "batchsend", future))).json()["code"] == "152"
            for bad in ("abc", "1.5e9", ""):
                p = {**submail_params("batchsend", send), "timestamp": bad}
                assert (await client.send(submail_post(sim, "batchsend", p))).json()["code"] == "151"
            fresh = submail_params("batchsend", send, ts=str(int(time.time()) - 4))
            assert (await client.send(submail_post(sim, "batchsend", fresh))).json()["status"] == "success"
            for path in ("/service/timestamp", "/service/timestamp.json"):
                for method in ("GET", "POST"):
                    r = await client.request(method, sim.base_url + path)
                    assert set(r.json()) == {"timestamp"} and abs(r.json()["timestamp"] - time.time()) < 5
        async with running(tmp_path, check_time=False) as (sim, client):
            old = submail_params("batchsend", send, ts="1700000000")
            assert (await client.send(submail_post(sim, "batchsend", old))).json()["status"] == "success"

    async def test_10000_numbers_accepted_10001_rejected(self, tmp_path: Path) -> None:
        async with running(tmp_path, index_receipts=False) as (sim, client):
            ok = submail_params("batchsend", {"to": ",".join(numbers(10_000)), "content": "【Acme】hi"})
            r = await client.send(submail_post(sim, "batchsend", ok))
            assert len(r.json()["responses"]) == 10_000 and r.json()["total_fee"] == 10_000
            many = ",".join(numbers(10_001, 20_000))
            over = submail_params("batchsend", {"to": many, "content": "【Acme】hi"})
            r = await client.send(submail_post(sim, "batchsend", over))
            assert (r.status_code, r.json()["code"]) == (400, "252")
            assert sim.accepted == 10_000
        assert len(receipts(tmp_path / "receipts.jsonl")) == 10_000

    async def test_fee_is_segments(self, tmp_path: Path) -> None:
        assert [segments("x" * n) for n in (1, 70, 71, 134, 135)] == [1, 1, 2, 2, 3]
        async with running(tmp_path) as (sim, client):
            for length, fee in ((70, 1), (71, 2), (135, 3)):
                content = "【Acme】" + "好" * (length - 6)
                p = submail_params("batchsend", {"to": "13800000001,13800000002", "content": content})
                data = (await client.send(submail_post(sim, "batchsend", p))).json()
                assert [e["fee"] for e in data["responses"]] == [fee, fee] and data["total_fee"] == 2 * fee

    async def test_batchsend_per_recipient_errors(self, tmp_path: Path) -> None:
        async with running(tmp_path, submail_hot_numbers=frozenset({"13900000000"})) as (sim, client):
            p = submail_params("batchsend", {"to": "13800000001, 12345,13900000000", "content": "【Acme】hi"})
            data = (await client.send(submail_post(sim, "batchsend", p))).json()
            assert data["total_fee"] == 1
            ok, bad, hot = data["responses"]
            assert ok["status"] == "success" and ok["to"] == "13800000001"
            assert (bad["status"], bad["to"], bad["code"]) == ("error", "12345", 252)
            assert (hot["status"], hot["to"], hot["code"]) == ("error", "13900000000", 115)
            only_bad = submail_params("batchsend", {"to": "+447700900000", "content": "【Acme】hi"})
            r = await client.send(submail_post(sim, "batchsend", only_bad))
            assert (r.status_code, r.json()["code"]) == (400, "252")
            assert sim.accepted == 1

    @pytest.mark.parametrize(("content", "code"), [
        ("", "403"), ("no signature", "401"), ("【A】short", "413"), ("【Acme】" + "x" * 995, "404")])
    async def test_content_rules(self, tmp_path: Path, content: str, code: str) -> None:
        async with running(tmp_path) as (sim, client):
            p = submail_params("batchsend", {"to": "13800000001", "content": content})
            assert (await client.send(submail_post(sim, "batchsend", p))).json()["code"] == code

    async def test_multisend_vars_and_per_recipient_errors(self, tmp_path: Path) -> None:
        multi = orjson.dumps([
            {"to": "13800000001", "vars": {"name": "kevin", "code": 123456}},
            {"to": "12345", "vars": {"name": "x"}},
            {"vars": {"name": "no to"}},
            {"to": "13900000000", "vars": {"name": "hot"}},
            {"to": "13800000002", "vars": "not an object"},
            {"to": "13800000003", "vars": {"name": "w" * 80}},
        ]).decode()
        content = "【SUBMAIL】您好，@var(name)，您的取货码为 @var(code)"
        cfg = {"submail_hot_numbers": frozenset({"13900000000"})}
        async with running(tmp_path, **cfg) as (sim, client):
            p = submail_params("multisend", {"content": content, "multi": multi, "tag": "m-1"})
            r = await client.send(submail_post(sim, "multisend", p))
            data = r.json()
            assert r.status_code == 200 and len(data) == 6
            assert [e["status"] for e in data] == ["success", "error", "error", "error", "error", "success"]
            assert [e.get("code") for e in data] == [None, 252, 252, 115, 307, None]
            assert all("to" not in e and set(e) == {"status", "code", "msg"} for e in data[1:5])
            assert (data[0]["to"], data[0]["fee"]) == ("13800000001", 1)
            assert (data[5]["to"], data[5]["fee"]) == ("13800000003", 2)
            query = submail_params("log", {"to": "13800000001"})
            log = (await client.send(submail_post(sim, "log", query))).json()
            assert log["data"][0]["sms_content"] == "【SUBMAIL】您好，kevin，您的取货码为 123456"
            assert log["data"][0]["sms_signature"] == "【SUBMAIL】"
        assert [(x["phone"], x["out_id"]) for x in receipts(tmp_path / "receipts.jsonl")] == [
            ("13800000001", "m-1"), ("13800000003", "m-1")]

    @pytest.mark.parametrize(("api", "params", "code"), [
        ("multisend", {"content": "【Acme】hi", "multi": "[not json"}, "410"),
        ("multisend", {"content": "【Acme】hi", "multi": "[]"}, "410"),
        ("multisend", {"content": "【Acme】hi"}, "410"),
        ("multixsend", {"multi": '[{"to":"13800000001"}]'}, "305"),
        ("multixsend", {"project": "bad project!", "multi": '[{"to":"13800000001"}]'}, "306"),
    ])
    async def test_multi_request_errors(
        self, tmp_path: Path, api: str, params: dict[str, str], code: str
    ) -> None:
        async with running(tmp_path) as (sim, client):
            r = await client.send(submail_post(sim, api, submail_params(api, params)))
            assert (r.status_code, r.json()["status"], r.json()["code"]) == (400, "error", code)


@pytest.mark.anyio
class TestSubmailLog:
    async def test_finds_what_was_accepted(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            b = submail_params("batchsend", {"to": ",".join(numbers(3)), "content": "【Acme】one"})
            batch = (await client.send(submail_post(sim, "batchsend", b))).json()
            m = submail_params("multixsend", {"project": "ThJBE4", "multi": C4_MULTI})
            multi = (await client.send(submail_post(sim, "multixsend", m))).json()

            async def log(**filters: str) -> dict[str, Any]:
                r = await client.send(submail_post(sim, "log", submail_params("log", filters)))
                assert r.status_code == 200, r.text
                data: dict[str, Any] = r.json()
                return data

            everything = await log()
            assert everything["status"] == "success" and everything["total"] == 5
            assert set(everything) == {
                "status", "start_date", "end_date", "total", "offset", "results", "data"}
            row = everything["data"][0]
            assert (row["sendID"], row["to"], row["status"], row["report_state"], row["fee"]) == (
                batch["responses"][0]["send_id"], "13800000000", "delivered", "DELIVRD", 1)
            assert row["appid"] == APPID and abs(row["send_at"] - time.time()) < 5
            assert {"template_id", "sms_signature", "sms_content", "sent_at", "report_at"} <= set(row)
            by_to = await log(to="13800000001")
            assert [r["sendID"] for r in by_to["data"]] == [
                batch["responses"][1]["send_id"], multi[0]["send_id"]]
            assert by_to["data"][1]["template_id"] == "ThJBE4"
            by_id = await log(send_id=multi[1]["send_id"])
            assert [r["to"] for r in by_id["data"]] == ["13800000002"]
            by_list = await log(sendlist=batch["batchlist"])
            assert by_list["total"] == 3
            page = await log(rows="2", offset="1")
            assert page["total"] == 5 and page["results"] == 2
            assert [r["to"] for r in page["data"]] == ["13800000001", "13800000002"]
            assert (await log(end_date=str(int(time.time()) - 100)))["total"] == 0
            assert (await log(status="dropped"))["total"] == 0
            assert (await log(send_id="0" * 32))["data"] == []

    async def test_one_call_per_minute_answers_the_cached_result(self, tmp_path: Path) -> None:
        mono = FakeClock(1000.0)
        async with running(tmp_path, submail_log_interval_s=60.0, monotonic=mono) as (sim, client):
            async def total() -> int:
                r = await client.send(submail_post(sim, "log", submail_params("log", {})))
                value: int = r.json()["total"]
                return value

            assert await total() == 0
            b = submail_params("batchsend", {"to": "13800000001", "content": "【Acme】one"})
            await client.send(submail_post(sim, "batchsend", b))
            mono.t += 59
            assert await total() == 0  # the previous answer, as documented
            mono.t += 1
            assert await total() == 1

    async def test_needs_auth(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            r = await client.send(submail_post(sim, "log", {"appid": APPID, "signature": "nope"}))
            assert (r.status_code, r.json()["code"]) == (400, "109")


# -- NXCloud ---------------------------------------------------------------------------------------------
@pytest.mark.anyio
class TestNxcloudSend:
    async def test_vector_d5_is_accepted(self, tmp_path: Path) -> None:
        ts = "1655710885431"
        headers = {"Content-Type": "application/json", "accessKey": AK, "ts": ts, "bizType": "3",
                   "action": "mtsend", "sign": "95721084d3194bf5480c45717e144f30"}
        async with running(tmp_path, clock=lambda: 1_655_710_890.0) as (sim, client):
            r = await client.post(f"{sim.base_url}/v1/sms/multi/mt", headers=headers, content=D5_BODY)
            assert r.status_code == 200, r.text
            assert r.json() == {"code": 0, "message": "Success", "data": [  # the seed's 成功示例 shape
                {"phone": "8615088888888", "messageid": "order-000000001", "status": "Success"},
                {"phone": "8615088888889", "messageid": "order-000000002", "status": "Success"},
            ]}
        assert receipts(tmp_path / "receipts.jsonl") == [
            {"phone": "8615088888888", "out_id": "order-000000001", "message_id": "order-000000001",
             "content": "Your code is 1234", "sender": "", "provider": "nxcloud", "t": 1_655_710_890.0},
            {"phone": "8615088888889", "out_id": "order-000000002", "message_id": "order-000000002",
             "content": "Your code is 5678", "sender": "", "provider": "nxcloud", "t": 1_655_710_890.0},
        ]

    async def test_sha256_and_generated_ids(self, tmp_path: Path) -> None:
        body = orjson.dumps({"appKey": APP_KEY, "items": [{"phone": "6281234567890", "content": "hi"}]})
        async with running(tmp_path) as (sim, client):
            data = (await client.send(nx_request(sim, body, algorithm="sha256"))).json()
            assert data["code"] == 0 and HEX32.fullmatch(data["data"][0]["messageid"])
        assert receipts(tmp_path / "receipts.jsonl")[0]["out_id"] == ""

    async def test_auth_errors(self, tmp_path: Path) -> None:
        body = nx_body(2)
        stale = str(int((time.time() - 61) * 1000))
        async with running(tmp_path) as (sim, client):
            cases: list[tuple[httpx.Request, int]] = [
                (nx_request(sim, body, drop="sign"), 1001),
                (nx_request(sim, body, drop="ts"), 1001),
                (nx_request(sim, body, ak="stranger"), 1005),
                (nx_request(sim, body, secret="wrong"), 1003),
                (nx_request(sim, body, sent_body=body.replace(b"8615", b"8616", 1)), 1003),
                (nx_request(sim, body, sent_body=body + b"\n"), 1003),
                (nx_request(sim, body, algorithm="sha256", sent_body=body[:-1] + b" }"), 1003),
                (nx_request(sim, body, ts=stale), 1004),
                (nx_request(sim, body, ts=str(int((time.time() + 61) * 1000))), 1004),
                (nx_request(sim, body, ts="soon"), 1002),
                (nx_request(sim, body, biz="1"), 1002),
                (nx_request(sim, body, action="send"), 1002),
                (nx_request(sim, nx_body(2, app_key="otherApp")), 13002),
                (nx_request(sim, b"[1, 2]"), 1002),
            ]
            for req, code in cases:
                r = await client.send(req)
                assert r.status_code == 200 and r.json()["code"] == code, (code, r.text)
                assert list(r.json()) == ["code", "message", "data"] and r.json()["data"] is None
            assert sim.accepted == 0
            assert sim.stats()["rejected"]["nxcloud.1003"] == 4
        async with running(tmp_path, check_time=False) as (sim, client):
            assert (await client.send(nx_request(sim, body, ts=stale))).json()["code"] == 0

    async def test_200_items_accepted_201_rejected(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            ok = (await client.send(nx_request(sim, nx_body(200)))).json()
            assert ok["code"] == 0 and len(ok["data"]) == 200
            over = (await client.send(nx_request(sim, nx_body(201, first=1000)))).json()
            assert over["code"] == 9000 and sim.accepted == 200
            for body in (b'{"appKey":"yourAppKey","items":[]}', b'{"appKey":"yourAppKey"}',
                         b'{"appKey":"yourAppKey","items":["x"]}', nx_body(1, sysMessageId="short")):
                assert (await client.send(nx_request(sim, body))).json()["code"] == 9000

    async def test_seed_error_examples_exactly(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            for body, name in [(nx_body(2, app_key="otherApp"), "003_nxcloud_app_error.json"),
                               (b'{"appKey":"yourAppKey","items":[]}', "003_nxcloud_parameter_error.json")]:
                r = await client.send(nx_request(sim, body))
                seed = orjson.loads((FIXTURES / name).read_bytes())
                assert list(r.json().items()) == list(seed.items())  # same fields, values and order

    async def test_bad_numbers_get_failure_items_and_are_never_recorded(self, tmp_path: Path) -> None:
        cfg = SimulatorConfig(bad_number_rate=0.3)
        good = [n for n in (f"86150{i:08d}" for i in range(40)) if not cfg.is_bad_number(n)][:3]
        bad = [n for n in (f"86150{i:08d}" for i in range(40)) if cfg.is_bad_number(n)][:2]
        phones = [good[0], bad[0], "+8615000000002", good[1], bad[1], good[2]]
        items = [{"phone": p, "content": "hi", "sysMessageId": f"seed-msg-{i:03d}"}
                 for i, p in enumerate(phones)]
        body = orjson.dumps({"appKey": APP_KEY, "items": items})
        async with running(tmp_path, bad_number_rate=0.3) as (sim, client):
            data = (await client.send(nx_request(sim, body))).json()
            assert (data["code"], data["message"]) == (0, "Success")
            failure = {"status": "Failure", "message": "Incorrect phone number format"}
            success = {"status": "Success"}
            assert data["data"] == [  # the seed's 部分失败示例 shape
                {"phone": p, "messageid": f"seed-msg-{i:03d}"} | (success if p in good else failure)
                for i, p in enumerate(phones)
            ]
            assert sim.accepted == 3
        assert [x["phone"] for x in receipts(tmp_path / "receipts.jsonl")] == good

    async def test_refusing_bad_numbers_refuses_the_whole_call(self, tmp_path: Path) -> None:
        cfg = SimulatorConfig(bad_number_rate=0.3)
        numbers = [f"86150{i:08d}" for i in range(40)]
        bad = next(n for n in numbers if cfg.is_bad_number(n))
        good = [n for n in numbers if not cfg.is_bad_number(n)][:4]
        def call(phones: list[str]) -> bytes:
            return orjson.dumps({"appKey": APP_KEY, "items": [{"phone": p, "content": "hi"} for p in phones]})
        async with running(tmp_path, bad_number_rate=0.3, nxcloud_refuse_bad_numbers=True) as (sim, client):
            r = (await client.send(nx_request(sim, call([good[0], bad, good[1]])))).json()
            assert r == {"code": 13005, "message": "Incorrect phone number format", "data": None}
            assert (await nx_code(client, nx_request(sim, call(["12", good[2]])))) == 13005  # malformed too
            assert (await nx_code(client, nx_request(sim, call(good[2:4])))) == 0
            assert sim.accepted == 2
        assert [x["phone"] for x in receipts(tmp_path / "receipts.jsonl")] == good[2:4]

    @pytest.mark.parametrize(("item", "code"), [
        ({"content": "x" * 1001}, 13001), ({"content": ""}, 13009), ({"content": None}, 13009),
        ({"sourceAddress": "has space"}, 13006), ({"sourceAddress": "x" * 21}, 13006)])
    async def test_request_refusals(self, tmp_path: Path, item: dict[str, Any], code: int) -> None:
        items = [{"phone": "8615000000001", "content": "fine", "sourceAddress": "Acme"},
                 {"phone": "8615000000002", "content": "fine", **item}]
        async with running(tmp_path) as (sim, client):
            r = (await client.send(nx_request(sim, orjson.dumps({"appKey": APP_KEY, "items": items})))).json()
            assert (r["code"], r["data"]) == (code, None) and sim.accepted == 0
            ok = orjson.dumps({"appKey": APP_KEY, "items": [
                {"phone": "8615000000001", "content": "x" * 1000, "sourceAddress": "A" * 20}]})
            assert (await nx_code(client, nx_request(sim, ok))) == 0

    async def test_hourly_limit_per_number(self, tmp_path: Path) -> None:
        clock = FakeClock(1_700_000_000.0)
        def call(*phones: str) -> bytes:
            return orjson.dumps({"appKey": APP_KEY, "items": [{"phone": p, "content": "hi"} for p in phones]})
        a, b = "8615000000001", "8615000000002"
        limited = {"nxcloud_number_hourly_limit": 2, "clock": clock, "check_time": False}
        async with running(tmp_path, **limited) as (sim, client):
            assert await nx_code(client, nx_request(sim, call(a, b))) == 0
            assert await nx_code(client, nx_request(sim, call(a, a))) == 13007  # a: 3 in the hour
            assert await nx_code(client, nx_request(sim, call(a, b))) == 0  # a: 2 in the hour
            r = (await client.send(nx_request(sim, call(b, a)))).json()
            assert r == {"code": 13007, "message": "Rate limit exceeded (5 messages per hour)", "data": None}
            clock.t += 3600.5
            assert await nx_code(client, nx_request(sim, call(a, a))) == 0
            assert sim.accepted == 6
        async with running(tmp_path) as (sim, client):  # off by default
            codes = [await nx_code(client, nx_request(sim, call(a))) for _ in range(7)]
            assert codes == [0] * 7

    async def test_tps_limit(self, tmp_path: Path) -> None:
        mono = FakeClock(500.5)
        async with running(tmp_path, nxcloud_tps=2, qps=1000, monotonic=mono) as (sim, client):
            codes = [await nx_code(client, nx_request(sim, nx_body(1, first=i))) for i in range(3)]
            assert codes == [0, 0, 13008] and sim.stats()["throttled"] == 1
            r = await client.send(nx_request(sim, nx_body(1, first=9)))
            assert r.json()["code"] == 13008 and r.headers["retry-after"] == "1"
            mono.t = 501.0
            assert (await client.send(nx_request(sim, nx_body(1, first=10)))).json()["code"] == 0
        async with running(tmp_path, qps=1, monotonic=FakeClock(5.0)) as (sim, client):  # None: qps
            codes = [await nx_code(client, nx_request(sim, nx_body(1, first=i))) for i in range(2)]
            assert codes == [0, 13008]


@pytest.mark.anyio
class TestNxcloudRecord:
    async def test_record_query(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            await client.send(nx_request(sim, D5_BODY))
            url = f"{sim.base_url}/api/sms/get"
            form = {"appkey": APP_KEY, "secretkey": APP_SECRET, "messageid": "order-000000002",
                    "date": beijing_day()}
            found = (await client.post(url, data=form)).json()
            assert found["code"] == "0"
            row = found["row"]
            assert (row["msgid"], row["phone"], row["dr"], row["body"]) == (
                "order-000000002", "8615088888889", "DELIVRD", "Your code is 5678")
            assert {"dr_status", "dr_time", "billing_size", "billing_price", "billing_status"} <= set(row)
            assert (await client.post(url, data={**form, "messageid": "order-999999999"})).json() == {
                "code": "0", "row": None}
            yesterday = beijing_day(time.time() - 86_400)
            assert (await client.post(url, data={**form, "date": yesterday})).json()["row"] is None
            assert (await client.post(url, data={**form, "secretkey": "x"})).json()["code"] == "2"
            assert (await client.post(url, data={**form, "date": "2024-1-1"})).json()["code"] == "1"
            assert (await client.post(url, data={"appkey": APP_KEY})).json()["code"] == "1"
            old = beijing_day(time.time() - 40 * 86_400)
            assert (await client.post(url, data={**form, "date": old})).json()["code"] == "3"


# -- faults, routing, stats, configuration -----------------------------------------------------------------
def submail_send(sim: Simulator, n: int = 3) -> httpx.Request:
    p = submail_params("batchsend", {"to": ",".join(numbers(n)), "content": "【Acme】hi"})
    return submail_post(sim, "batchsend", p)


@pytest.mark.anyio
class TestFaults:
    @pytest.mark.parametrize(("kind", "status"), [("http500", 500), ("http503", 503), ("throttle", 429)])
    async def test_submail_answered_faults(self, tmp_path: Path, kind: str, status: int) -> None:
        async with running(tmp_path, fault_rates={kind: 1.0}) as (sim, client):
            r = await client.send(submail_send(sim))
            assert r.status_code == status and r.json()["status"] == "error"
            assert ("retry-after" in r.headers) == (kind == "throttle")
            assert sim.stats()["faults"] == {kind: 1} and sim.accepted == 0
            ts = await client.get(f"{sim.base_url}/service/timestamp")  # not a send: no fault
            assert ts.status_code == 200

    @pytest.mark.parametrize(("kind", "status", "code"), [
        ("http500", 500, 500), ("http503", 503, 503), ("throttle", 200, 13008)])
    async def test_nxcloud_answered_faults(self, tmp_path: Path, kind: str, status: int, code: int) -> None:
        async with running(tmp_path, fault_rates={kind: 1.0}) as (sim, client):
            r = await client.send(nx_request(sim, nx_body(3)))
            assert (r.status_code, r.json()["code"]) == (status, code)
            assert sim.stats()["faults"] == {kind: 1} and sim.accepted == 0

    async def test_business_errors(self, tmp_path: Path) -> None:
        async with running(tmp_path, fault_rates={"business_error": 1.0}) as (sim, client):
            r = await client.send(submail_send(sim))
            assert (r.status_code, r.json()["code"]) == (400, "252")
            m = submail_params("multisend", {"content": "【Acme】hi", "multi": C4_MULTI})
            entries = (await client.send(submail_post(sim, "multisend", m))).json()
            assert [(e["status"], e["code"]) for e in entries] == [("error", 252)] * 2
            data = (await client.send(nx_request(sim, nx_body(3)))).json()
            assert data["code"] == 0
            assert [(d["status"], d["message"]) for d in data["data"]] == [
                ("Failure", "Incorrect phone number format")] * 3
            assert sim.accepted == 0 and sim.stats()["faults"] == {"business_error": 3}
        assert receipts(tmp_path / "receipts.jsonl") == []
        refuse = {"fault_rates": {"business_error": 1.0}, "nxcloud_business_error_code": 1102}
        async with running(tmp_path, **refuse) as (sim, client):
            r = (await client.send(nx_request(sim, nx_body(3)))).json()
            assert r == {"code": 1102, "message": "Insufficient balance", "data": None} and sim.accepted == 0

    @pytest.mark.parametrize("provider", ["submail", "nxcloud"])
    @pytest.mark.parametrize(("kind", "recorded"), [("drop_before", 0), ("drop_after", 3), ("reset", 3)])
    async def test_connection_faults(self, tmp_path: Path, provider: str, kind: str, recorded: int) -> None:
        async with running(tmp_path, fault_rates={kind: 1.0}) as (sim, client):
            req = submail_send(sim) if provider == "submail" else nx_request(sim, nx_body(3))
            with pytest.raises(TRANSPORT_ERRORS):
                await client.send(req)
            assert sim.stats()["faults"] == {kind: 1} and sim.accepted == recorded
        assert len(receipts(tmp_path / "receipts.jsonl")) == recorded

    @pytest.mark.parametrize("provider", ["submail", "nxcloud"])
    async def test_garbage_and_slow(self, tmp_path: Path, provider: str) -> None:
        async with running(tmp_path, fault_rates={"garbage": 1.0}) as (sim, client):
            req = submail_send(sim) if provider == "submail" else nx_request(sim, nx_body(3))
            r = await client.send(req)
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(r.content)
            assert r.status_code == 200 and sim.accepted == 3
        async with running(tmp_path, fault_rates={"slow": 1.0}, slow_ms=5_000) as (sim, _):
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as client:
                req = submail_send(sim) if provider == "submail" else nx_request(sim, nx_body(3, first=50))
                with pytest.raises(httpx.ReadTimeout):
                    await client.send(req)
            assert sim.accepted == 3

    async def test_submail_qps_and_hot_numbers_off_by_default(self, tmp_path: Path) -> None:
        async with running(tmp_path, submail_qps=1, monotonic=FakeClock(7.5)) as (sim, client):
            assert (await client.send(submail_send(sim))).status_code == 200
            r = await client.send(submail_send(sim))
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert sim.stats()["throttled"] == 1


@pytest.mark.anyio
class TestRouting:
    async def test_one_port_three_providers(self, tmp_path: Path) -> None:
        async with running(tmp_path) as (sim, client):
            aliyun = AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_1", endpoint=sim.base_url)
            msgs = [Message(1, "k1", "8613900000001", {"code": "1"}, "Acme")]
            r = await client.send(aliyun.build_request(Batch(1, msgs, out_id="a-1")))
            assert r.json()["Code"] == "OK"
            assert (await client.send(submail_send(sim, 2))).json()["status"] == "success"
            assert (await client.send(nx_request(sim, nx_body(3)))).json()["code"] == 0
            assert (await client.post(f"{sim.base_url}/sms/batchsend.xml")).status_code == 404
            assert (await client.get(f"{sim.base_url}/sms/batchsend")).status_code == 405
            assert (await client.get(f"{sim.base_url}/v1/sms/multi/mt")).status_code == 405
            stats = (await client.get(f"{sim.base_url}/__stats")).json()
            assert stats["accepted_recipients"] == 6 and stats["accepted_requests"] == 3
            assert stats["actions"] == {"SendBatchSms": 1, "submail.batchsend": 2, "nxcloud.mt": 2}
            peaks = stats["peak_1s"]  # per account: access key id, appid, accessKey
            assert len(peaks) == 3 and "" not in peaks
            counts = sorted((p["requests"], p["recipients"]) for p in peaks.values())
            assert counts == [(1, 1), (1, 2), (1, 3)]
        lines = receipts(tmp_path / "receipts.jsonl")
        assert [x.get("provider") for x in lines] == [None, "submail", "submail", *["nxcloud"] * 3]

    async def test_verification_off(self, tmp_path: Path) -> None:
        async with running(tmp_path, verify=False, check_time=False) as (sim, client):
            p = {"appid": "anyone", "to": "13800000001", "content": "【Acme】hi", "signature": "x"}
            assert (await client.send(submail_post(sim, "batchsend", p))).json()["status"] == "success"
            r = await client.send(nx_request(sim, nx_body(1, app_key="whatever"), ak="who", secret="what"))
            assert r.json()["code"] == 0


class TestConfig:
    def test_default_credentials_from_env(self) -> None:
        assert default_submail_apps({}) == (SUBMAIL_TEST_APP,)
        assert default_submail_apps({"SUBMAIL_APPID": "7", "SUBMAIL_APPKEY": "k"}) == (SubmailApp("7", "k"),)
        assert default_submail_apps({"SUBMAIL_APPID": "7"}) == (SUBMAIL_TEST_APP,)
        assert SUBMAIL_TEST_APP == SubmailApp(APPID, APPKEY)
        assert default_nxcloud_accounts({}) == (NXCLOUD_TEST_ACCOUNT,)
        env = {"NXCLOUD_ACCESS_KEY": "a", "NXCLOUD_ACCESS_SECRET": "s", "NXCLOUD_APP_KEY": "k"}
        assert default_nxcloud_accounts(env) == (NxcloudAccount("a", "s", "k", APP_SECRET),)
        assert default_nxcloud_accounts({**env, "NXCLOUD_APP_SECRET": "z"})[0].app_secret == "z"
        assert NXCLOUD_TEST_ACCOUNT == NxcloudAccount(AK, SECRET, APP_KEY, APP_SECRET)
        assert "abc" not in repr(NXCLOUD_TEST_ACCOUNT) and APPKEY not in repr(SUBMAIL_TEST_APP)
        with pytest.raises(ValueError, match="negative"):
            SimulatorConfig(submail_log_interval_s=-1)

    def test_parser_builds_the_config(self) -> None:
        from providers.simulator.__main__ import build_parser, config_from_args

        argv = ["--submail-hot-numbers", "13800000001, 13800000002", "--submail-log-interval", "0",
                "--submail-qps", "3", "--nxcloud-tps", "9", "--nxcloud-refuse-bad-numbers",
                "--nxcloud-number-hourly-limit", "5"]
        cfg = config_from_args(build_parser().parse_args(argv))
        assert cfg.nxcloud_refuse_bad_numbers and cfg.nxcloud_number_hourly_limit == 5
        assert cfg.submail_hot_numbers == frozenset({"13800000001", "13800000002"})
        assert (cfg.submail_log_interval_s, cfg.submail_qps, cfg.nxcloud_tps) == (0.0, 3, 9)
        default = config_from_args(build_parser().parse_args([]))
        assert (default.submail_hot_numbers, default.submail_log_interval_s, default.nxcloud_tps) == (
            frozenset(), 60.0, None)
        assert (default.nxcloud_refuse_bad_numbers, default.nxcloud_number_hourly_limit) == (False, 0)
