"""A study run on the consortium side: approved -> running -> completed/failed, every round
reported through the internal API, audited and charged, the next round's policy checked
before the verdict, the unused reservation returned."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concord_protocol.rounds import RoundAuditDetails, RoundRecord
from consortium_server.audit.verify import verify_live
from consortium_server.budgets import service as budgets
from consortium_server.budgets.accountant import pld_epsilon
from consortium_server.errors import ConflictError
from consortium_server.federation.coordinator import begin_run
from consortium_server.federation.plan import RunPlan
from tests.support.runs import begin, federation_gate, synthetic_run
from tests.support.studies import (
    SITES,
    audit_actions,
    relay_study_key,
    round_record,
    site_spend,
    submit_and_approve,
)
from tests.support.world import People, study_contract


def _budget(app: FastAPI, dataset: str) -> budgets.BudgetView:
    with app.state.sessionmaker() as session:
        return budgets.show(session, dataset)


def _study(client: TestClient, people: People, study_id: str) -> dict[str, object]:
    body: dict[str, object] = client.get(
        f"/api/v1/studies/{study_id}", headers=people.researcher
    ).json()
    return body


def _round_entries(app: FastAPI) -> list[RoundAuditDetails]:
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    return [
        RoundAuditDetails.model_validate(e.details)
        for e in entries
        if e.action in ("round.completed", "round.failed")
    ]


def test_completed_run_charges_rounds_and_returns_the_rest(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"], policy=app.state.policy_context)
    outcome, verdicts = synthetic_run(
        federation_gate(app, client, plan), [1.0, 2.0, 2.5], secret=secret
    )
    assert outcome.status == "completed"
    assert [v.action for v in verdicts] == ["continue", "continue", "stop"]
    assert [v.next_round for v in verdicts[:2]] == [2, 3]
    final = _study(client, consortium, study["id"])
    assert final["state"] == "completed"
    assert final["current_round"] == 3
    budget = _budget(app, "bc-a")
    assert float(budget.epsilon_spent) == pytest.approx(2.5)
    assert float(budget.epsilon_reserved) == 0
    assert float(budget.epsilon_remaining) == pytest.approx(7.5)
    assert audit_actions(app, study["id"])[-9:] == [
        "policy.decision",
        "study.running",
        "round.completed",
        "policy.decision",
        "round.completed",
        "policy.decision",
        "round.completed",
        "study.completed",
        "budget.released",
    ]
    # The audit entry is the round record itself, plus what the ledger charged.
    rounds = _round_entries(app)
    assert [r.record.round_number for r in rounds] == [1, 2, 3]
    assert rounds[0].record == outcome.rounds[0]
    assert rounds[2].charged_epsilon == {d: "2.500000" for d in ("bc-a", "bc-b", "bc-c")}
    with app.state.sessionmaker() as session:
        report = verify_live(session, server_public_key=app.state.tree_head_signer.public_key_b64)
    assert report.ok, report.summary()


def test_failed_round_fails_the_study_and_returns_the_reservation(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    _outcome, verdicts = synthetic_run(
        federation_gate(app, client, plan), [1.0, 1.5], secret=secret, fail_at=2
    )
    assert [v.action for v in verdicts] == ["continue", "stop"]
    final = _study(client, consortium, study["id"])
    assert final["state"] == "failed"
    assert "minimum is 3" in str(final["state_reason"])
    assert final["current_round"] == 1
    # The failed round is charged too: hospital-b trained in it and reported 1.5;
    # hospital-c did not reply in round 2 and stays at round 1's 1.0.
    budget = _budget(app, "bc-b")
    assert float(budget.epsilon_spent) == pytest.approx(1.5)
    assert float(budget.epsilon_reserved) == 0
    assert float(_budget(app, "bc-c").epsilon_spent) == pytest.approx(1.0)
    assert "round.failed" in audit_actions(app, study["id"])


def test_a_site_reporting_more_than_reserved_is_charged_as_an_overspend_that_blocks_release(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium, training={"rounds": 1})  # epsilon 3.0
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    synthetic_run(federation_gate(app, client, plan), [4.0], secret=secret)
    budget = _budget(app, "bc-a")
    assert float(budget.epsilon_spent) == pytest.approx(4.0)
    assert float(budget.epsilon_overspent) == pytest.approx(1.0)
    (details,) = _round_entries(app)
    assert details.charged_epsilon == {d: "4.000000" for d in ("bc-a", "bc-b", "bc-c")}
    assert details.overspent == {d: "1" for d in ("bc-a", "bc-b", "bc-c")}
    assert "budget.overspent" in audit_actions(app, study["id"])
    with app.state.sessionmaker() as session:
        assert budgets.overspent(session, study["id"]) == {
            d: Decimal("1") for d in ("bc-a", "bc-b", "bc-c")
        }


def _report_round(app: FastAPI, client: TestClient, plan: RunPlan, record: RoundRecord) -> None:
    gate = federation_gate(app, client, plan)
    gate.report(record, None)


def test_falling_missing_and_under_reported_spend_is_refused_audited_and_never_under_charged(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """Round 1 is charged as reported. Round 2: hospital-a reports less than before
    (refused, nothing given back), hospital-b sends no signed report (charged the study's
    whole target), hospital-c reports 0.01 for a history whose epsilon the ledger's own
    accountant puts far higher (charged the recomputed figure)."""
    study = submit_and_approve(client, consortium)  # epsilon 3.0, 3 rounds
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    synthetic_run(federation_gate(app, client, plan), [1.0], secret=secret)
    record = round_record(plan, 2, 0.5, "failed")
    record.spend = {
        "hospital-a": site_spend(plan, 2, 0.5, 100),
        "hospital-c": site_spend(plan, 2, 0.01, 102).model_copy(update={"noise_multiplier": 1.2}),
    }
    record.spend_problems = {"hospital-b": "the reply carries no spend report"}
    _report_round(app, client, plan, record)
    assert float(_budget(app, "bc-a").epsilon_spent) == pytest.approx(1.0)
    assert float(_budget(app, "bc-b").epsilon_spent) == pytest.approx(3.0)
    recomputed = pld_epsilon(1.2, 0.5, 4, 1e-5, 2, plan.contract.evaluation_noise())
    assert recomputed > 1.0
    assert float(_budget(app, "bc-c").epsilon_spent) == pytest.approx(recomputed, abs=1e-5)
    details = _round_entries(app)[-1]
    refused = " | ".join(details.refused_reports)
    assert "hospital-a: study" in refused
    assert "below the 1.0 already charged" in refused
    assert "hospital-b: no usable spend report" in refused
    assert "hospital-c: report of epsilon 0.010000 refused" in refused
    assert "below the ledger's recomputed" in refused
    assert details.recomputed_epsilon["hospital-c"] == f"{recomputed:.6f}"
    assert "budget.report_refused" in audit_actions(app, study["id"])


def test_an_off_plan_spend_report_is_refused(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """A report at another sample rate, or more steps than the contract's rounds, is not
    the contract's plan: refused, and charged no less than the ledger recomputes."""
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    plan = begin(app, study["id"])
    record = round_record(plan, 1, 0.2, "failed")
    record.spend = {
        "hospital-a": site_spend(plan, 1, 0.2, 100).model_copy(update={"sample_rate": 0.25}),
        "hospital-b": site_spend(plan, 1, 0.2, 101).model_copy(update={"steps": 2 * 4}),
    }
    _report_round(app, client, plan, record)
    details = _round_entries(app)[-1]
    refused = " | ".join(details.refused_reports)
    assert "sample rate 0.25 is not the plan's 0.5" in refused
    assert "8 steps are not a whole number of rounds of 2 steps, up to 3 rounds" in refused
    # Charged the larger of the report and the ledger's figure (here its own, which
    # counts the round's evaluation release).
    charged = float(_budget(app, "bc-a").epsilon_spent)
    assert charged == pytest.approx(float(details.recomputed_epsilon["hospital-a"]), abs=1e-6)
    assert charged >= 0.2


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
    """The real ClientApp (guard, Opacus, CKKS) at three sites behind an in-process grid,
    the real round loop, and every round gated by the internal API."""
    from dataclasses import replace

    from consortium_server.federation.serverapp import run_study_rounds
    from tests.support.flower import approve_relayed, make_site
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
    sites = [make_site(tmp_path, i) for i in range(3)]
    approve_relayed(sites, study, secret)
    plan = replace(begin(app, study["id"], policy=app.state.policy_context), node_wait_s=0.0)
    grid = InProcessGrid(site_contexts(sites, plan.to_run_config()))
    with flower_task_identity():
        outcome = run_study_rounds(grid, plan, gate=federation_gate(app, client, plan))  # type: ignore[arg-type]
    assert outcome.status == "completed", outcome.failure
    final = _study(client, consortium, study["id"])
    assert final["state"] == "completed"
    spent = float(_budget(app, "bc-a").epsilon_spent)
    assert 0 < spent <= 5.0
    assert final["current_round"] == 2
    assert [r.participants for r in outcome.rounds] == [list(SITES), list(SITES)]
    assert audit_actions(app, study["id"]).count("round.completed") == 2
    waves = [kind for i, kind in enumerate(grid.sent) if i == 0 or grid.sent[i - 1] != kind]
    assert waves == ["train", "evaluate", "train", "evaluate"]


def test_an_aggregate_that_is_no_update_is_refused_and_never_recorded(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    plan = begin(app, study["id"])
    _outcome, (verdict,) = synthetic_run(federation_gate(app, client, plan), [1.0])
    assert verdict.action == "stop"
    assert "update." in verdict.reason
    final = _study(client, consortium, study["id"])
    assert final["state"] == "running"  # nothing recorded: the run manager restarts it
    assert final["current_round"] == 0
    assert "round.completed" not in audit_actions(app, study["id"])


def test_the_policy_is_checked_before_every_round(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """Round 1 spends the whole reservation: the policy denies round 2 and the run stops."""
    study = submit_and_approve(client, consortium)  # epsilon 3.0 reserved per dataset
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"], policy=app.state.policy_context)
    _outcome, verdicts = synthetic_run(
        federation_gate(app, client, plan), [3.0, 3.0, 3.0], secret=secret
    )
    assert [v.action for v in verdicts] == ["stop"]  # round 2 was never asked for
    assert "denies round 2" in verdicts[0].reason
    final = _study(client, consortium, study["id"])
    assert final["state"] == "failed"
    assert "denies round 2" in str(final["state_reason"])
    assert "no privacy budget left" in str(final["state_reason"])
    assert audit_actions(app, study["id"]).count("round.completed") == 1
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
    from tests.support.runs import InProcessLauncher

    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    files = dict(client.get("/api/v1/policy", headers=consortium.admin).json()["files"])
    files["freeze.cedar"] = (
        '@id("freeze.rounds")\n@reason("Training is paused for a security review.")\n'
        'forbid (principal, action == Concord::Action::"RunRound", resource);\n'
    )
    assert (
        client.post("/api/v1/policy", json={"files": files}, headers=consortium.admin).status_code
        == 201
    )
    launcher = InProcessLauncher(lambda plan: None)
    app.state.run_manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    response = client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher)
    assert response.status_code == 403
    assert "paused for a security review" in response.json()["error"]["message"]
    still = _study(client, consortium, study["id"])
    assert still["state"] == "approved"
    assert launcher.started == []
    assert "policy.decision" in audit_actions(app, study["id"])  # the denial is on record
