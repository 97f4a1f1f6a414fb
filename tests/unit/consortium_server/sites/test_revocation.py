"""Revoking a site aborts every unfinished study it belongs to, through the HTTP API, on
SQLite and PostgreSQL: each abort is audited naming the revocation, the running study's
Flower run is stopped (and its ServerApp told ``stop``), completed studies stay as they
are, and a second revocation is a 409 with a stable code."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import StudyOutcome
from consortium_server.federation.runs import RunManager
from tests.support.runs import InProcessLauncher, federation_gate, synthetic_run
from tests.support.studies import relay_study_key, submit_and_approve
from tests.support.world import People, study_contract


def _entries(app: FastAPI) -> list[Any]:
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        return [log.get_entry(i, session=session).entry for i in range(log.size(session=session))]


def _state(client: TestClient, people: People, study_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/studies/{study_id}", headers=people.admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_revoking_a_site_aborts_its_unfinished_studies_and_stops_their_runs(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    people = consortium
    privacy = {"epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0}  # four fit the budget
    completed = submit_and_approve(client, people, privacy=privacy)
    completed_secret = relay_study_key(app, completed)
    running = submit_and_approve(client, people, privacy=privacy)
    running_secret = relay_study_key(app, running)
    approved = submit_and_approve(client, people, privacy=privacy)
    response = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"], privacy=privacy),
        headers=people.researcher,
    )
    assert response.status_code == 201, response.text
    awaiting = response.json()
    assert awaiting["state"] == "awaiting_approvals", awaiting["state_reason"]

    round_one_recorded, release_running = threading.Event(), threading.Event()
    outcomes: dict[str, StudyOutcome] = {}

    def run(plan: RunPlan) -> None:
        gate = federation_gate(app, client, plan)
        if plan.study_id == completed["id"]:
            outcomes[plan.study_id], _ = synthetic_run(
                gate, [0.8, 1.6, 2.0], secret=completed_secret
            )
            return
        # Round 1 is recorded; round 2 is in flight when the site is revoked.
        outcomes[plan.study_id], _ = synthetic_run(gate, [0.8], secret=running_secret)
        round_one_recorded.set()
        release_running.wait(30)
        outcomes[plan.study_id], _ = synthetic_run(
            gate, [1.6], secret=running_secret, first_round=2
        )

    launcher = InProcessLauncher(run)
    manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    app.state.run_manager = manager
    for study in (completed, running):
        start = client.post(f"/api/v1/studies/{study['id']}/run", headers=people.researcher)
        assert start.status_code == 202, start.text
        manager.wait_launched(timeout=30)
    launcher.threads[0].join(30)
    assert round_one_recorded.wait(30)
    assert _state(client, people, completed["id"])["state"] == "completed"
    assert _state(client, people, running["id"])["current_round"] == 1
    # The InProcessLauncher numbers runs 1, 2, ... in the order they start.
    running_run_id = [p.study_id for p in launcher.started].index(running["id"]) + 1

    response = client.post(
        "/api/v1/sites/hospital-b/revoke",
        json={"reason": "Credentials leaked."},
        headers=people.admin,
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    manager.wait_launched(timeout=30)

    # Every unfinished study of the site is aborted, naming the revocation; the completed
    # one keeps its results.
    aborted = sorted([running["id"], approved["id"], awaiting["id"]])
    for study_id in aborted:
        state = _state(client, people, study_id)
        assert state["state"] == "aborted", study_id
        assert "hospital-b was revoked (Credentials leaked.)" in state["state_reason"]
        assert state["events"][-1]["actor_subject"] == "olga-operator"
    assert _state(client, people, completed["id"])["state"] == "completed"

    # The running study's Flower run is stopped at once ...
    assert launcher.stopped == [running_run_id]
    # ... and its ServerApp, reporting the round in flight, is told to stop.
    release_running.set()
    launcher.join()
    assert outcomes[running["id"]].status == "stopped"
    assert "aborted" in (outcomes[running["id"]].failure or "")
    assert _state(client, people, running["id"])["current_round"] == 1

    # The audit log: the revocation lists the studies, then one entry per aborted study.
    entries = _entries(app)
    revoked = [e for e in entries if e.action == "site.revoked"]
    assert len(revoked) == 1
    assert revoked[0].details["aborted_studies"] == aborted
    after = entries[entries.index(revoked[0]) + 1 :]
    aborts = [e for e in after if e.action == "study.aborted"]
    assert sorted(e.object.id for e in aborts) == aborted
    for entry in aborts:
        assert "hospital-b was revoked" in entry.details["reason"]
        assert entry.actor.subject == "olga-operator"
        assert entry.contract_hash == _state(client, people, entry.object.id)["contract_hash"]
    assert not [e for e in after if e.action == "study.aborted" and e.object.id == completed["id"]]


def test_revocation_with_no_unfinished_study_aborts_nothing(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    launcher = InProcessLauncher(lambda plan: None)
    app.state.run_manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    response = client.post(
        "/api/v1/sites/hospital-c/revoke", json={"reason": "Left."}, headers=consortium.admin
    )
    assert response.status_code == 200, response.text
    (entry,) = [e for e in _entries(app) if e.action == "site.revoked"]
    assert entry.details["aborted_studies"] == []
    assert launcher.stopped == []


def test_revoking_twice_is_a_conflict_with_a_stable_code(
    client: TestClient, consortium: People
) -> None:
    url = "/api/v1/sites/hospital-a/revoke"
    assert client.post(url, json={"reason": "Left."}, headers=consortium.admin).status_code == 200
    again = client.post(
        url,
        json={"reason": "Left."},
        headers={**consortium.admin, "X-Request-ID": "revoke-again-01"},
    )
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "site.already_revoked"
    assert error["request_id"] == "revoke-again-01"


def test_aborting_a_running_study_stops_its_flower_run(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    launcher = InProcessLauncher(lambda plan: None)  # a run that never reports
    manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    app.state.run_manager = manager
    assert (
        client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher).status_code
        == 202
    )
    manager.wait_launched(timeout=30)
    response = client.post(
        f"/api/v1/studies/{study['id']}/abort",
        json={"reason": "Ethics approval withdrawn."},
        headers=consortium.researcher,
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "aborted"
    manager.wait_launched(timeout=30)
    assert launcher.stopped == [1]


def test_revocation_stands_when_the_superlink_cannot_stop_the_run(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """A SuperLink that is down cannot stop the run: the revocation and the abort stand
    (200, committed), and the ServerApp is still told to stop at its next report."""
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)

    class Unstoppable(InProcessLauncher):
        def stop(self, run_id: int) -> None:
            raise RuntimeError("the SuperLink is down")

    launcher = Unstoppable(lambda plan: None)
    manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    app.state.run_manager = manager
    run = client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher)
    assert run.status_code == 202, run.text
    manager.wait_launched(timeout=30)
    response = client.post(
        "/api/v1/sites/hospital-a/revoke", json={"reason": "Left."}, headers=consortium.admin
    )
    assert response.status_code == 200, response.text
    manager.wait_launched(timeout=30)
    assert _state(client, consortium, study["id"])["state"] == "aborted"
    (plan,) = launcher.started
    gate = federation_gate(app, client, plan)
    outcome, _ = synthetic_run(gate, [0.8], secret=None)
    assert outcome.status == "stopped"


def test_a_revoked_sites_node_reads_nothing_any_more(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """Revocation ends the site's access, reads included; other sites are untouched."""
    node = consortium.node("c")
    before = client.get("/api/v1/studies", headers=node)
    assert before.status_code == 200, before.text
    app.state.run_manager = RunManager(
        app.state.sessionmaker, app.state.audit_log, InProcessLauncher(lambda plan: None)
    )
    revoked = client.post(
        "/api/v1/sites/hospital-c/revoke", json={"reason": "Left."}, headers=consortium.admin
    )
    assert revoked.status_code == 200, revoked.text
    for path in ("/api/v1/studies", "/api/v1/audit/heads/latest", "/api/v1/datasets"):
        response = client.get(path, headers={**node, "X-Request-ID": "revoked-read-1"})
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "auth.site_revoked"
        assert error["request_id"] == "revoked-read-1"
    assert client.get("/api/v1/studies", headers=consortium.node("a")).status_code == 200
