"""``benchmarks/demo_compare.py --quick`` on real Flower processes (SuperLink + 3 SuperNodes).

Runs the script as a user would and checks what must hold whatever the machine's speed:
each method aggregated its round with the three hospitals, SecAgg+ took its four train
waves, and encrypted updates cost more bytes than plaintext ones, both ways. No timing is
asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from concord_protocol.processes import FLOWER_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "demo_compare.py"


def test_quick_comparison_runs_every_method_with_three_sites(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    body = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert body["rounds"] == 1
    methods = {m["method"]: m for m in body["methods"]}
    assert sorted(methods) == ["ckks", "fedavg", "secagg+"]
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    for method in methods.values():
        summary = method["summary"]
        assert summary["status"] == "completed", summary["failure"]
        assert summary["rounds_completed"] == 1
        (round_1,) = method["rounds"]
        assert round_1["participants"] == sites
        assert sorted(round_1["per_site"]) == sites
        assert round_1["local_test"]["sites"] == 3
        assert 0.5 < summary["holdout"]["accuracy"] <= 1.0
    # one train and one evaluate message per site; SecAgg+ has four train stages
    assert methods["fedavg"]["summary"]["messages_per_site_round"] == 2
    assert methods["ckks"]["summary"]["messages_per_site_round"] == 2
    assert methods["secagg+"]["summary"]["messages_per_site_round"] == 5
    ckks, fedavg = methods["ckks"], methods["fedavg"]
    for site in sites:
        enc, plain = ckks["rounds"][0]["per_site"][site], fedavg["rounds"][0]["per_site"][site]
        assert enc["sent"] > plain["sent"]
        assert enc["received"] > plain["received"]
    assert ckks["ratios_vs_fedavg"]["bytes_per_site_round"] > 1.0
