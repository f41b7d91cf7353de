"""The one dispatch path: the dispatcher sends every request through ``send(WireRequest, timeout)``,
the seam ``HttpTransport`` implements in production; tests put a fake there (or an httpx
transport, adapted behind the same seam). A request header the wire cannot carry is a bug
reported when the provider builds the request: before the intent line."""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from pipeline.dispatch import Dispatcher, RetryPolicy
from pipeline.ledger import LedgerWriter
from pipeline.limit import RateGovernor
from pipeline.transport import HttpTransport, HttpxWireTransport, wire_transport
from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, BatchOutcome, Message, Response, WireRequest, WireResponse


class FakeWire:
    """A transport at the production seam: records what it was given, answers Aliyun's success."""

    def __init__(self) -> None:
        self.requests: list[tuple[WireRequest, httpx.Timeout]] = []

    async def send(self, request: WireRequest, timeouts: httpx.Timeout) -> Response:
        self.requests.append((request, timeouts))
        body = orjson.dumps({"Code": "OK", "Message": "OK", "BizId": f"{len(self.requests)}^0"})
        return WireResponse(200, [(b"Content-Type", b"application/json")], body)


class BadHeaderAliyun(AliyunSms):
    def build_wire(self, batch: Batch) -> WireRequest:
        good = super().build_wire(batch)
        return WireRequest(
            good.method, good.url, [*good.headers, ("x-acs-note", "a\r\nInjected: 1")], good.content
        )


def messages(n: int, start: int = 0) -> list[Message]:
    return [
        Message(
            row=start + i,
            key=f"k{start + i}",
            phone=f"86139{start + i:08d}",
            params={"code": "1"},
            sign_name="S",
        )
        for i in range(n)
    ]


def run_batches(tmp: Path, provider: AliyunSms, transport: object, batches: int = 3) -> Path:
    ledger = tmp / "ledger.jsonl"
    writer = LedgerWriter(ledger)
    fatal: list[BatchOutcome] = []
    dispatcher = Dispatcher(
        provider=provider,
        transport=transport,  # type: ignore[arg-type]
        timeout=httpx.Timeout(3.0),
        ledger=writer,
        governor=RateGovernor(1e6),
        policy=RetryPolicy(),
        run_id="run",
        on_fatal=fatal.append,
        batch_ids=itertools.count(batches + 1).__next__,
    )

    async def main() -> None:
        for i in range(batches):
            await dispatcher.send(Batch(i + 1, messages(10, 10 * i)))

    try:
        anyio.run(main)
    finally:
        writer.close()
    assert not fatal
    return ledger


def aliyun(cls: type[AliyunSms] = AliyunSms) -> AliyunSms:
    return cls(credentials=TEST_CREDENTIALS, template_code="SMS_1", endpoint="http://gw.test")


def test_a_fake_at_the_production_seam_gets_the_wire_requests(tmp_path: Path) -> None:
    fake = FakeWire()
    ledger = run_batches(tmp_path, aliyun(), fake)
    assert len(fake.requests) == 3
    request, timeouts = fake.requests[0]
    assert request.method == "POST" and request.url.startswith("http://gw.test")
    assert timeouts.read == 3.0
    lines = [orjson.loads(line) for line in ledger.read_bytes().splitlines()]
    assert sorted(x["r"] for x in lines if "r" in x and x.get("s") == "sent") == list(range(30))


def test_httpx_transports_are_adapted_behind_the_same_seam() -> None:
    production = HttpTransport()
    assert wire_transport(production) is production  # nothing between the dispatcher and it
    fake = FakeWire()
    assert wire_transport(fake) is fake
    mock = httpx.MockTransport(lambda r: httpx.Response(200))
    adapted = wire_transport(mock)
    assert isinstance(adapted, HttpxWireTransport) and adapted.transport is mock


def test_a_header_the_wire_cannot_carry_is_a_bug_before_the_intent_line(tmp_path: Path) -> None:
    fake = FakeWire()
    with pytest.raises(ValueError, match="x-acs-note") as info:
        run_batches(tmp_path, aliyun(BadHeaderAliyun), fake, batches=1)
    assert "Injected" not in str(info.value)  # the value is not echoed (it could be a credential)
    assert fake.requests == []
    assert b'"i"' not in (tmp_path / "ledger.jsonl").read_bytes()  # no intent written


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-a", "a\nb"), ("x-a", "a\x00b"), ("x-a", "中文"), ("x a", "b"), ("x-a:", "b")],
)
def test_wire_request_refuses_what_http_cannot_carry(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        WireRequest("POST", "http://gw.test/", [(name, value)])
    WireRequest("POST", "http://gw.test/?a=%20", [("x-a", "ok; é latin-1")])  # a legal one passes
