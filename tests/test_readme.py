"""The README's Python API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.helpers import write_recipients


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
