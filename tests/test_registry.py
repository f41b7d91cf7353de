"""providers/registry.py: what each provider declares, and a provider added without touching pipeline/."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pipeline.app.account import make_provider
from pipeline.app.api import start_run
from pipeline.app.campaign import Campaign, parse_campaign
from pipeline.errors import CampaignError
from pipeline.ledger import Intent, follow
from pipeline.ops.listen import print_ready, serve_listener
from pipeline.ops.reconcile import reconcile_run
from providers import registry
from providers.aliyun import AliyunCredentials, AliyunSms
from providers.base import CredentialsError
from providers.simulator import SimulatorConfig, serve
from providers.spec import (
    BadReceipt,
    BadSignature,
    ConfigKey,
    EnvVar,
    ProviderKind,
    ProviderSettings,
    PushRequest,
    Receipt,
    ReceiptPush,
)
from tests.conftest import REPO
from tests.helpers import final_statuses, write_recipients

pytestmark = pytest.mark.anyio


def campaign_data(kind: str, **provider: object) -> dict[str, Any]:
    message: dict[str, Any] = {"sign_name": "Acme", "template_code": "SMS_1", "content": "hi {first_name}"}
    if kind == "aliyun-card":
        message["card_template_code"] = "CARD_1"
    return {
        "source": {"kind": "csv", "path": "recipients.csv", "key": "id", "phone": "phone"},
        "provider": {"kind": kind, **provider},
        "message": message,
        "limits": {"batch_size": 1},
    }


class TestDeclarations:
    def test_every_kind_is_declared_once_with_its_facts(self) -> None:
        facts = {
            s.kind: (s.max_batch, s.default_endpoint, s.secret_names, s.clock_sync is not None)
            for s in registry.registered()
        }
        assert facts == {
            "aliyun": (100, "https://dysmsapi.aliyuncs.com", ("ALIYUN_ACCESS_KEY_SECRET",), False),
            "aliyun-card": (100, "https://dysmsapi.aliyuncs.com", ("ALIYUN_ACCESS_KEY_SECRET",), False),
            "submail": (10_000, "https://api-v4.mysubmail.com", ("SUBMAIL_APPKEY",), True),
            "nxcloud": (
                200,
                "https://api2.nxcloud.com",
                ("NXCLOUD_ACCESS_SECRET", "NXCLOUD_APP_SECRET"),
                False,
            ),
        }
        assert registry.kinds() == ("aliyun", "aliyun-card", "submail", "nxcloud", "simulator")
        assert all(s.reconcile is not None and s.test_env is not None for s in registry.registered())

    @pytest.mark.parametrize("kind", ["aliyun", "aliyun-card", "submail", "nxcloud"])
    def test_the_batch_limit_is_the_declared_one(self, tmp_path: Path, kind: str) -> None:
        cap = registry.lookup(kind).max_batch  # type: ignore[union-attr]
        data = campaign_data(kind)
        data["limits"]["batch_size"] = cap
        assert parse_campaign(data, tmp_path).limits.batch_size == cap
        data["limits"]["batch_size"] = cap + 1
        with pytest.raises(CampaignError, match=f"between 1 and {cap} for {kind}"):
            parse_campaign(data, tmp_path)

    @pytest.mark.parametrize(
        ("key", "value", "message"),
        [
            ("mode", "bulk", "must be one of batchsend, multisend, multixsend"),
            ("algorithm", "sha512", "must be one of md5, sha256"),
            ("signature", "v4", "must be one of v3, v2"),
            ("source_address", 7, "must be a str"),
        ],
    )
    def test_declared_keys_are_checked_by_type_and_choice(
        self, tmp_path: Path, key: str, value: object, message: str
    ) -> None:
        with pytest.raises(CampaignError, match=message) as err:
            parse_campaign(campaign_data("nxcloud", **{key: value}), tmp_path)
        assert err.value.field == f"provider.{key}"

    def test_an_undeclared_key_is_unknown(self, tmp_path: Path) -> None:
        with pytest.raises(CampaignError, match="unknown key"):
            parse_campaign(campaign_data("aliyun", lane="b"), tmp_path)

    def test_a_key_cannot_mean_two_things(self) -> None:
        clash = ProviderKind(
            kind="clash",
            build=lambda s: pytest.fail("never built"),
            env=(),
            default_endpoint="https://clash.invalid",
            max_batch=1,
            config=(ConfigKey("mode", int),),
        )
        with pytest.raises(ValueError, match="declared differently"):
            registry.register(clash)
        assert registry.lookup("clash") is None

    def test_the_hash_of_an_existing_campaign_is_unchanged(self, tmp_path: Path) -> None:
        """run.json pins campaigns by hash: the registry must not change the hash of old ones."""
        campaign = parse_campaign(campaign_data("submail", mode="batchsend"), tmp_path)
        assert "options" not in campaign.to_dict()["provider"]
        stored = {k: {n: v for n, v in t.items() if v is not None} for k, t in campaign.to_dict().items()}
        assert parse_campaign(stored, tmp_path).digest() == campaign.digest()  # as run.json is read


class TestNoProviderNamedInPipeline:
    def test_pipeline_imports_only_the_contract_and_the_registry(self) -> None:
        allowed = {"providers", "providers.base", "providers.spec", "providers.simulator.__main__"}
        for path in sorted((REPO / "pipeline").rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("providers"):
                    assert node.module in allowed, f"{path.name} imports {node.module}"
                    if node.module == "providers":
                        assert [a.name for a in node.names] == ["registry"], path.name

    def test_the_receipt_stages_name_no_provider_and_no_field_of_one(self) -> None:
        """Pushes are parsed, verified and routed through ``ProviderKind.receipts``: the
        listener, the matcher and the pull know no provider, nor what its pushes carry."""
        words = {spec.kind for spec in registry.registered()} | set(registry.receipt_pushes())
        words |= {"aliyun", "submail", "nxcloud", "subhook", "smsreport", "sysmessageid"}
        words |= {"biz_id", "send_id", "phone_number", "err_code", "report_time"}
        words |= {"messageid", "drtime", "dropped_reason", "md5"}
        ops = REPO / "pipeline" / "ops"
        paths = [*sorted(ops.glob("receipts*.py")), ops / "listen.py"]
        assert [p.name for p in paths] == ["receipts.py", "receipts_pull.py", "listen.py"]
        for path in paths:
            text = path.read_text(encoding="utf-8").lower()
            named = sorted(word for word in words if word in text)
            assert not named, f"{path.name} names {named}"


# -- a provider added from outside pipeline/ --------------------------------------------------
class AcmeSms(AliyunSms):
    """A made-up provider: its own kind, variables, batch limit and [provider] key. It speaks
    Aliyun's wire format so that the local simulator can stand in for its server."""

    name = "acme"
    max_batch_size = 7


built: list[Mapping[str, Any]] = []


def build_acme(settings: ProviderSettings) -> AcmeSms:
    built.append(settings.options)
    env = settings.environ
    for name in ("ACME_KEY_ID", "ACME_KEY_SECRET"):
        if not env.get(name):
            raise CredentialsError(f"{name} is not set")
    return AcmeSms(
        credentials=AliyunCredentials(env["ACME_KEY_ID"], env["ACME_KEY_SECRET"]),
        template_code=settings.message["template_code"],
        endpoint=settings.endpoint,
    )


ACME = ProviderKind(
    kind="acme",
    build=build_acme,
    env=(EnvVar("ACME_KEY_ID"), EnvVar("ACME_KEY_SECRET", secret=True)),
    default_endpoint="https://sms.acme.invalid",
    max_batch=7,
    config=(ConfigKey("lane", str, ("a", "b"), "a"),),
)


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    registry.register(ACME)
    monkeypatch.setenv("ACME_KEY_ID", "testid")  # the simulator's documented test credentials
    monkeypatch.setenv("ACME_KEY_SECRET", "testsecret")
    built.clear()
    try:
        yield
    finally:
        registry.unregister("acme")


def acme_campaign(tmp_path: Path, endpoint: str, **provider: object) -> Campaign:
    data = campaign_data("acme", endpoint=endpoint, **provider)
    data["limits"] = {"batch_size": 7, "requests_per_second": 500, "linger_ms": 0}
    return parse_campaign(data, tmp_path)


class TestRegisteredProvider:
    async def test_a_campaign_runs_through_it(self, tmp_path: Path, acme: None) -> None:
        write_recipients(tmp_path / "recipients.csv", 30)
        async with serve(SimulatorConfig(receipts=tmp_path / "receipts.jsonl")) as sim:
            campaign = acme_campaign(tmp_path, sim.base_url, lane="b")
            result = await start_run(campaign, tmp_path / "run")
            accepted = sim.accepted
        assert result.complete and result.counts["sent"] == 30
        assert accepted == 30
        assert set(final_statuses(tmp_path / "run" / "ledger.jsonl").values()) == {"sent"}
        assert result.requests == 5  # 30 recipients in batches of at most 7
        assert built and built[0]["lane"] == "b"
        assert "ACME_KEY_SECRET" in registry.secret_names()

    def test_its_declarations_are_enforced(self, tmp_path: Path, acme: None, monkeypatch: Any) -> None:
        with pytest.raises(CampaignError, match="between 1 and 7 for acme"):
            parse_campaign({**campaign_data("acme"), "limits": {"batch_size": 8}}, tmp_path)
        with pytest.raises(CampaignError, match="must be one of a, b"):
            acme_campaign(tmp_path, "http://127.0.0.1:9", lane="c")
        with pytest.raises(CampaignError, match="must be one of aliyun, aliyun-card, submail, nxcloud"):
            parse_campaign(campaign_data("simulator", protocol="acme"), tmp_path)  # no test credentials
        campaign = acme_campaign(tmp_path, "http://127.0.0.1:9")
        assert isinstance(make_provider(campaign), AcmeSms) and built[-1]["lane"] == "a"  # the default
        monkeypatch.setenv("ACME_KEY_SECRET", "short")
        with pytest.raises(CampaignError, match="ACME_KEY_SECRET is too short"):
            make_provider(campaign)
        monkeypatch.delenv("ACME_KEY_ID")
        with pytest.raises(CampaignError, match="needs the environment variable ACME_KEY_ID"):
            make_provider(campaign)

    async def test_reconcile_says_it_has_no_status_query(self, tmp_path: Path, acme: None) -> None:
        write_recipients(tmp_path / "recipients.csv", 3)
        async with serve(SimulatorConfig(receipts=tmp_path / "receipts.jsonl")) as sim:
            await start_run(acme_campaign(tmp_path, sim.base_url), tmp_path / "run")
            with pytest.raises(CampaignError, match="acme has no status query"):
                await reconcile_run(tmp_path / "run", endpoint=sim.base_url)


# -- its receipt pushes, served by `sluice listen` -----------------------------------------
PUSH_KEY = "acme-push-key-1"


def parse_acme_push(request: PushRequest, key: str | None) -> list[Receipt]:
    """A made-up push: a JSON object per report, signed by a header carrying the key."""
    if key is None or request.headers.get("x-acme-key") != key:
        raise BadSignature("bad key")
    try:
        report = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise BadReceipt("not JSON") from None
    if report.get("kind") == "progress":
        return []
    return [Receipt("acme", report["to"], report["ok"], report["code"], None, batch_ref=report["batch"])]


ACME_PUSH = ReceiptPush(
    path="acme", parse=parse_acme_push, answer=b"got it", answer_type="text/plain", key_env="ACME_PUSH_KEY"
)


@pytest.fixture
def acme_pushing(acme: None) -> Iterator[None]:
    registry.unregister("acme")
    registry.register(dataclasses.replace(ACME, receipts=ACME_PUSH))
    yield  # the acme fixture unregisters it


class TestRegisteredReceiptPush:
    async def test_sluice_listen_serves_and_matches_it(
        self, tmp_path: Path, acme_pushing: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        phones = write_recipients(tmp_path / "recipients.csv", 20)
        run_dir = tmp_path / "run"
        async with serve(SimulatorConfig(receipts=tmp_path / "receipts.jsonl")) as sim:
            await start_run(acme_campaign(tmp_path, sim.base_url), run_dir)
        events, _ = follow(run_dir / "ledger.jsonl", 0)
        out_id = {row: e.out_id for e in events if isinstance(e, Intent) for row in e.rows}
        up = asyncio.Event()
        where: list[str] = []

        def ready(base: str, token: str) -> None:
            print_ready(base, token)
            where.append(f"{base}/{token}/acme")
            up.set()

        stop = asyncio.Event()
        listening = asyncio.create_task(
            serve_listener(run_dir, environ={"ACME_PUSH_KEY": PUSH_KEY}, on_ready=ready, stop=stop)
        )
        try:
            await asyncio.wait_for(up.wait(), 30)
            report = {"batch": out_id[3], "to": phones[3], "ok": False, "code": "EXPIRED"}
            signed = {"x-acme-key": PUSH_KEY}
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(where[0], content=orjson.dumps(report), headers=signed)
                assert (answer.status_code, answer.text) == (200, "got it")
                assert answer.headers["content-type"] == "text/plain"
                forged = await client.post(
                    where[0], content=orjson.dumps(report), headers={"x-acme-key": "x"}
                )
                assert forged.status_code == 403
                assert (await client.post(where[0], content=b"{", headers=signed)).status_code == 400
                assert (await client.get(where[0], headers=signed)).status_code == 405
                progress = await client.post(where[0], content=b'{"kind":"progress"}', headers=signed)
                assert progress.status_code == 200
        finally:
            stop.set()
            counts = await listening
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)  # the listener's: give them back to pytest
        assert (counts["matched"], counts["bad_signature"], counts["bad_request"]) == (1, 1, 1)
        assert counts["ignored_event"] == 1
        (line,) = (run_dir / "receipts.jsonl").read_bytes().splitlines()
        stored = orjson.loads(line)
        assert (stored["r"], stored["d"], stored["c"], stored["p"]) == (3, 0, "EXPIRED", "acme")
        assert f"acme {where[0]}" in capsys.readouterr().out.splitlines()
