"""Start-up: commands that send nothing do not import the HTTP stack, the engine or the charts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio

from tests.test_engine import make_campaign, ok, rows, run

REPO = Path(__file__).resolve().parent.parent
SENDING_STACK = ("httpx", "uvloop", "aiohttp", "matplotlib", "pipeline.engine", "pipeline.transport")


def _imported_by(argv: list[str]) -> tuple[int, list[str]]:
    """Run ``sluice ARGV`` in a fresh interpreter; its exit code and which of SENDING_STACK it imported."""
    code = (
        "import sys, json\n"
        "from pipeline.app.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"print(json.dumps([rc, [m for m in {SENDING_STACK!r} if m in sys.modules]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    rc, modules = json.loads(out.stdout.strip().splitlines()[-1])
    return rc, modules


def test_status_imports_no_http_engine_or_charts(tmp_path: Path) -> None:
    anyio.run(run, make_campaign(tmp_path, rows(5)), tmp_path, ok)
    rc, modules = _imported_by(["status", str(tmp_path / "run")])
    assert rc == 0
    assert modules == []


def test_a_run_does_import_them() -> None:
    """The check above can fail: importing the API (what `sluice run` does) brings them in."""
    code = f"import sys, pipeline.app.api; print([m for m in {SENDING_STACK[:1]!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "['httpx']"


OPERATOR_MODULES = (
    "pipeline.app.ops_commands",
    "pipeline.ops.summary",
    "pipeline.ops.report",
    "importlib.metadata",
)


def test_the_run_command_loads_no_operator_tool_or_package_metadata() -> None:
    """`sluice run` (its parser and command module) leaves the operator tools and the package
    metadata (only ``--version`` reads it) unloaded: each costs CPU before the first request."""
    code = (
        "import sys, json\n"
        "from pipeline.app.cli import build_parser\n"
        "import pipeline.app.run_commands\n"
        "build_parser().parse_args(['run', 'c.toml'])\n"
        f"print(json.dumps([m for m in {OPERATOR_MODULES!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    version = subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", "--version"], cwd=REPO, capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("sluice "), version
