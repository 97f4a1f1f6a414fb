"""Drill: four hospitals, SuperNodes crash mid-round.

hospital-d's SuperNode is killed (SIGKILL) once it has received round 1's training message:
round 1 aggregates the other three (the policy minimum) after the round timeout, and its
``round.completed`` audit entry names hospital-d as missing. Then hospital-c's SuperNode is
killed once it has received round 2: with two sites left the round fails cleanly
(``round.failed``, "at least 3 needed"), the study ends ``failed`` with that reason, and the
reservation on every dataset is returned (``epsilon_reserved`` 0, one ``budget.released``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.drills import DrillStack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

#: Long enough for a round of real ClientApp processes on a loaded 2-core machine (~60 s);
#: a round with a dead site lasts this long.
ROUND_TIMEOUT_S = 120


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[DrillStack]:
    with DrillStack.started(tmp_path / "drill", n_sites=4) as stack:
        yield stack


def test_supernode_killed_mid_round_then_too_few_sites(drill: DrillStack) -> None:
    a, b, c, d = drill.hospitals
    study = drill.submit_and_start(drill.contract(rounds=2, round_timeout_s=ROUND_TIMEOUT_S))
    sid = study["id"]

    drill.wait_for_supernode_round(d, sid, 1)
    drill.kill_supernode(d)
    first = drill.wait_for_round(sid, 1, timeout=ROUND_TIMEOUT_S * 2 + 60)
    details = first["details"]
    record = details["record"]
    assert first["action"] == "round.completed", details
    assert record["participants"] == [a.site_id, b.site_id, c.site_id], details
    assert d.site_id in record["missing_sites"], details
    assert set(record["sample_counts"]) == {a.site_id, b.site_id, c.site_id}
    assert set(details["charged_epsilon"]) == {a.dataset_id, b.dataset_id, c.dataset_id}

    drill.wait_for_supernode_round(c, sid, 2)
    drill.kill_supernode(c)
    second = drill.wait_for_round(sid, 2, timeout=ROUND_TIMEOUT_S * 2 + 60)
    details = second["details"]["record"]
    assert second["action"] == "round.failed", details
    assert second["outcome"] != "success"
    assert c.site_id in details["missing_sites"], details
    assert "at least 3" in (details["failure"] or ""), details

    ended = drill.wait_for_end(sid, timeout=60)
    assert ended["state"] == "failed", ended
    assert "at least 3" in ended["state_reason"], ended["state_reason"]
    for dataset in study["contract"]["datasets"]:
        budget = drill.researcher.request("GET", f"/api/v1/budgets/{dataset}")
        assert float(budget["epsilon_reserved"]) == 0.0, budget
    # d was never charged; a, b and c keep what round 1 spent.
    spent = drill.researcher.request("GET", f"/api/v1/budgets/{d.dataset_id}")["epsilon_spent"]
    assert float(spent) == 0.0
    drill.new_entries()
    released = [
        e for e in drill.entries if e["action"] == "budget.released" and e["object"]["id"] == sid
    ]
    assert len(released) == 1
