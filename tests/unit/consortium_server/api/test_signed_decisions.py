"""Site decisions count only when signed by the key the study's roster names for the site.

The attacks: a server (or anyone holding a steward's token) records an approval the site
never signed; a signature over another decision, study or contract hash is replayed; a
site's keys are swapped in the directory after the stewards saw the roster.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from concord_protocol.site_keys import site_key_fingerprint
from tests.support.roster import site_keys
from tests.support.world import People, signed_approval, study_contract

ALL = ["bc-a", "bc-b", "bc-c"]


def _submit(client: TestClient, people: People, **draft: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/studies", json=study_contract(ALL) | draft, headers=people.researcher
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _post(client: TestClient, people: People, study: dict[str, Any], body: dict[str, Any]) -> Any:
    return client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=people.steward("a")
    )


def test_the_server_adds_the_roster_with_each_sites_key_fingerprint(
    client: TestClient, consortium: People
) -> None:
    study = _submit(client, consortium)
    roster = study["contract"]["roster"]
    assert [m["site_id"] for m in roster] == ["hospital-a", "hospital-b", "hospital-c"]
    for member in roster:
        keys = site_keys(member["site_id"])
        assert member["key_fingerprint"] == site_key_fingerprint(
            keys.signing_public_b64, keys.exchange_public_b64
        )
        assert member["max_examples"] == 190  # the record count the site published
    assert study["contract"]["key_generator"] == "hospital-a"
    site = client.get("/api/v1/sites/hospital-b", headers=consortium.researcher).json()
    assert site["key_fingerprint"] == roster[1]["key_fingerprint"]


def test_a_draft_naming_another_roster_is_refused(client: TestClient, consortium: People) -> None:
    fake = [
        {"site_id": "hospital-a", "key_fingerprint": "0" * 64, "max_examples": 190},
        {"site_id": "hospital-b", "key_fingerprint": "1" * 64, "max_examples": 190},
        {"site_id": "hospital-c", "key_fingerprint": "2" * 64, "max_examples": 190},
    ]
    response = client.post(
        "/api/v1/studies",
        json=study_contract(ALL) | {"roster": fake},
        headers=consortium.researcher,
    )
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "study.roster_mismatch"
    assert error["request_id"]
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


def test_a_key_generator_outside_the_roster_is_refused(
    client: TestClient, consortium: People
) -> None:
    response = client.post(
        "/api/v1/studies",
        json=study_contract(ALL) | {"key_generator": "hospital-z"},
        headers=consortium.researcher,
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "study.invalid"


def test_an_unsigned_approval_is_refused(client: TestClient, consortium: People) -> None:
    study = _submit(client, consortium)
    body = {
        "site_id": "hospital-a",
        "contract_hash": study["contract_hash"],
        "decision": "approved",
    }
    response = _post(client, consortium, study, body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "request.invalid"


def test_a_signature_that_does_not_cover_the_decision_is_refused_and_nothing_recorded(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = _submit(client, consortium)
    declined = signed_approval(
        client, consortium.steward("a"), study, "hospital-a", "declined", "no"
    )
    forged = declined | {"decision": "approved", "reason": ""}
    response = _post(client, consortium, study, forged)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "approval.signature_invalid"
    assert error["request_id"]
    current = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert all(s["decision"] is None for s in current["sites"])


def test_a_signature_for_another_study_is_not_replayable(
    client: TestClient, consortium: People
) -> None:
    first = _submit(client, consortium)
    second = _submit(client, consortium, title="A second study of the same data")
    body = signed_approval(client, consortium.steward("a"), first, "hospital-a")
    replayed = body | {"contract_hash": second["contract_hash"]}
    response = _post(client, consortium, second, replayed)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "approval.signature_invalid"


def test_a_signature_by_another_sites_key_is_refused(
    client: TestClient, consortium: People
) -> None:
    from concord_protocol.fields import format_utc, utcnow
    from concord_protocol.site_decisions import SiteDecision, sign_decision

    study = _submit(client, consortium)
    signed = sign_decision(
        SiteDecision(
            study_id=study["id"],
            contract_hash=study["contract_hash"],
            site_id="hospital-a",
            decision="approved",
            decided_at=format_utc(utcnow()),
        ),
        site_keys("hospital-b").signing_key,
    )
    body = {
        "site_id": "hospital-a",
        "contract_hash": study["contract_hash"],
        "decision": "approved",
        "reason": "",
        "decided_at": signed.decision.decided_at,
        "signature": signed.model_dump(mode="json")["signature"],
    }
    response = _post(client, consortium, study, body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "approval.signature_invalid"


def test_a_signature_that_is_not_base64_is_a_clear_422(
    client: TestClient, consortium: People
) -> None:
    study = _submit(client, consortium)
    body = signed_approval(client, consortium.steward("a"), study, "hospital-a")
    response = _post(client, consortium, study, body | {"signature": "not base64 !!"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "approval.signature_invalid"


def test_the_signed_decision_is_shown_and_audited(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    from concord_protocol.site_decisions import SignedDecision, SiteDecision

    study = _submit(client, consortium)
    body = signed_approval(client, consortium.steward("a"), study, "hospital-a", reason="ok")
    assert _post(client, consortium, study, body).status_code == 201
    shown = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    row = next(s for s in shown["sites"] if s["site_id"] == "hospital-a")
    assert row["signature"] == body["signature"]
    assert row["signed_at"] == body["decided_at"]
    # Anyone with the site's public key can check what the server shows.
    SignedDecision(
        decision=SiteDecision(
            study_id=study["id"],
            contract_hash=row["contract_hash"],
            site_id="hospital-a",
            decision=row["decision"],
            reason=row["reason"],
            decided_at=row["signed_at"],
        ),
        signature=row["signature"],
    ).verify(site_keys("hospital-a").signing_public_b64)
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    approved = [e for e in entries if e.action == "study.site_approved"]
    assert approved[-1].details["signature"] == body["signature"]
    assert approved[-1].details["signed_at"] == body["decided_at"]


def test_the_site_node_identity_may_post_its_sites_signed_decision(
    client: TestClient, consortium: People
) -> None:
    study = _submit(client, consortium)
    body = signed_approval(client, consortium.node("a"), study, "hospital-a")
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=consortium.node("a")
    )
    assert response.status_code == 201, response.text
