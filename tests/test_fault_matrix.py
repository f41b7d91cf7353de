"""Every fault the simulator injects, end to end: the class, the ledger lines, and the run goes on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import final_statuses, simulator, sluice, write_campaign, write_recipients

# fault → (final status of the recipients it hit, what the attempt line says)
MATRIX = {
    "http500": ("unknown", "InternalError"),
    "http503": ("unknown", "ServiceUnavailable"),
    "drop_before": ("unknown", "RemoteProtocolError"),
    "drop_after": ("unknown", "RemoteProtocolError"),
    "reset": ("unknown", None),
    "slow": ("unknown", "ReadTimeout"),
    "garbage": ("unknown", "HTTP200"),
    "business_error": ("failed", "isv.MOBILE_NUMBER_ILLEGAL"),
    "throttle": ("sent", "Throttling.User"),
}


@pytest.mark.parametrize("fault", list(MATRIX))
def test_fault(tmp_path: Path, fault: str) -> None:
    status, code = MATRIX[fault]
    phones = write_recipients(tmp_path / "recipients.csv", 400)
    args = ("--fault-rate", "0.3", "--fault-mix", f"{fault}=1", "--seed", "3", "--slow-ms", "1500")
    with simulator(tmp_path, *args) as sim:
        write_campaign(
            tmp_path / "c.toml", sim.url, requests_per_second=400, batch_size=20, breaker_threshold=0
        )
        toml = (tmp_path / "c.toml").read_text().replace("timeout = 2.0", "timeout = 1.0")
        (tmp_path / "c.toml").write_text(toml)
        p = sluice("run", str(tmp_path / "c.toml"))
        _, err = p.communicate(timeout=120)
        sim.stop()
    assert p.returncode in (0, 3), err.decode()  # the run went on to the end
    lines = [orjson.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines()]
    attempts = [x for x in lines if "b" in x and "r" not in x]
    hit = [x for x in attempts if x["s"] != "sent"]
    assert hit, "the fault was injected"
    if code is not None:
        assert {x.get("c") for x in hit} == {code}
    statuses = final_statuses(tmp_path / "run" / "ledger.jsonl")
    assert set(statuses) == set(phones)
    counts = Counter(statuses.values())
    accepted = sim.accepted()
    if status == "sent":
        assert counts == {"sent": 400} and all(accepted[p] == 1 for p in phones.values())
    else:
        if fault == "business_error":
            # A refusal for some recipient is split (pipeline/dispatch.py): only a recipient refused
            # alone is failed. The injected refusals come at random, not for a number.
            sizes = {x["i"]: len(x["r"]) for x in lines if "i" in x}
            alone = [x for x in hit if x["s"] == "failed"]
            assert {sizes[x["b"]] for x in alone} == {1} and {x["s"] for x in hit} == {"split", "failed"}
            hit = alone
        assert counts[status] == sizes_of(hit, lines) and counts["sent"] == 400 - counts[status]
        for row, phone in phones.items():
            assert accepted[phone] <= 1
            if statuses[row] == "sent":
                assert accepted[phone] == 1


def sizes_of(attempts: list[dict[str, Any]], lines: list[dict[str, Any]]) -> int:
    """Recipients in the batches of ``attempts``."""
    sizes = {x["i"]: len(x["r"]) for x in lines if "i" in x}
    return sum(sizes[x["b"]] for x in attempts)
