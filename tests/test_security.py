"""Secrets never leak; personal data is owner-only; templates cannot reach object internals."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.campaign import parse_campaign
from pipeline.errors import CampaignError
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
            [sys.executable, "-m", "pipeline.cli", "run", str(c)],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert b"ALIYUN_ACCESS_KEY_ID" in r.stderr


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
