"""What the API writes into the audit log: sign-ins refused, study submissions with the
policy decision, each site decision, every state change, policy changes; and the log
verifies end to end afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from concord_protocol.audit.entries import AuditEntry
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People, build_consortium, signed_approval, study_contract


def _entries(app: FastAPI) -> list[AuditEntry]:
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        return [log.get_entry(i, session=session).entry for i in range(log.size(session=session))]


def _entry(app: FastAPI, action: str) -> list[AuditEntry]:
    return [e for e in _entries(app) if e.action == action]


def test_policy_seed_is_the_first_entry(client: TestClient, app: FastAPI) -> None:
    first = _entries(app)[0]
    assert first.action == "policy.published"
    assert first.policy is not None


def test_refused_sign_ins_are_recorded_without_the_token(client: TestClient, app: FastAPI) -> None:
    client.get(
        "/api/v1/studies",
        headers={"Authorization": "Bearer not-a-token", "X-Request-ID": "req-0000001"},
    )
    client.get("/api/v1/studies")  # no token at all: not a sign-in attempt
    refused = _entry(app, "auth.sign_in_refused")
    assert len(refused) == 1
    entry = refused[0]
    assert entry.outcome.value == "denied"
    assert entry.request_id == "req-0000001"
    assert entry.details["code"] == "auth.invalid_token"
    assert "not-a-token" not in entry.canonical_bytes().decode()


@pytest.mark.slow
def test_ten_thousand_bad_tokens_grow_the_log_by_two_entries(settings: ServerSettings) -> None:
    """Anyone can send forged tokens; nobody can grow the log with them. 10,000 refused
    sign-ins over HTTP from one source add its first refusal and, when the window closes
    (here: the server stops), one summary that counts the other 9,999; the server holds one
    counter for them all."""
    app = create_app(settings)
    headers = ["Bearer not-a-token", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "Bearer"]
    with TestClient(app) as client:
        before = len(_entries(app))
        for i in range(10_000):
            response = client.get("/api/v1/studies", headers={"Authorization": headers[i % 4]})
            assert response.status_code == 401
        assert len(_entries(app)) == before + 1
        assert app.state.refused_sign_ins.counters == 1
    entries = _entries(app)
    assert len(entries) == before + 2
    (single,) = [e for e in entries if e.action == "auth.sign_in_refused"]
    assert single.details["count"] == 1
    (summary,) = [e for e in entries if e.action == "auth.sign_ins_refused"]
    assert summary.details["total"] == 9_999
    assert summary.details["by_source"] == [
        {"client": "testclient", "code": "auth.invalid_token", "count": 9_999}
    ]


def test_study_lifecycle_is_recorded(client: TestClient, consortium: People, app: FastAPI) -> None:
    study: dict[str, Any] = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    for site in "abc":
        client.post(
            f"/api/v1/studies/{study['id']}/approvals",
            json=signed_approval(
                client, consortium.steward(site), study, f"hospital-{site}", "approved", "DAC ok"
            ),
            headers=consortium.steward(site),
        )
    actions = [e.action for e in _entries(app) if e.object.id == study["id"]]
    assert actions == [
        "policy.decision",
        "study.submitted",
        "study.awaiting_approvals",
        "study.site_approved",
        "study.site_approved",
        "study.site_approved",
        "study.approved",
    ]
    decision = _entry(app, "policy.decision")[-1]
    assert decision.policy is not None
    assert decision.policy.decision.value == "allow"
    assert decision.contract_hash == study["contract_hash"]
    approvals = _entry(app, "study.site_approved")
    assert {e.details["site_id"] for e in approvals} == {"hospital-a", "hospital-b", "hospital-c"}
    assert approvals[0].actor.subject == "steward-a"
    assert approvals[0].actor.roles == ("data_steward",)
    assert approvals[0].purpose == "diagnostic_research"


def test_rejection_records_the_denying_decision(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    contract = study_contract(["bc-a", "bc-b", "bc-c"], purpose="commercial_research")
    study = client.post("/api/v1/studies", json=contract, headers=consortium.researcher).json()
    decision = _entry(app, "policy.decision")[-1]
    assert decision.object.id == study["id"]
    assert decision.policy is not None
    assert decision.policy.decision.value == "deny"
    assert any("commercial_research" in r for r in decision.details["reasons"])
    rejected = _entry(app, "study.rejected")[-1]
    assert rejected.outcome.value == "denied"


def test_log_verifies_after_activity(client: TestClient, consortium: People, app: FastAPI) -> None:
    from consortium_server.audit.verify import verify_live

    client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    )
    head = client.get("/api/v1/audit/heads/latest", headers=consortium.compliance).json()
    assert head["tree_size"] == len(_entries(app))
    with app.state.sessionmaker() as session:
        report = verify_live(session, server_public_key=app.state.tree_head_signer.public_key_b64)
    assert report.ok, report.summary()


def test_cli_verifies_the_live_log(
    client: TestClient, consortium: People, app: FastAPI, monkeypatch: Any, tmp_path: Path
) -> None:
    import consortium_server.cli.common as common
    from concord_protocol.client import ConsortiumClient
    from consortium_server.cli import app as cli_app

    client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    )
    client.get("/api/v1/audit/heads/latest", headers=consortium.compliance)
    transport = client._transport
    original = ConsortiumClient.__init__

    def patched(self: ConsortiumClient, base_url: str, token: object = None, **_: object) -> None:
        original(self, "http://testserver", token, transport=transport)  # type: ignore[arg-type]

    monkeypatch.setattr(common.ConsortiumClient, "__init__", patched)
    token = consortium.compliance["Authorization"][7:]
    result = CliRunner().invoke(cli_app, ["--token", token, "audit", "verify"])
    assert result.exit_code == 2, result.output  # no keys obtained out of band
    # The keys as the officer got them out of band: the operator's head key, the sites'
    # signing keys from each hospital (here: the sites the test enrolled).
    from concord_protocol.audit.trusted_keys import write_site_keys
    from consortium_server.sites.models import Site

    with app.state.sessionmaker() as session:
        sites = {s.id: s.signing_public_key for s in session.query(Site)}
    write_site_keys(tmp_path / "site-keys.json", sites)
    trusted = [
        "--server-key",
        app.state.tree_head_signer.public_key_b64,
        "--site-keys",
        str(tmp_path / "site-keys.json"),
    ]
    result = CliRunner().invoke(cli_app, ["--token", token, "audit", "verify", *trusted])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    # No site cosigned anything in this test: asking for a quorum fails.
    result = CliRunner().invoke(
        cli_app, ["--token", token, "audit", "verify", *trusted, "--quorum", "1"]
    )
    assert result.exit_code == 1, result.output
    assert "quorum_not_met" in result.output


def test_enrolment_and_publication_are_recorded(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    enrolled = _entry(app, "site.enrolled")
    assert [e.object.id for e in enrolled] == ["hospital-a", "hospital-b", "hospital-c"]
    assert enrolled[0].actor.subject == "olga-operator"
    published = _entry(app, "dataset.published")
    assert [e.details["site_id"] for e in published] == ["hospital-a", "hospital-b", "hospital-c"]


def test_stewards_and_nodes_read_only_their_studies_and_consortium_wide_entries(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    every = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    build_consortium(client, consortium, sites=("d",))  # a fourth hospital
    without_a = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-b", "bc-c", "bc-d"]),
        headers=consortium.researcher,
    ).json()
    assert without_a["state"] == "awaiting_approvals", without_a
    client.get("/api/v1/studies", headers={"Authorization": "Bearer not-a-token"})
    client.get("/api/v1/audit/heads/latest", headers=consortium.compliance)
    entries = _entries(app)

    def index_of(action: str | None = None, object_id: str | None = None) -> int:
        return next(
            i
            for i, e in enumerate(entries)
            if action in (None, e.action) and object_id in (None, e.object.id)
        )

    def status(headers: dict[str, str], index: int) -> tuple[int, str]:
        response = client.get(f"/api/v1/audit/entries/{index}", headers=headers)
        return response.status_code, response.json().get("error", {}).get("code", "")

    own = index_of(object_id=every["id"])
    other = index_of(object_id=without_a["id"])
    enrolled = index_of("site.enrolled")
    refused = index_of("auth.sign_in_refused")
    hidden = (404, "audit.entry_not_found")
    for headers in (consortium.steward("a"), consortium.node("a")):
        assert status(headers, own)[0] == 200
        assert status(headers, enrolled)[0] == 200  # consortium-wide
        assert status(headers, other) == hidden  # exactly like an entry that does not exist
        assert status(headers, refused) == hidden  # other callers' addresses
        assert status(headers, len(entries) + 50) == hidden
    assert status(consortium.steward("b"), other)[0] == 200
    assert status(consortium.steward("d"), own) == hidden
    for headers in (consortium.compliance, consortium.admin):
        assert status(headers, other)[0] == 200
        assert status(headers, refused)[0] == 200

    # Consortium-wide entries that name a study hospital-a is not part of stay hidden from
    # it: a revocation lists the studies it aborted; a report view names the officer's
    # filters.
    revoked = client.post(
        "/api/v1/sites/hospital-b/revoke", json={"reason": "left"}, headers=consortium.admin
    )
    assert revoked.status_code == 200, revoked.text
    viewed = client.get(
        "/reports/compliance", params={"study": without_a["id"]}, headers=consortium.compliance
    )
    assert viewed.status_code == 200, viewed.text
    entries = _entries(app)
    revocation = index_of("site.revoked")
    assert without_a["id"] in entries[revocation].details["aborted_studies"]
    report_view = index_of("report.viewed")
    assert status(consortium.steward("a"), revocation) == hidden
    assert status(consortium.steward("a"), report_view) == hidden
    assert status(consortium.steward("c"), revocation)[0] == 200  # part of both studies
    assert status(consortium.compliance, report_view)[0] == 200
