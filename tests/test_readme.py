"""README.md and the CLI cannot drift: every `sluice` command line the README shows goes through
the real parser (placeholders filled), every subcommand's --help works, and the README's first
command, `sluice simulate` and the Python API example run as written."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.app.cli import build_parser, main
from providers.simulator.__main__ import build_parser as simulator_parser
from tests.conftest import REPO
from tests.helpers import write_recipients

README = (REPO / "README.md").read_text(encoding="utf-8")
SLUICE = str(Path(sys.executable).with_name("sluice"))

PLACEHOLDERS = {
    "CAMPAIGN.toml": "campaign.toml",
    "RUN_DIR": "runs/x",
    "DIR": "some/dir",
    "FILE": "out.file",
    "SECONDS": "0",
    "PEM": "cert.pem",
    "N": "3",
    "F": "0.1",
    "PHONES": "13800000000,13900000000",
}


def readme_command_lines() -> list[str]:
    """Every line of a README code block that runs sluice, from `sluice` on, comments dropped
    (a YAML list item too: a Kubernetes manifest's `args:`)."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            found = re.search(r"(?:^|^- |&& |\.venv/bin/)(sluice (?:.*))$", line.split("  #")[0].strip())
            if found:
                lines.append(found.group(1).strip())
    return lines


def filled(synopsis: str) -> list[str]:
    """A synopsis as arguments: every optional part taken, the first of `a|b`, placeholders filled."""
    text = synopsis.replace("...", "").replace("[", " ").replace("]", " ")
    args = []
    for word in text.split()[1:]:
        word = word.split("|")[0]
        args.append(PLACEHOLDERS.get(word, word))
    return args


COMMANDS = readme_command_lines()


def test_the_readme_shows_every_subcommand() -> None:
    shown = {line.split()[1] for line in COMMANDS}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= shown | {"--version"}, set(sub.choices) - shown  # type: ignore[union-attr]


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_line_parses(line: str) -> None:
    args = filled(line)
    try:
        if args[:1] == ["simulate"]:
            simulator_parser("sluice simulate").parse_args(args[1:])
        else:
            build_parser().parse_args(args)
    except SystemExit as exc:
        assert exc.code == 0, f"usage error for README line {line!r} as {args}"


@pytest.mark.parametrize(
    "command",
    [
        *("run", "resume", "status", "reconcile", "report", "export"),
        *("simulate", "demo", "listen", "receipts", "worker"),
    ],
)
def test_every_subcommand_has_help(command: str) -> None:
    done = subprocess.run([SLUICE, command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: sluice {command}")


def test_the_kubernetes_manifest_runs_a_checked_worker_line() -> None:
    """The Indexed Job's worker command line is one of the lines parsed above."""
    manifest = next(b for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S) if "kind: Job" in b)
    for setting in ("completionMode: Indexed", "podReplacementPolicy: Failed", "restartPolicy: Never"):
        assert setting in manifest
    worker_lines = [x.strip().removeprefix("- ") for x in manifest.splitlines() if "sluice worker" in x]
    assert len(worker_lines) == 1 and worker_lines[0] in COMMANDS
    assert "--coordinator redis://" in worker_lines[0]


def test_run_json_without_dry_run_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "campaign.toml", "--json"])
    assert exc.value.code == 2
    assert "--json goes with --dry-run" in capsys.readouterr().err


def test_simulate_runs_as_written(tmp_path: Path) -> None:
    line = next(x for x in COMMANDS if x.startswith("sluice simulate") and "--receipts FILE" in x)
    args = filled(line)
    receipts = tmp_path / "r.jsonl"
    args[args.index("--receipts") + 1] = str(receipts)
    proc = subprocess.Popen([SLUICE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:"), url
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert orjson.loads(err.splitlines()[-1])["requests"] == 0


def test_first_readme_command_runs_as_written(tmp_path: Path) -> None:
    """The main job: `sluice demo --recipients 100000`, in a fresh directory."""
    first = re.search(r"```sh\n(.*?)\n```", README, flags=re.S)
    assert first is not None
    demo = first.group(1).split("&&")[-1].strip()
    assert demo.startswith(".venv/bin/sluice demo")
    done = subprocess.run(
        [SLUICE, *demo.split()[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stderr.split())
    assert "0 numbers accepted more than once" in flat
    n = int(demo.split("--recipients")[1].split()[0])
    assert f"{n:,} recipients accepted, {n:,} distinct numbers" in flat


def test_api_example_runs(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert code is not None
    write_recipients(tmp_path / "recipients.csv", 500)
    (tmp_path / "campaign.toml").write_text(
        '[source]\nkind = "csv"\npath = "recipients.csv"\nkey = "id"\nphone = "phone"\n'
        '[provider]\nkind = "simulator"\n'
        '[message]\ntemplate_code = "SMS_1"\nsign_name = "Acme"\nparams = { code = "{code}" }\n'
        "[limits]\nrequests_per_second = 500\n"
    )
    r = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().splitlines()[-1].startswith("500 sent; complete: True")
    assert (tmp_path / "runs" / "api-demo" / "ledger.jsonl").exists()
