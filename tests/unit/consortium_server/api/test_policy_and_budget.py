"""Policies and the privacy budget through the API: denials with reasons, the dry run,
reservation at approval, release at abort, publishing and rolling back policy sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concord_protocol.errors import PolicyLoadError
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People, dataset_body, signed_approval, study_contract

ALL = ["bc-a", "bc-b", "bc-c"]


def _approve_all(client: TestClient, people: People, study: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for site in "abc":
        response = client.post(
            f"/api/v1/studies/{study['id']}/approvals",
            json=signed_approval(
                client, people.steward(site), study, f"hospital-{site}", "approved"
            ),
            headers=people.steward(site),
        )
        assert response.status_code == 201, response.text
        body = response.json()
    return body


def test_policy_denial_rejects_with_every_reason(client: TestClient, consortium: People) -> None:
    contract = study_contract(
        ALL,
        purpose="commercial_research",
        ethics_reference="pending",
        encryption={"enabled": False},
    )
    response = client.post("/api/v1/studies", json=contract, headers=consortium.researcher)
    assert response.status_code == 201
    study = response.json()
    assert study["state"] == "rejected"
    reason = study["state_reason"]
    assert "commercial_research is not among the purposes dataset bc-a allows" in reason
    assert "'pending' is not well formed" in reason
    assert "requires encrypted aggregation" in reason


def test_non_member_organisation_is_rejected(client: TestClient, consortium: People) -> None:
    outsider = consortium.headers("eve", ["researcher"], "Acme Analytics Ltd")
    study = client.post("/api/v1/studies", json=study_contract(ALL), headers=outsider).json()
    assert study["state"] == "rejected"
    assert "Acme Analytics Ltd" in study["state_reason"]


def test_epsilon_above_the_datasets_per_study_maximum(
    client: TestClient, consortium: People
) -> None:
    contract = study_contract(ALL, privacy={"epsilon": 7.5, "delta": 1e-5})
    study = client.post("/api/v1/studies", json=contract, headers=consortium.researcher).json()
    assert study["state"] == "rejected"
    assert "exceeds the per-study maximum 5" in study["state_reason"]


def test_dry_run_gives_reasons_and_stores_nothing(client: TestClient, consortium: People) -> None:
    bad = study_contract(ALL, model={"name": "gpt-9", "version": "1", "hyperparameters": {}})
    response = client.post("/api/v1/policy/check", json=bad, headers=consortium.researcher)
    assert response.status_code == 200
    decision = response.json()
    assert decision["allowed"] is False
    assert any(r["policy_id"] == "models.from-catalogue" for r in decision["reasons"])
    assert len(decision["policy_set_hash"]) == 64
    good = client.post(
        "/api/v1/policy/check", json=study_contract(ALL), headers=consortium.researcher
    ).json()
    assert good["allowed"] is True
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


def test_approval_reserves_budget_and_abort_returns_it(
    client: TestClient, consortium: People
) -> None:
    study = client.post(
        "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
    ).json()
    final = _approve_all(client, consortium, study)
    assert final["state"] == "approved"
    budget = client.get("/api/v1/budgets/bc-a", headers=consortium.compliance).json()
    assert float(budget["epsilon_reserved"]) == pytest.approx(3.0)
    assert float(budget["epsilon_remaining"]) == pytest.approx(7.0)
    assert budget["lines"][0]["study_id"] == study["id"]

    client.post(
        f"/api/v1/studies/{study['id']}/abort",
        json={"reason": "Changed plans."},
        headers=consortium.researcher,
    )
    after = client.get("/api/v1/budgets/bc-a", headers=consortium.compliance).json()
    assert float(after["epsilon_reserved"]) == 0
    assert float(after["epsilon_remaining"]) == pytest.approx(10.0)


def test_approval_is_refused_with_numbers_once_budget_is_short(
    client: TestClient, consortium: People
) -> None:
    studies = [
        client.post(
            "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
        ).json()
        for _ in range(4)  # 4 x 3.0 > 10.0 on each dataset
    ]
    for study in studies[:3]:
        assert _approve_all(client, consortium, study)["state"] == "approved"
    response = client.post(
        f"/api/v1/studies/{studies[3]['id']}/approvals",
        json=signed_approval(client, consortium.steward("a"), studies[3], "hospital-a", "approved"),
        headers=consortium.steward("a"),
    )
    assert response.status_code == 403
    assert "remaining lifetime budget 1" in response.json()["error"]["message"]


def test_budget_taken_between_approvals_rejects_at_reservation(
    client: TestClient, consortium: People
) -> None:
    from tests.support.world import site_enrolment

    assert (
        client.post(
            "/api/v1/sites",
            json=site_enrolment("hospital-d", "Hospital d"),
            headers=consortium.admin,
        ).status_code
        == 201
    )
    assert (
        client.post(
            "/api/v1/datasets",
            json=dataset_body("bc-d", "hospital-d"),
            headers=consortium.steward("d"),
        ).status_code
        == 201
    )
    for _ in range(2):  # leaves 4.0 on bc-a, bc-b, bc-c
        study = client.post(
            "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
        ).json()
        _approve_all(client, consortium, study)
    x = client.post(
        "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
    ).json()
    y = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-b", "bc-c", "bc-d"]),
        headers=consortium.researcher,
    ).json()

    def approve(study: dict[str, Any], site: str) -> dict[str, Any]:
        response = client.post(
            f"/api/v1/studies/{study['id']}/approvals",
            json=signed_approval(
                client, consortium.steward(site), study, f"hospital-{site}", "approved"
            ),
            headers=consortium.steward(site),
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    approve(x, "b")
    approve(x, "c")
    for site in "bcd":
        last = approve(y, site)
    assert last["state"] == "approved"  # bc-b and bc-c now have 1.0 left
    final = approve(x, "a")  # bc-a still has 4.0, so the policy allows this site...
    assert final["state"] == "rejected"  # ...but the reservation over all datasets fails
    assert "privacy budget is exhausted" in final["state_reason"]
    assert "remaining ε=1" in final["state_reason"]
    budget = client.get("/api/v1/budgets/bc-a", headers=consortium.compliance).json()
    assert float(budget["epsilon_reserved"]) == pytest.approx(6.0)  # nothing half-reserved


def test_submission_is_denied_once_budget_is_gone(client: TestClient, consortium: People) -> None:
    for _ in range(3):
        study = client.post(
            "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
        ).json()
        _approve_all(client, consortium, study)
    late = client.post(
        "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
    ).json()
    assert late["state"] == "rejected"
    assert "remaining lifetime budget" in late["state_reason"]


def test_budget_of_unknown_dataset_is_404(client: TestClient, consortium: People) -> None:
    response = client.get("/api/v1/budgets/nope", headers=consortium.compliance)
    assert response.status_code == 404


def test_publish_invalid_policy_names_file_and_line(client: TestClient, consortium: People) -> None:
    response = client.post(
        "/api/v1/policy",
        json={"files": {"broken.cedar": "permit (principal, action, resource) when { oops };"}},
        headers=consortium.admin,
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "policy.invalid"
    assert "broken.cedar" in error["message"]
    versions = client.get("/api/v1/policy/versions", headers=consortium.admin).json()
    assert [v["version"] for v in versions] == [1]


def test_publish_and_roll_back_a_policy_set(client: TestClient, consortium: People) -> None:
    active = client.get("/api/v1/policy", headers=consortium.researcher).json()
    files = dict(active["files"])
    stricter = (
        '@id("purpose.no-method-development")\n'
        '@reason("The consortium paused method-development studies.")\n'
        'forbid (principal, action == Concord::Action::"SubmitStudy", resource)\n'
        'when { context.study.purpose == "method_development" };\n'
    )
    files["pause.cedar"] = stricter
    published = client.post(
        "/api/v1/policy",
        json={"files": files, "note": "pause method development"},
        headers=consortium.admin,
    )
    assert published.status_code == 201, published.text
    assert published.json()["version"]["version"] == 2
    denied = client.post(
        "/api/v1/policy/check",
        json=study_contract(ALL, purpose="method_development"),
        headers=consortium.researcher,
    ).json()
    assert denied["allowed"] is False
    assert "paused method-development" in denied["reasons"][0]["text"]

    rolled = client.post("/api/v1/policy/versions/1/activate", headers=consortium.admin)
    assert rolled.status_code == 200
    allowed = client.post(
        "/api/v1/policy/check",
        json=study_contract(ALL, purpose="method_development"),
        headers=consortium.researcher,
    ).json()
    assert allowed["allowed"] is True
    forbidden = client.post("/api/v1/policy", json={"files": files}, headers=consortium.researcher)
    assert forbidden.status_code == 403


def test_server_refuses_to_start_on_an_invalid_policy(tmp_path: Path, db_url: str) -> None:
    policies = tmp_path / "policies"
    (policies / "consortium").mkdir(parents=True)
    shipped = Path(__file__).resolve().parents[4] / "policies"
    (policies / "schema.cedarschema").write_text((shipped / "schema.cedarschema").read_text())
    (policies / "consortium" / "typo.cedar").write_text(
        '@id("x")\n@reason("y")\npermit (principal, action, resource) when { resource.nope };\n'
    )
    settings = ServerSettings(
        data_dir=tmp_path,
        database={"url": db_url, "auto_migrate": False},  # type: ignore[arg-type]
        policy={"directory": policies},  # type: ignore[arg-type]
    )
    with pytest.raises(PolicyLoadError) as info, TestClient(create_app(settings)):
        pass
    assert "typo.cedar" in str(info.value)


def test_approval_denied_by_policy_is_not_recorded(client: TestClient, consortium: People) -> None:
    study = client.post(
        "/api/v1/studies", json=study_contract(ALL), headers=consortium.researcher
    ).json()
    # The steward of a new dataset at hospital-a tightens nothing here; instead the
    # consortium tightens its policy after submission: approvals are re-checked.
    files = dict(client.get("/api/v1/policy", headers=consortium.admin).json()["files"])
    files["freeze.cedar"] = (
        '@id("freeze.all-use")\n@reason("Dataset use is frozen pending an audit.")\n'
        'forbid (principal, action == Concord::Action::"UseDataset", resource);\n'
    )
    assert (
        client.post("/api/v1/policy", json={"files": files}, headers=consortium.admin).status_code
        == 201
    )
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals",
        json=signed_approval(client, consortium.steward("a"), study, "hospital-a", "approved"),
        headers=consortium.steward("a"),
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "policy.denied"
    assert "frozen pending an audit" in response.json()["error"]["message"]
    current = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert all(s["decision"] is None for s in current["sites"])


def test_dataset_with_another_purpose_is_denied(client: TestClient, consortium: People) -> None:
    body = dataset_body("bc-a2", "hospital-a", allowed_purposes=["public_health"])
    assert (
        client.post("/api/v1/datasets", json=body, headers=consortium.steward("a")).status_code
        == 201
    )
    study = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a2", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    assert study["state"] == "rejected"
    assert "bc-a2" in study["state_reason"]


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.parametrize(
    ("summary_json", "message"),
    [
        (json.dumps(_nested(900)), "nests deeper"),
        (json.dumps(_nested(20)), "nests deeper"),
        ('{"name": "\\ud800"}', "not valid Unicode"),
        ('{"n": NaN}', "finite"),
        ('{"n": 1e999}', "finite"),
        ('{"n": ' + str(2**64) + "}", "2^53"),
    ],
    ids=["900-levels", "20-levels", "lone-surrogate", "nan", "infinity", "huge-int"],
)
def test_a_feature_summary_that_cannot_be_stored_is_a_422(
    client: TestClient, consortium: People, summary_json: str, message: str
) -> None:
    """Bad summaries are refused with a stable code and the request id (never a 500), and
    nothing is published."""
    body = json.dumps(dataset_body("bc-a3", "hospital-a", feature_summary={"x": 0}))
    text = body.replace('{"x": 0}', summary_json)
    response = client.post(
        "/api/v1/datasets",
        content=text,
        headers={**consortium.steward("a"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["request_id"]
    assert error["code"] == "request.invalid"
    assert message in json.dumps(error)
    listed = client.get("/api/v1/datasets", headers=consortium.researcher).json()
    assert "bc-a3" not in {d["id"] for d in listed}
