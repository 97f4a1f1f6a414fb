"""`consortium demo` end to end (one round to keep CI short): real server, SuperLink with TLS
and SuperNode authentication, three SuperNodes and site agents, DP + HE, the release gate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rich.console import Console

from concord_demo.story import DemoOptions, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_runs_a_whole_study(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    result = run_demo(
        DemoOptions(state_dir=tmp_path / "demo", rounds=1),
        console,
        Path(sys.executable).parent,
    )
    assert result.state == "completed"
    assert [r["round"] for r in result.rounds] == [1]
    assert result.rounds[0]["participants"] == ["hospital-a", "hospital-b", "hospital-c"]
    # The released model, evaluated on a held-out set, beats chance clearly.
    assert result.federated["auc"] > 0.75
    assert result.federated["accuracy"] > 0.6
    assert result.baseline["auc"] > 0.9
    # Budgets were charged by what the sites' accountants reported, nothing left reserved.
    for budget in result.budgets.values():
        assert 0 < float(budget["epsilon_spent"]) <= 6.0
        assert float(budget["epsilon_reserved"]) == 0
    assert result.witnessed
    assert result.released
    assert result.audit_ok, result.audit_summary
    assert result.files["report (PDF)"].read_bytes().startswith(b"%PDF")
    assert b"Concord compliance report" in result.files["report (HTML)"].read_bytes()
    assert result.files["model"].stat().st_size > 0
    text = console.export_text()
    assert "Where the time went" in text


def test_a_second_run_starts_clean(tmp_path: Path) -> None:
    """The state directory is wiped at start: nothing of a first run leaks into the next."""
    state = tmp_path / "demo"
    (state / "server").mkdir(parents=True)
    (state / "server" / "concord.db").write_text("left over from a crashed run")
    from concord_demo.stack import DemoStack

    stack = DemoStack(state, python_bin=Path(sys.executable).parent)
    stack.prepare()
    assert list(state.iterdir()) == []
