"""Drills: the consortium server (and its SuperLink) crash mid-study and are restarted.

Three hospitals run a 3-round DP + CKKS study. Once round 1 is on record and round 2 has
reached the sites, the server and the SuperLink (with the study's ServerApp) are killed
with SIGKILL, then started again on their state. The server finds the study's ServerApp
silent and restarts the run by itself (``study.run_resumed``): a new Flower run starts at
round 2 from round 1's checkpoint, kept in the database; the sites answer round 2 from
their reply cache when they had trained it already, so each site's accountant ends at
exactly 3 rounds; the study completes.

When only the server crashes, the ServerApp keeps retrying its report until the server is
back, and the run goes on where it was: nothing is restarted.

Afterwards: every round is on record exactly once; the audit log from before the crash is
an unchanged prefix of the log after it (no entry lost), and the whole log verifies against
the server's head key; every site's witness cosigned a head after the restart, which it
only does after checking consistency with the head it cosigned before the crash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from concord_protocol.audit.verify import verify_export
from site_node.agent.witness import STATE_FILE
from site_node.federation.approvals import ApprovalStore
from tests.support.drills import DrillStack, audit_entries, kill_process_group, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROUND_TIMEOUT_S = 120


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[DrillStack]:
    with DrillStack.started(tmp_path / "drill", n_sites=3) as stack:
        yield stack


def _witnessed_size(state_dir: Path) -> int:
    try:
        return int(json.loads((state_dir / STATE_FILE).read_text())["head"]["tree_size"])
    except (OSError, ValueError, KeyError):
        return 0


def test_server_and_superlink_killed_mid_study_resume_from_the_last_round(
    drill: DrillStack,
) -> None:
    sites = drill.hospitals
    study = drill.submit_and_start(drill.contract(rounds=3, round_timeout_s=ROUND_TIMEOUT_S))
    sid = study["id"]

    first = drill.wait_for_round(sid, 1, timeout=ROUND_TIMEOUT_S * 2 + 60)
    assert first["action"] == "round.completed", first["details"]
    size = drill.compliance.request("GET", "/api/v1/audit/heads/latest")["tree_size"]
    wait_for(
        "every site to witness a head with round 1 in it",
        lambda: all(_witnessed_size(h.state_dir) >= size for h in sites),
        timeout=60,
    )
    for hospital in sites:
        drill.wait_for_supernode_round(hospital, sid, 2)
    before = audit_entries(drill.compliance)
    witnessed_before = {h.site_id: _witnessed_size(h.state_dir) for h in sites}

    drill.kill_consortium()
    time.sleep(2)  # the sites' agents and SuperNodes notice the outage and keep retrying
    drill.restart_consortium()

    ended = drill.wait_for_end(sid, timeout=ROUND_TIMEOUT_S * 4 + 120)
    assert ended["state"] == "completed", (ended["state_reason"], drill.logs())
    assert ended["current_round"] == 3

    after = audit_entries(drill.compliance)
    # No entry lost or changed: the log before the crash is a prefix of the log after it.
    assert after[: len(before)] == before
    mine = [e for e in after if e["object"]["id"] == sid]
    rounds = [
        e["details"]["record"]["round_number"] for e in mine if e["action"] == "round.completed"
    ]
    assert rounds == [1, 2, 3]
    resumed = [e for e in mine if e["action"] == "study.run_resumed"]
    assert len(resumed) == 1
    recorded = resumed[0]["details"]["rounds_recorded"]
    assert recorded >= 1  # round 1 was on record; round 2 normally was not (mid-round)
    assert resumed[0]["details"]["next_round"] == recorded + 1
    assert [e["action"] for e in mine].count("round.failed") == 0

    # Each site spent the privacy budget of exactly 3 rounds (round 2 was not paid twice).
    for hospital in sites:
        state = ApprovalStore(hospital.state_dir).dp_state_path(sid, study["contract_hash"])
        assert json.loads(state.read_text())["rounds_completed"] == 3, hospital.site_id
    for dataset in study["contract"]["datasets"]:
        budget = drill.researcher.request("GET", f"/api/v1/budgets/{dataset}")
        assert float(budget["epsilon_reserved"]) == 0.0, budget
        assert 0 < float(budget["epsilon_spent"]) <= 6.0, budget

    # The whole log verifies against the server's head key (kept across the restart).
    export = drill.compliance.audit_export()
    report = verify_export(export, trusted_server_key=drill.stack.head_key())
    assert report.ok, report.summary()
    # The witnesses went on across the restart: each cosigned a larger head, which it does
    # only after checking that the new tree extends the one it cosigned before the crash.
    final_size = len(after)
    wait_for(
        "every site to cosign a head from after the restart",
        lambda: all(_witnessed_size(h.state_dir) >= final_size for h in sites),
        timeout=90,
    )
    for hospital in sites:
        assert _witnessed_size(hospital.state_dir) > witnessed_before[hospital.site_id]
        assert hospital.agent is not None
        assert hospital.agent.alive(), hospital.agent.log_tail()
        assert "tree_inconsistent" not in hospital.agent.log_tail(1_000_000)


def test_a_server_crash_alone_is_ridden_out_by_the_serverapp(drill: DrillStack) -> None:
    sites = drill.hospitals
    study = drill.submit_and_start(drill.contract(rounds=2, round_timeout_s=ROUND_TIMEOUT_S))
    sid = study["id"]
    for hospital in sites:
        drill.wait_for_supernode_round(hospital, sid, 1)
    stack = drill.stack
    assert stack.server is not None
    kill_process_group(stack.server.proc.pid)
    stack.server.stop()
    time.sleep(5)  # round 1 ends meanwhile: the ServerApp's report finds nobody and retries
    stack.start_server()

    ended = drill.wait_for_end(sid, timeout=ROUND_TIMEOUT_S * 3 + 120)
    assert ended["state"] == "completed", (ended["state_reason"], drill.logs())
    mine = [e for e in audit_entries(drill.compliance) if e["object"]["id"] == sid]
    actions = [e["action"] for e in mine]
    assert actions.count("round.completed") == 2
    assert "study.run_resumed" not in actions  # the same run went on
    for hospital in sites:
        state = ApprovalStore(hospital.state_dir).dp_state_path(sid, study["contract_hash"])
        assert json.loads(state.read_text())["rounds_completed"] == 2, hospital.site_id
