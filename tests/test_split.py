"""Splitting a call refused because of some of its recipients (pipeline/dispatch.py, Outcome.SPLIT).

Unit level: the real dispatcher, ledger and provider modules against an httpx.MockTransport
gateway that refuses any call holding a bad number, as the simulator does.
"""

from __future__ import annotations

import itertools
import math
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.app.campaign import parse_campaign
from pipeline.dispatch import Dispatcher, RetryPolicy
from pipeline.errors import CampaignError
from pipeline.ledger import LedgerWriter, Status, replay
from pipeline.limit import RateGovernor
from providers.aliyun import CODE_CLASSES as ALIYUN_CLASSES
from providers.aliyun import SPLIT_CODES, TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, BatchOutcome, Message, Outcome, Provider
from providers.simulator.config import SimulatorConfig
from providers.submail import SPLIT_CODES as SUBMAIL_SPLIT_CODES
from providers.submail import SubmailCredentials, SubmailSms
from tests.helpers import final_statuses, sluice, write_campaign, write_recipients
from tests.test_simulator_submail_nxcloud import receipts, running, submail_params, submail_post

ILLEGAL = "isv.MOBILE_NUMBER_ILLEGAL"


def messages(n: int, first: int = 1) -> list[Message]:
    return [Message(i, f"k{i}", f"86139{i:08d}", {"code": "1234"}, "Acme") for i in range(first, first + n)]


class Gateway:
    """Refuses a whole call holding a bad number with ``code``; otherwise accepts every number."""

    def __init__(self, bad: Iterable[str], code: str = ILLEGAL, fail_on: int | None = None) -> None:
        self.bad = frozenset(bad)
        self.code = code
        self.fail_on = fail_on  # this request (1-based) is refused with isv.AMOUNT_NOT_ENOUGH
        self.accepted: Counter[str] = Counter()
        self.calls: list[list[str]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        form = dict(urllib.parse.parse_qsl(request.content.decode()))
        phones: list[str] = orjson.loads(form["PhoneNumberJson"])
        self.calls.append(phones)
        if len(self.calls) == self.fail_on:
            return httpx.Response(200, json={"Code": "isv.AMOUNT_NOT_ENOUGH", "Message": "no balance"})
        if any(p in self.bad for p in phones):
            return httpx.Response(200, json={"Code": self.code, "Message": "refused", "RequestId": "R"})
        self.accepted.update(phones)
        return httpx.Response(200, json={"Code": "OK", "Message": "OK", "BizId": f"{len(self.calls)}^0"})


class CountingGovernor(RateGovernor):
    def __init__(self) -> None:
        super().__init__(1e6)
        self.acquired = 0

    async def acquire(self, recipients: int = 1) -> None:
        self.acquired += 1
        await super().acquire(recipients)


def aliyun() -> AliyunSms:
    return AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_1", endpoint="http://gw.test")


def dispatch(
    tmp: Path,
    batches: list[list[Message]],
    handler: Callable[[httpx.Request], httpx.Response],
    *,
    provider: Provider | None = None,
    on_refusal: str = "split",
    workers: int = 1,
) -> tuple[Dispatcher, CountingGovernor, Path]:
    """Send ``batches`` (ids 1..n) through a real Dispatcher and ledger; returns them and the ledger."""
    ledger_path = tmp / "ledger.jsonl"
    ledger_path.unlink(missing_ok=True)
    writer = LedgerWriter(ledger_path)
    governor = CountingGovernor()
    ids = itertools.count(len(batches) + 1)
    fatal: list[BatchOutcome] = []

    def on_fatal(result: BatchOutcome) -> None:
        fatal.append(result)
        dispatcher.stopping = True

    dispatcher = Dispatcher(
        provider=provider or aliyun(),
        transport=httpx.MockTransport(handler),
        timeout=httpx.Timeout(5.0),
        ledger=writer,
        governor=governor,
        policy=RetryPolicy(),
        run_id="run",
        on_fatal=on_fatal,
        batch_ids=ids.__next__,
        on_refusal=on_refusal,
    )
    queue = [Batch(i, m) for i, m in enumerate(batches, 1)]

    async def worker() -> None:
        while queue:
            await dispatcher.send(queue.pop(0))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)

    anyio.run(main)
    writer.close()
    return dispatcher, governor, ledger_path


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def recipient_codes(path: Path) -> dict[int, str | None]:
    return {x["r"]: x.get("c") for x in ledger_lines(path) if "r" in x and "s" in x}


def request_bound(n: int, bad: int) -> int:
    """The refused call, then per recipient at fault: a request per halving, its own, one for the rest."""
    return 1 + bad * (math.ceil(math.log2(n)) + 2) if bad else 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 100).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_every_layout_of_bad_recipients(tmp_path: Path, layout: tuple[int, set[int]]) -> None:
    n, bad_at = layout
    msgs = messages(n)
    bad = {msgs[i].phone[2:] for i in bad_at}
    gw = Gateway(bad)
    dispatcher, governor, ledger = dispatch(tmp_path, [msgs], gw.handler)
    statuses = final_statuses(ledger)
    codes = recipient_codes(ledger)
    for i, m in enumerate(msgs):
        if i in bad_at:
            assert (statuses[m.row], codes[m.row], gw.accepted[m.phone[2:]]) == ("failed", ILLEGAL, 0)
        else:
            assert (statuses[m.row], gw.accepted[m.phone[2:]]) == ("sent", 1)
    # Every recipient failed was refused in a call of its own.
    assert {call[0] for call in gw.calls if len(call) == 1 and call[0] in bad} == bad
    assert dispatcher.requests == len(gw.calls) == governor.acquired  # each part through the limiter
    assert dispatcher.requests <= request_bound(n, len(bad))
    assert dispatcher.split_requests == dispatcher.requests - 1
    assert (dispatcher.splits > 0) == (len(bad) > 0 and n > 1)
    # The ledger replays to the same: nothing in flight, nothing pending.
    state = replay(ledger)
    assert state.counts()["inflight"] == 0
    assert {state.get(m.row) for m in msgs} <= {Status.SENT, Status.FAILED}


def test_parts_are_batches_of_their_own(tmp_path: Path) -> None:
    msgs = messages(100)
    gw = Gateway({msgs[37].phone[2:]})
    dispatcher, _, ledger = dispatch(tmp_path, [msgs], gw.handler)
    lines = ledger_lines(ledger)
    intents = [x for x in lines if "i" in x]
    assert intents[0]["i"] == 1 and "p" not in intents[0]
    parts = intents[1:]
    assert parts and all(x["p"] == 1 or x["p"] in {y["i"] for y in parts} for x in parts)
    assert len({x["i"] for x in intents}) == len(intents)  # batch ids unique in the run
    assert len({x["o"] for x in intents}) == len(intents)  # out ids too
    assert [x["s"] for x in lines if x.get("b") == 1] == ["split"]
    assert dispatcher.requests == len(intents) == 1 + dispatcher.split_requests
    # One bad number in 100 costs about 9 requests more, not 100.
    assert dispatcher.split_requests <= 9


def test_fail_batch_keeps_the_old_reading(tmp_path: Path) -> None:
    msgs = messages(100)
    gw = Gateway({msgs[5].phone[2:]})
    dispatcher, _, ledger = dispatch(tmp_path, [msgs], gw.handler, on_refusal="fail-batch")
    assert dispatcher.requests == 1 and dispatcher.splits == 0
    assert set(final_statuses(ledger).values()) == {"failed"}
    assert set(recipient_codes(ledger).values()) == {ILLEGAL}
    assert not gw.accepted


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="on_refusal"):
        Dispatcher(
            provider=aliyun(),
            transport=httpx.MockTransport(lambda r: httpx.Response(200)),
            timeout=httpx.Timeout(1.0),
            ledger=None,  # type: ignore[arg-type]
            governor=RateGovernor(1),
            policy=RetryPolicy(),
            run_id="r",
            on_fatal=lambda r: None,
            batch_ids=itertools.count().__next__,
            on_refusal="halve",
        )


def test_frequency_limited_number_is_deferred_alone(tmp_path: Path) -> None:
    msgs = messages(20)
    gw = Gateway({msgs[3].phone[2:]}, code="isv.BUSINESS_LIMIT_CONTROL")
    _, _, ledger = dispatch(tmp_path, [msgs], gw.handler)
    statuses = final_statuses(ledger)
    assert statuses[msgs[3].row] == "deferred"
    assert Counter(statuses.values()) == {"sent": 19, "deferred": 1}
    # The old reading defers the whole batch, as before.
    again = Gateway({msgs[3].phone[2:]}, code="isv.BUSINESS_LIMIT_CONTROL")
    _, _, ledger = dispatch(tmp_path, [msgs], again.handler, on_refusal="fail-batch")
    assert set(final_statuses(ledger).values()) == {"deferred"}


def test_a_stop_mid_split_leaves_the_rest_pending(tmp_path: Path) -> None:
    msgs = messages(100)
    gw = Gateway({msgs[99].phone[2:]}, fail_on=3)  # the third request: balance gone, the run stops
    dispatcher, _, ledger = dispatch(tmp_path, [msgs], gw.handler)
    assert dispatcher.stopping and dispatcher.requests == 3
    state = replay(ledger)
    sent = {m.row for m in msgs if m.phone[2:] in gw.accepted}
    assert len(sent) == 50  # the first half; the next part (a quarter) met the stop
    for m in msgs:
        assert state.get(m.row) is (Status.SENT if m.row in sent else Status.PENDING), m.row


def test_a_crash_at_any_line_of_a_split_resumes_without_loss(tmp_path: Path) -> None:
    """Replay every prefix of a split's ledger (a kill after each line): a row is in flight only
    while a request holding it is open, every sent row stays sent, and nothing else is settled."""
    msgs = messages(100)
    bad = {msgs[i].phone[2:] for i in (3, 40, 41, 90)}
    _, _, ledger = dispatch(tmp_path, [msgs], Gateway(bad).handler)
    lines = ledger.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    for k in range(len(lines) + 1):
        cut.write_bytes(b"".join(lines[:k]))
        state = replay(cut)
        open_rows: set[int] = set()
        settled: dict[int, str] = {}
        for x in map(orjson.loads, lines[:k]):
            if "i" in x:
                open_rows = set(x["r"])  # one worker: one request open at a time
            elif "b" in x and x["s"] in ("split", "retry", "fatal"):
                open_rows = set()  # provably not processed: pending again (else: their lines follow)
            elif "r" in x:
                settled[x["r"]] = x["s"]
        for m in msgs:
            want = {"sent": Status.SENT, "failed": Status.FAILED}.get(settled.get(m.row, ""))
            if want is None:
                want = Status.INFLIGHT if m.row in open_rows else Status.PENDING
            assert state.get(m.row) is want, (k, m.row)


def test_concurrent_workers_share_the_run_ids(tmp_path: Path) -> None:
    cfg = SimulatorConfig(bad_number_rate=0.03)
    batches = [messages(100, first=1 + 100 * b) for b in range(20)]
    bad = {m.phone[2:] for batch in batches for m in batch if cfg.is_bad_number(m.phone)}
    gw = Gateway(bad)
    dispatcher, _, ledger = dispatch(tmp_path, batches, gw.handler, workers=4)
    intents = [x for x in ledger_lines(ledger) if "i" in x]
    assert len({x["i"] for x in intents}) == len(intents) == dispatcher.requests
    statuses = final_statuses(ledger)
    assert Counter(statuses.values()) == {"sent": 2000 - len(bad), "failed": len(bad)}
    assert all(gw.accepted[m.phone[2:]] == (m.phone[2:] not in bad) for b in batches for m in b)


def test_submail_batchsend_whole_refusal_is_split(tmp_path: Path) -> None:
    content = "【Acme】Spring sale"
    msgs = [Message(i, f"k{i}", f"86138{i:08d}", {}, "Acme", content) for i in range(1, 41)]
    bad = {"13800000007", "13800000031"}
    accepted: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        to = dict(urllib.parse.parse_qsl(request.content.decode()))["to"].split(",")
        if bad & set(to):
            return httpx.Response(400, json={"status": "error", "code": "252", "msg": "bad address"})
        accepted.update(to)
        entries = [{"status": "success", "to": t, "send_id": f"s{t}", "fee": 1} for t in to]
        return httpx.Response(200, json={"status": "success", "batchlist": "B", "responses": entries})

    sub = SubmailSms(
        credentials=SubmailCredentials("10001", "k" * 32), mode="batchsend", endpoint="http://gw.test"
    )
    dispatcher, _, ledger = dispatch(tmp_path, [msgs], handler, provider=sub)
    statuses = final_statuses(ledger)
    codes = recipient_codes(ledger)
    for m in msgs:
        if m.phone[2:] in bad:
            assert (statuses[m.row], codes[m.row], accepted[m.phone[2:]]) == ("failed", "252", 0)
        else:
            assert (statuses[m.row], accepted[m.phone[2:]]) == ("sent", 1)
    assert dispatcher.splits >= 1


@pytest.mark.parametrize("code", sorted(SPLIT_CODES))
def test_aliyun_refusal_codes(code: str) -> None:
    body = httpx.Response(200, json={"Code": code, "Message": "m", "RequestId": "R"})
    many = aliyun().parse_response(Batch(1, messages(2)), body)
    assert (many.outcome, many.code, many.extra["alone"]) == (Outcome.SPLIT, code, ALIYUN_CLASSES[code])
    alone = aliyun().parse_response(Batch(1, messages(1)), body).outcome
    assert alone is (Outcome.DEFER if code == "isv.BUSINESS_LIMIT_CONTROL" else Outcome.FAILED)


def test_split_codes_are_the_documented_ones() -> None:
    assert SPLIT_CODES == {
        "isv.MOBILE_NUMBER_ILLEGAL", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED", "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.SMS_CONTENT_ILLEGAL", "isv.TEMPLATE_PARAMS_ILLEGAL", "isv.PARAM_NOT_SUPPORT_URL",
        "isv.PARAM_LENGTH_LIMIT", "isv.BUSINESS_LIMIT_CONTROL",
    }  # fmt: skip
    assert SUBMAIL_SPLIT_CODES == {"114", "253", "251", "252", "408", "405", "115"}


def test_measure_1000_batches_of_100_at_1_percent(tmp_path: Path) -> None:
    """The figure for the issue note: 1 000 batches of 100, 1 % bad numbers (the simulator's draw)."""
    cfg = SimulatorConfig(bad_number_rate=0.01)
    batches = [messages(100, first=1 + 100 * b) for b in range(1000)]
    bad = {m.phone[2:] for batch in batches for m in batch if cfg.is_bad_number(m.phone)}
    gw = Gateway(bad)
    dispatcher, _, ledger = dispatch(tmp_path, batches, gw.handler, workers=8)
    statuses = Counter(final_statuses(ledger).values())
    assert statuses == {"sent": 100_000 - len(bad), "failed": len(bad)}
    refused = sum(any(m.phone[2:] in bad for m in batch) for batch in batches)
    print(
        f"\n1000 batches of 100, {len(bad)} bad numbers, {refused} batches refused: "
        f"{dispatcher.requests} requests ({dispatcher.splits} splits, {dispatcher.split_requests} for parts)"
    )
    assert dispatcher.splits >= refused  # every refused call of several, parts included
    first_refusals = [x for x in ledger_lines(ledger) if x.get("s") == "split" and x["b"] <= 1000]
    assert len(first_refusals) == refused
    assert dispatcher.requests <= 1000 + 9 * len(bad)


# -- the simulator refuses a call holding a bad number ---------------------------------------------
def bad_and_good(cfg: SimulatorConfig, prefix: str, n_bad: int, n_good: int) -> tuple[list[str], list[str]]:
    bad: list[str] = []
    good: list[str] = []
    for i in itertools.count():
        number = f"{prefix}{i:08d}"
        (bad if cfg.is_bad_number(number) else good).append(number)
        if len(bad) >= n_bad and len(good) >= n_good:
            return bad[:n_bad], good[:n_good]
    raise AssertionError("unreachable")


@pytest.mark.anyio
class TestSimulator:
    async def test_aliyun_refuses_the_whole_call(self, tmp_path: Path) -> None:
        cfg = SimulatorConfig(bad_number_rate=0.05)
        (bad,), good = bad_and_good(cfg, "139", 1, 5)
        async with running(tmp_path, bad_number_rate=0.05) as (sim, client):
            sms = AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_1", endpoint=sim.base_url)
            mixed = [
                Message(i, str(i), f"86{p}", {}, "Acme") for i, p in enumerate([*good[:3], bad, good[3]])
            ]
            r = await client.send(sms.build_request(Batch(1, mixed, out_id="o-1")))
            assert (r.status_code, r.json()["Code"]) == (200, ILLEGAL)
            assert bad not in r.text  # the answer does not say which number
            assert sms.parse_response(Batch(1, mixed), r).outcome is Outcome.SPLIT
            alone = [Message(9, "9", f"86{bad}", {}, "Acme")]
            r = await client.send(sms.build_request(Batch(2, alone, out_id="o-2")))
            assert sms.parse_response(Batch(2, alone), r).outcome is Outcome.FAILED
            r = await client.send(sms.build_request(Batch(3, mixed[:3], out_id="o-3")))
            assert r.json()["Code"] == "OK"
        assert [x["phone"] for x in receipts(tmp_path / "receipts.jsonl")] == good[:3]

    async def test_submail_batchsend_refused_whole_multi_per_entry(self, tmp_path: Path) -> None:
        cfg = SimulatorConfig(bad_number_rate=0.05)
        (bad,), good = bad_and_good(cfg, "138", 1, 3)
        async with running(tmp_path, bad_number_rate=0.05) as (sim, client):
            to = ",".join([good[0], bad, good[1]])
            params = submail_params("batchsend", {"to": to, "content": "【Acme】Spring sale"})
            r = await client.send(submail_post(sim, "batchsend", params))
            assert r.json() == {
                "status": "error",
                "code": "252",
                "msg": "Incorrect recipient message address",
            }
            multi = orjson.dumps([{"to": n, "vars": {"code": "1"}} for n in (good[0], bad, good[2])]).decode()
            params = submail_params("multixsend", {"project": "ThJBE4", "multi": multi})
            entries = (await client.send(submail_post(sim, "multixsend", params))).json()
            assert [(e["status"], e.get("to"), e.get("code")) for e in entries] == [
                ("success", good[0], None),
                ("error", None, 252),
                ("success", good[2], None),
            ]
        assert [x["phone"] for x in receipts(tmp_path / "receipts.jsonl")] == [good[0], good[2]]


def test_campaign_setting(tmp_path: Path) -> None:
    base = {
        "source": {"kind": "csv", "path": "r.csv", "phone": "phone"},
        "provider": {"kind": "simulator"},
        "message": {"template_code": "SMS_1", "sign_name": "Acme"},
    }
    assert parse_campaign(base, tmp_path).provider.on_refusal == "split"
    base["provider"]["on_refusal"] = "fail-batch"
    assert parse_campaign(base, tmp_path).provider.on_refusal == "fail-batch"
    base["provider"]["on_refusal"] = "halve"
    with pytest.raises(CampaignError, match=r"provider\.on_refusal.*split, fail-batch"):
        parse_campaign(base, tmp_path)


def test_bad_setting_exits_2_naming_the_field(tmp_path: Path) -> None:
    write_recipients(tmp_path / "recipients.csv", 10)
    c = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
    c.write_text(c.read_text().replace("[message]", 'on_refusal = "sometimes"\n[message]'))
    p = sluice("run", str(c))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and b"provider.on_refusal" in err, err.decode()
