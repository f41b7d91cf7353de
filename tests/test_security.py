"""Secrets never leak; personal data is owner-only; templates cannot reach object internals."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest
import structlog

from pipeline.app import run_commands
from pipeline.app._logging import Redactor, configure_logging
from pipeline.app.campaign import parse_campaign
from pipeline.errors import CampaignError
from providers import registry
from tests.helpers import simulator, sluice, write_campaign, write_recipients

SECRET = "S3cr3t-Zebra-Quokka-9981"
KEY_ID = "LTAI-distinctive-key-id-4471"


class TestSecrets:
    def test_no_secret_in_any_output_or_file(self, tmp_path: Path) -> None:
        env = {"ALIYUN_ACCESS_KEY_ID": KEY_ID, "ALIYUN_ACCESS_KEY_SECRET": SECRET}
        write_recipients(tmp_path / "recipients.csv", 300)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the simulator (a subprocess) verifies with the same credentials
        try:
            with simulator(tmp_path, "--fault-rate", "0.3", "--seed", "2", "--slow-ms", "2500") as sim:
                write_campaign(tmp_path / "c.toml", sim.url, requests_per_second=300, batch_size=20)
                p = sluice("run", str(tmp_path / "c.toml"), env=env)
                out, err = p.communicate(timeout=120)
                s = sluice("status", str(tmp_path / "run"), env=env)
                sout, serr = s.communicate(timeout=60)
                sim.stop()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert p.returncode in (0, 3), err.decode()
        blobs = {"stdout": out, "stderr": err, "status": sout + serr}
        for f in (tmp_path / "run").rglob("*"):
            blobs[str(f)] = f.read_bytes()
        for name, blob in blobs.items():
            assert SECRET.encode() not in blob, name
        assert b"sent" in (tmp_path / "run" / "ledger.jsonl").read_bytes()

    def test_wrong_secret_stops_with_the_code_not_the_secret(self, tmp_path: Path) -> None:
        write_recipients(tmp_path / "recipients.csv", 50)
        with simulator(tmp_path) as sim:  # verifies with the documented test credentials
            write_campaign(tmp_path / "c.toml", sim.url)
            p = sluice(
                "run",
                str(tmp_path / "c.toml"),
                env={"ALIYUN_ACCESS_KEY_ID": "testid", "ALIYUN_ACCESS_KEY_SECRET": SECRET},
            )
            out, err = p.communicate(timeout=60)
            sim.stop()
        assert p.returncode == 4, err.decode()  # stopped: the whole request was refused
        assert b"SignatureDoesNotMatch" in err
        blobs = [out, err] + [f.read_bytes() for f in (tmp_path / "run").rglob("*")]
        assert all(SECRET.encode() not in b for b in blobs)
        assert sum(sim.accepted().values()) == 0

    def test_missing_credentials_exit_2_naming_the_variable(self, tmp_path: Path) -> None:
        write_recipients(tmp_path / "recipients.csv", 5)
        c = write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9")
        c.write_text(c.read_text().replace('kind = "simulator"', 'kind = "aliyun"'))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIYUN_")}
        import subprocess
        import sys

        from tests.conftest import REPO

        r = subprocess.run(
            [sys.executable, "-m", "pipeline.app.cli", "run", str(c)],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert b"ALIYUN_ACCESS_KEY_ID" in r.stderr


# One distinct value per secret variable of every registered provider.
EVERY_SECRET = {name: f"{name.lower()}-Zx81-{i}q" for i, name in enumerate(registry.secret_names())}
IDS = {"ALIYUN_ACCESS_KEY_ID": KEY_ID, "SUBMAIL_APPID": "10001", "NXCLOUD_ACCESS_KEY": "fme2na3kdi3ki"}
IDS["NXCLOUD_APP_KEY"] = "yourAppKey"


def as_protocol(campaign: Path, protocol: str) -> None:
    text = campaign.read_text().replace('kind = "simulator"', f'kind = "simulator"\nprotocol = "{protocol}"')
    campaign.write_text(text.replace("[message]", '[message]\ncontent = "Hello {first_name}"'))


class TestEveryProvidersSecrets:
    def test_the_registry_declares_every_secret(self) -> None:
        assert set(EVERY_SECRET) == {
            "ALIYUN_ACCESS_KEY_SECRET",
            "SUBMAIL_APPKEY",
            "NXCLOUD_ACCESS_SECRET",
            "NXCLOUD_APP_SECRET",
        }

    @pytest.mark.parametrize("protocol", ["aliyun", "submail", "nxcloud"])
    def test_no_secret_in_any_output_or_file(
        self, tmp_path: Path, protocol: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name, value in {**IDS, **EVERY_SECRET}.items():
            monkeypatch.setenv(name, value)  # the simulator (a subprocess) verifies with the same
        write_recipients(tmp_path / "recipients.csv", 60)
        with simulator(tmp_path, "--fault-rate", "0.2", "--seed", "3") as sim:
            as_protocol(write_campaign(tmp_path / "c.toml", sim.url, batch_size=10), protocol)
            p = sluice("run", str(tmp_path / "c.toml"))
            out, err = p.communicate(timeout=120)
            s = sluice("status", str(tmp_path / "run"))
            sout, serr = s.communicate(timeout=60)
            sim.stop()
        assert p.returncode in (0, 3), err.decode()
        blobs = {"stdout": out, "stderr": err, "status": sout + serr}
        for f in (tmp_path / "run").rglob("*"):
            blobs[str(f)] = f.read_bytes()
        assert {"log.jsonl", "ledger.jsonl", "run.json"} <= {Path(n).name for n in blobs}
        for name, blob in blobs.items():
            for var, secret in EVERY_SECRET.items():
                assert secret.encode() not in blob, (name, var)
        assert b"sent" in (tmp_path / "run" / "ledger.jsonl").read_bytes()

    def test_the_run_log_masks_every_providers_secret_exactly(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name, value in EVERY_SECRET.items():
            monkeypatch.setenv(name, value)
        handed: dict[str, list[str]] = {}

        def keep_secrets(log_file: BinaryIO, *, secrets: Iterable[str], echo: bool) -> None:
            handed["secrets"] = list(secrets)
            log_file.close()

        monkeypatch.setattr(run_commands, "configure_logging", keep_secrets)
        run_commands.open_log(tmp_path, echo=False)  # what `sluice run` masks in its log
        with (tmp_path / "log.jsonl").open("ab") as f:
            configure_logging(f, secrets=handed["secrets"])
            log = structlog.get_logger("t")
            for name, value in EVERY_SECRET.items():
                log.error("refused", var=name, whole=value, inside=f"key={value};", nested={"v": [value]})
            log.info("ok", provider="aliyun", run_id="f0a94724")
        lines = [orjson.loads(x) for x in (tmp_path / "log.jsonl").read_bytes().splitlines()]
        for line in lines[:-1]:
            assert (line["whole"], line["inside"], line["nested"]) == (
                "[redacted]",
                "key=[redacted];",
                {"v": ["[redacted]"]},
            ), line["var"]
        assert (lines[-1]["provider"], lines[-1]["run_id"]) == ("aliyun", "f0a94724")

    @pytest.mark.parametrize(
        ("protocol", "variable"),
        [
            ("aliyun", "ALIYUN_ACCESS_KEY_SECRET"),
            ("submail", "SUBMAIL_APPKEY"),
            ("nxcloud", "NXCLOUD_ACCESS_SECRET"),
        ],
    )
    def test_a_short_secret_is_refused_at_start(self, tmp_path: Path, protocol: str, variable: str) -> None:
        write_recipients(tmp_path / "recipients.csv", 5)
        as_protocol(write_campaign(tmp_path / "c.toml", "http://127.0.0.1:9"), protocol)
        env = {**IDS, **EVERY_SECRET, variable: "y"}
        p = sluice("run", str(tmp_path / "c.toml"), env=env)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2, err.decode()
        assert f"{variable} is too short".encode() in err
        assert not (tmp_path / "run").exists()  # refused before anything started


class TestRedactor:
    def redact(self, secrets: list[str], **event: object) -> dict[str, object]:
        return dict(Redactor(secrets)(None, "info", dict(event)))

    def test_a_short_value_is_masked_only_where_it_is_the_whole_string(self) -> None:
        out = self.redact(["y", "4"], provider="aliyun", run_id="f0a94724", whole="y")
        assert out == {"provider": "aliyun", "run_id": "f0a94724", "whole": "[redacted]"}

    def test_a_long_secret_is_masked_inside_text_longest_first(self) -> None:
        out = self.redact(["abcd1234", "abcd1234-more"], msg="a abcd1234-more b abcd1234 c")
        assert out == {"msg": "a [redacted] b [redacted] c"}

    def test_surrounding_whitespace_of_the_variable_does_not_hide_it(self) -> None:
        assert self.redact(["  S3cr3t-Zebra \n"], msg="sig with S3cr3t-Zebra") == {
            "msg": "sig with [redacted]"
        }


class TestPermissions:
    def test_run_directory_is_owner_only(self, tmp_path: Path) -> None:
        write_recipients(tmp_path / "recipients.csv", 20)
        with simulator(tmp_path) as sim:
            write_campaign(tmp_path / "c.toml", sim.url)
            p = sluice("run", str(tmp_path / "c.toml"))
            p.communicate(timeout=60)
            sim.stop()
        run = tmp_path / "run"
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        for f in ("run.json", "ledger.jsonl", "log.jsonl"):
            assert stat.S_IMODE((run / f).stat().st_mode) == 0o600, f


class TestTemplateSafety:
    @pytest.mark.parametrize(
        "template", ["{x.__class__}", "{x[0]}", "{x!r}", "{x:>{y}}", "{0}", "{x.__globals__}"]
    )
    def test_refused_before_sending(self, tmp_path: Path, template: str) -> None:
        with pytest.raises(CampaignError, match=r"message\.params\.p"):
            parse_campaign(
                {
                    "source": {"kind": "csv", "path": "r.csv", "phone": "phone"},
                    "provider": {"kind": "simulator"},
                    "message": {"template_code": "T", "sign_name": "S", "params": {"p": template}},
                },
                tmp_path,
            )
