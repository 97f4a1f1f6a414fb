"""POST /api/v1/studies/{id}/run: who may start a run, what it needs, and the launched run
driving the study to its end through the internal API."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.federation.plan import RunPlan
from consortium_server.federation.runs import RunManager
from tests.support.runs import InProcessLauncher, federation_gate, synthetic_run
from tests.support.studies import audit_actions, relay_study_key, submit_and_approve
from tests.support.world import People


def test_owner_starts_a_run_that_completes_in_the_background(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)

    def run(plan: RunPlan) -> None:
        synthetic_run(federation_gate(app, client, plan), [0.8, 1.6, 2.0], secret=secret)

    launcher = InProcessLauncher(run)
    app.state.run_manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    response = client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "running"
    app.state.run_manager.wait_launched(timeout=30)
    launcher.join()
    (plan,) = launcher.started
    assert plan.start_round == 1
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "completed"
    actions = audit_actions(app, study["id"])
    assert actions.count("round.completed") == 3
    assert actions[-2:] == ["study.completed", "budget.released"]


def test_a_run_that_cannot_start_fails_the_study_with_the_reason(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)

    class Broken(InProcessLauncher):
        def start(self, plan: RunPlan) -> int | None:
            raise RuntimeError("the SuperLink went away")

    manager = RunManager(app.state.sessionmaker, app.state.audit_log, Broken(lambda p: None))
    app.state.run_manager = manager
    assert (
        client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.researcher).status_code
        == 202
    )
    manager.wait_launched(timeout=30)
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "failed"
    assert "the SuperLink went away" in final["state_reason"]


def test_run_needs_a_configured_superlink(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    assert app.state.run_manager is None  # the test settings configure no SuperLink
    response = client.post(f"/api/v1/studies/{study['id']}/run", headers=consortium.admin)
    assert response.status_code == 503
    assert "SUPERLINK_ADDRESS" in response.json()["error"]["message"]
    still = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert still["state"] == "approved"


def test_only_owner_or_admin_and_only_when_ready(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    launcher = InProcessLauncher(lambda plan: None)
    app.state.run_manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher)
    url = f"/api/v1/studies/{study['id']}/run"
    assert client.post(url, headers=consortium.other_researcher).status_code == 404
    assert client.post(url, headers=consortium.steward("a")).status_code == 403
    no_keys = client.post(url, headers=consortium.researcher)
    assert no_keys.status_code == 409
    assert "exchanged" in no_keys.json()["error"]["message"]
    assert launcher.started == []


def test_key_exchange_steps_are_audited(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    import base64

    from site_node.crypto import generate_study_context, public_context, study_key_fingerprint

    study = submit_and_approve(client, consortium)
    secret = generate_study_context()
    body = {
        "public_context": base64.b64encode(public_context(secret)).decode(),
        "key_fingerprint": study_key_fingerprint(secret),
        "sealed_keys": [],
    }
    response = client.post(
        f"/api/v1/studies/{study['id']}/keys", json=body, headers=consortium.node("a")
    )
    # Without sealed keys for the other sites the relay refuses: and records nothing.
    assert response.status_code in (409, 422), response.text
    assert "keys.relayed" not in audit_actions(app, study["id"])
