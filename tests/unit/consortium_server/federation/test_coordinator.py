"""A study run on the consortium side: approved -> running -> completed/failed, every round
audited and its epsilon charged to the ledger, the unused reservation returned."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.audit.verify import verify_live
from consortium_server.budgets import service as budgets
from consortium_server.errors import ConflictError
from consortium_server.federation.coordinator import begin_run, run_with_lifecycle
from consortium_server.federation.strategy import RoundHook, RunPlan, StudyOutcome
from tests.support.studies import (
    SITES,
    audit_actions,
    relay_study_key,
    submit_and_approve,
    synthetic_runner,
)
from tests.support.world import People, study_contract


def _budget(app: FastAPI, dataset: str) -> budgets.BudgetView:
    with app.state.sessionmaker() as session:
        return budgets.show(session, dataset)


def test_completed_run_charges_rounds_and_returns_the_rest(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    outcome = run_with_lifecycle(
        app.state.sessionmaker,
        app.state.audit_log,
        study["id"],
        synthetic_runner([1.0, 2.0], secret=secret),
    )
    assert outcome.status == "completed"
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "completed"
    assert final["current_round"] == 2
    budget = _budget(app, "bc-a")
    assert float(budget.epsilon_spent) == pytest.approx(2.0)
    assert float(budget.epsilon_reserved) == 0
    assert float(budget.epsilon_remaining) == pytest.approx(8.0)
    actions = audit_actions(app, study["id"])
    assert actions[-5:] == [
        "study.running",
        "round.completed",
        "round.completed",
        "study.completed",
        "budget.released",
    ]
    with app.state.sessionmaker() as session:
        report = verify_live(session, server_public_key=app.state.tree_head_signer.public_key_b64)
    assert report.ok, report.summary()


def test_failed_round_fails_the_study_and_returns_the_reservation(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    run_with_lifecycle(
        app.state.sessionmaker,
        app.state.audit_log,
        study["id"],
        synthetic_runner([1.0, 1.5], fail_last=True),
    )
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "failed"
    assert "minimum is 3" in final["state_reason"]
    assert final["current_round"] == 1
    budget = _budget(app, "bc-b")
    assert float(budget.epsilon_spent) == pytest.approx(1.0)
    assert float(budget.epsilon_reserved) == 0
    assert "round.failed" in audit_actions(app, study["id"])


def test_a_site_reporting_more_than_reserved_is_not_charged(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)  # epsilon 3.0 reserved
    secret = relay_study_key(app, study)
    run_with_lifecycle(
        app.state.sessionmaker,
        app.state.audit_log,
        study["id"],
        synthetic_runner([4.0], secret=secret),
    )
    assert float(_budget(app, "bc-a").epsilon_spent) == 0
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        rounds = [
            e.entry
            for i in range(log.size(session=session))
            if (e := log.get_entry(i, session=session)).entry.action == "round.completed"
        ]
    assert rounds[-1].outcome.value == "failure"
    assert rounds[-1].details["overcharged"]


def test_only_approved_studies_with_relayed_keys_start(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    with app.state.sessionmaker() as session, pytest.raises(ConflictError, match="exchanged"):
        begin_run(session, study["id"], log=app.state.audit_log, actor=None)
    waiting = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    with app.state.sessionmaker() as session, pytest.raises(ConflictError, match="approved"):
        begin_run(session, waiting["id"], log=app.state.audit_log, actor=None)


@pytest.mark.slow
def test_real_clientapp_run_in_process_drives_the_lifecycle(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    """The real ClientApp (guard, Opacus, CKKS) at three sites behind an in-process grid."""

    from concord_protocol.contract import StudyContract
    from consortium_server.federation.serverapp import run_study_rounds
    from tests.support.flower import make_site
    from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts

    study = submit_and_approve(
        client,
        consortium,
        purpose="method_development",
        training={"rounds": 2, "local_epochs": 2, "batch_size": 32, "learning_rate": 0.1},
        privacy={"epsilon": 5.0, "delta": 1e-5, "max_grad_norm": 1.0},
        model={"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
    )
    secret = relay_study_key(app, study)
    contract = StudyContract.model_validate(study["contract"])
    sites = [make_site(tmp_path, i) for i in range(3)]
    from site_node.federation.approvals import ApprovalStore

    for site in sites:
        store = ApprovalStore(site.state_dir)
        store.approve(study["id"], contract, study["contract_hash"])
        store.save_study_key(study["id"], secret, sender_id="hospital-a")

    def runner(plan: RunPlan, hook: RoundHook) -> StudyOutcome:
        contexts = site_contexts(sites, plan.to_run_config())
        plan = RunPlan(**{**plan.__dict__, "node_wait_s": 0.0})
        return run_study_rounds(InProcessGrid(contexts), plan, hook=hook)  # type: ignore[arg-type]

    with flower_task_identity():
        outcome = run_with_lifecycle(
            app.state.sessionmaker, app.state.audit_log, study["id"], runner
        )
    assert outcome.status == "completed", outcome.failure
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "completed"
    spent = float(_budget(app, "bc-a").epsilon_spent)
    assert 0 < spent <= 5.0
    assert final["current_round"] == 2
    assert [r.participants for r in outcome.rounds] == [list(SITES), list(SITES)]
    assert audit_actions(app, study["id"]).count("round.completed") == 2


def test_a_malformed_final_aggregate_fails_the_study(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    run_with_lifecycle(
        app.state.sessionmaker, app.state.audit_log, study["id"], synthetic_runner([1.0])
    )
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "failed"
    assert "cannot be kept for release" in final["state_reason"]
    assert float(_budget(app, "bc-a").epsilon_reserved) == 0


def test_the_policy_is_checked_before_every_round(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """Round 1 spends the whole reservation: the policy denies round 2 and the run stops."""
    study = submit_and_approve(client, consortium)  # epsilon 3.0 reserved per dataset
    secret = relay_study_key(app, study)
    outcome = run_with_lifecycle(
        app.state.sessionmaker,
        app.state.audit_log,
        study["id"],
        synthetic_runner([3.0, 3.0, 3.0], secret=secret),
        policy=app.state.policy_context,
    )
    assert outcome.status == "failed"
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "failed"
    assert "denies round 2" in final["state_reason"]
    assert "no privacy budget left" in final["state_reason"]
    actions = audit_actions(app, study["id"])
    assert actions.count("round.completed") == 1  # round 2 never recorded
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        decisions = [
            e.entry
            for i in range(log.size(session=session))
            if (e := log.get_entry(i, session=session)).entry.action == "policy.decision"
            and e.entry.details.get("action") == "RunRound"
        ]
    assert [(d.details["round"], d.policy.decision.value) for d in decisions] == [  # type: ignore[union-attr]
        (1, "allow"),
        (2, "deny"),
    ]


def test_a_first_round_the_policy_denies_never_starts(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    from consortium_server.federation.runs import RunManager

    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    files = dict(client.get("/api/v1/policy", headers=consortium.admin).json()["files"])
    files["freeze.cedar"] = (
        '@id("freeze.rounds")\n@reason("Training is paused for a security review.")\n'
        'forbid (principal, action == Concord::Action::"RunRound", resource);\n'
    )
    assert (
        client.post("/api/v1/policy", json={"files": files}, headers=consortium.admin).status_code
        == 201
    )
    app.state.run_manager = RunManager(
        app.state.sessionmaker,
        app.state.audit_log,
        lambda plan: synthetic_runner([1.0], secret=secret),
    )
    response = client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher)
    assert response.status_code == 403
    assert "paused for a security review" in response.json()["error"]["message"]
    still = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert still["state"] == "approved"
    assert "policy.decision" in audit_actions(app, study["id"])  # the denial is on record
