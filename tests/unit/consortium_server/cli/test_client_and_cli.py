"""The Python client and the `consortium` CLI against the real app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concord_protocol.client import ApiError, ConsortiumClient
from tests.support.cli import run_cli as _cli
from tests.support.world import People, signed_approval, study_contract


@pytest.fixture
def api(client: TestClient, consortium: People) -> ConsortiumClient:
    return ConsortiumClient(
        "http://testserver",
        consortium.researcher["Authorization"][7:],
        transport=client._transport,  # the app itself, in process
    )


def test_client_submits_and_reads(api: ConsortiumClient) -> None:
    study = api.submit_study(study_contract(["bc-a", "bc-b", "bc-c"]))
    assert api.get_study(study["id"])["contract_hash"] == study["contract_hash"]
    assert [s["id"] for s in api.list_studies()] == [study["id"]]
    assert {d["id"] for d in api.list_datasets()} == {"bc-a", "bc-b", "bc-c"}


def test_client_raises_api_errors_with_codes(api: ConsortiumClient) -> None:
    with pytest.raises(ApiError) as info:
        api.get_study("nope")
    assert info.value.status == 404
    assert info.value.code == "study.not_found"
    assert info.value.request_id


def test_client_reports_an_unreachable_server() -> None:
    with pytest.raises(ApiError) as info:
        ConsortiumClient("http://127.0.0.1:9", "t", timeout_s=2).me()
    assert info.value.code == "connection"


def test_client_renews_tokens_through_a_callable(client: TestClient, consortium: People) -> None:
    calls: list[int] = []

    def provider() -> str:
        calls.append(1)
        return consortium.researcher["Authorization"][7:]

    api = ConsortiumClient("http://testserver", provider, transport=client._transport)
    api.me()
    api.me()
    assert len(calls) == 2


def test_cli_submit_then_anyone_checks_the_signed_decisions(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_contract(["bc-a", "bc-b", "bc-c"])))
    code, out = _cli(
        client, monkeypatch, consortium.researcher, "--json", "study", "submit", str(path)
    )
    assert code == 0, out
    study = json.loads(out)
    assert study["state"] == "awaiting_approvals"
    assert [m["site_id"] for m in study["contract"]["roster"]] == [
        "hospital-a",
        "hospital-b",
        "hospital-c",
    ]
    for site in "ab":
        body = signed_approval(client, consortium.steward(site), study, f"hospital-{site}")
        response = client.post(
            f"/api/v1/studies/{study['id']}/approvals", json=body, headers=consortium.steward(site)
        )
        assert response.status_code == 201, response.text
    code, out = _cli(
        client, monkeypatch, consortium.compliance, "--json", "study", "decisions", study["id"]
    )
    assert code == 0, out
    checks = {row["site_id"]: row for row in json.loads(out)}
    assert "signature verified" in checks["hospital-a"]["check"]
    assert "signature verified" in checks["hospital-b"]["check"]
    assert checks["hospital-c"]["check"] == "no decision yet"


def test_cli_decisions_exposes_a_decision_the_database_forged(
    client: TestClient,
    consortium: People,
    monkeypatch: pytest.MonkeyPatch,
    app: FastAPI,
) -> None:
    """An operator with write access to the database edits a recorded decline into an
    approval: the signature no longer covers it, and the check says so."""
    from consortium_server.studies.models import ApprovalDecision, StudyApproval

    study = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    body = signed_approval(
        client, consortium.steward("a"), study, "hospital-a", "declined", "Cohort overlaps."
    )
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=consortium.steward("a")
    )
    assert response.status_code == 201, response.text
    with app.state.sessionmaker() as session:
        row = session.query(StudyApproval).filter_by(study_id=study["id"]).one()
        row.decision = ApprovalDecision.APPROVED
        row.reason = ""
        session.commit()
    code, out = _cli(client, monkeypatch, consortium.compliance, "study", "decisions", study["id"])
    assert code == 1
    assert "NOT VERIFIED" in out


def test_cli_rejected_study_exits_2(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_contract(["bc-a"])))
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 2
    assert "rejected" in out


def test_cli_names_invalid_fields(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    contract = study_contract(["bc-a", "bc-b", "bc-c"])
    del contract["purpose"]
    path.write_text(yaml.safe_dump(contract))
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 1
    assert "body.purpose" in out


def test_cli_refuses_a_non_mapping_file(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("- just\n- a list\n")
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 1
    assert "mapping" in out
