"""Study key relay API: right site only, the server stores no secret, roles, study states."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from consortium_server.federation.models import SealedStudyKey, StudyKeyRelay
from consortium_server.studies.models import (
    ApprovalDecision,
    Study,
    StudyApproval,
    StudySite,
    StudyState,
)
from site_node.crypto import (
    SiteKeyPair,
    generate_study_context,
    open_study_key,
    public_context,
    seal_study_key,
    study_key_fingerprint,
)
from tests.support.roster import contract_of
from tests.support.world import People, dataset_body, study_contract

SITES = ("a", "b", "c")


@pytest.fixture
def site_keys(client: TestClient, people: People) -> dict[str, SiteKeyPair]:
    """Three enrolled hospitals whose private keys the test holds."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = {}
    for s in SITES:
        pair = SiteKeyPair.generate()
        supernode = ec.generate_private_key(ec.SECP384R1()).public_key()
        body = {
            "id": f"hospital-{s}",
            "organisation": f"Hospital {s}",
            "display_name": f"Hospital {s}",
            "contact_email": f"it@hospital-{s}.example.org",
            "signing_public_key": pair.signing_public_b64,
            "exchange_public_key": pair.exchange_public_b64,
            "supernode_public_key": supernode.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode(),
        }
        assert client.post("/api/v1/sites", json=body, headers=people.admin).status_code == 201
        ds = dataset_body(f"bc-{s}", f"hospital-{s}")
        r = client.post("/api/v1/datasets", json=ds, headers=people.steward(s))
        assert r.status_code == 201, r.text
        keys[f"hospital-{s}"] = pair
    return keys


def _study(app: FastAPI, state: StudyState, *, approve: tuple[str, ...] = SITES) -> tuple[str, str]:
    contract = contract_of(study_contract([f"bc-{s}" for s in SITES]))
    with app.state.sessionmaker() as session:
        study = Study(
            title=contract.title,
            owner_subject="rita-researcher",
            contract=contract.model_dump(mode="json"),
            contract_hash=contract.contract_hash(),
            state=state,
            approval_deadline=datetime.now(UTC) + timedelta(days=7),
        )
        session.add(study)
        session.flush()
        for s in SITES:
            session.add(StudySite(study_id=study.id, site_id=f"hospital-{s}"))
        for s in approve:
            session.add(
                StudyApproval(
                    study_id=study.id,
                    site_id=f"hospital-{s}",
                    decision=ApprovalDecision.APPROVED,
                    contract_hash=contract.contract_hash(),
                    decided_by=f"steward-{s}",
                )
            )
        session.commit()
        return study.id, contract.contract_hash()


def _body(
    keys: dict[str, SiteKeyPair], study_id: str, contract_hash: str, secret: bytes
) -> dict[str, Any]:
    sealed = [
        seal_study_key(
            secret,
            sender_id="hospital-a",
            sender_signing_key=keys["hospital-a"].signing_key,
            recipient_id=r,
            recipient_exchange_public=keys[r].exchange_public,
            study_id=study_id,
            contract_hash=contract_hash,
        ).model_dump(mode="json")
        for r in ("hospital-b", "hospital-c")
    ]
    return {
        "public_context": base64.b64encode(public_context(secret)).decode(),
        "key_fingerprint": study_key_fingerprint(secret),
        "sealed_keys": sealed,
    }


@pytest.fixture(scope="module")
def secret() -> bytes:
    return generate_study_context()


def test_relay_round_trip_and_the_server_holds_no_secret(
    app: FastAPI,
    client: TestClient,
    people: People,
    site_keys: dict[str, SiteKeyPair],
    secret: bytes,
) -> None:
    study_id, chash = _study(app, StudyState.APPROVED)
    url = f"/api/v1/studies/{study_id}/keys"
    r = client.post(url, json=_body(site_keys, study_id, chash, secret), headers=people.node("a"))
    assert r.status_code == 201, r.text
    assert r.json()["recipients"] == ["hospital-b", "hospital-c"]

    mine = client.get(f"{url}/mine", headers=people.node("b"))
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["sender_site_id"] == "hospital-a"
    from site_node.crypto import SealedKey

    opened = open_study_key(
        SealedKey.model_validate(body["sealed_key"]),
        recipient_exchange_private=site_keys["hospital-b"].exchange_key,
        sender_signing_public=site_keys["hospital-a"].signing_public,
        expected_study_id=study_id,
        expected_contract_hash=chash,
        expected_recipient_id="hospital-b",
        expected_public_context_sha256=hashlib.sha256(
            base64.b64decode(body["public_context"])
        ).hexdigest(),
    )
    assert opened == secret
    sender_view = client.get(f"{url}/mine", headers=people.node("a")).json()
    assert sender_view["sealed_key"] is None

    with app.state.sessionmaker() as session:
        relay = session.get(StudyKeyRelay, study_id)
        assert relay is not None
        assert relay.public_context == public_context(secret)
        stored = (
            b"".join(str(row.sealed).encode() for row in session.scalars(select(SealedStudyKey)))
            + relay.public_context
        )
    assert secret not in stored
    assert len(relay.public_context) < 1024

    again = client.post(
        url, json=_body(site_keys, study_id, chash, secret), headers=people.node("a")
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "keys.exists"

    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    steps = [(e.action, e.actor.subject) for e in entries if e.object.id == study_id]
    assert steps == [
        ("keys.relayed", "service-account-a"),
        ("keys.fetched", "service-account-b"),
        ("keys.fetched", "service-account-a"),
    ]
    relayed = next(e for e in entries if e.action == "keys.relayed")
    assert relayed.details["recipients"] == ["hospital-b", "hospital-c"]
    assert secret.hex()[:64] not in relayed.canonical_bytes().decode()


def test_secret_context_is_refused(
    app: FastAPI,
    client: TestClient,
    people: People,
    site_keys: dict[str, SiteKeyPair],
    secret: bytes,
) -> None:
    study_id, chash = _study(app, StudyState.RUNNING)
    body = _body(site_keys, study_id, chash, secret)
    body["public_context"] = base64.b64encode(secret).decode()
    r = client.post(f"/api/v1/studies/{study_id}/keys", json=body, headers=people.node("a"))
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "keys.secret_context"
    with app.state.sessionmaker() as session:
        assert session.get(StudyKeyRelay, study_id) is None


@pytest.mark.parametrize("who", ["researcher", "steward", "admin"])
def test_wrong_role_is_forbidden(
    app: FastAPI,
    client: TestClient,
    people: People,
    site_keys: dict[str, SiteKeyPair],
    secret: bytes,
    who: str,
) -> None:
    study_id, chash = _study(app, StudyState.APPROVED)
    headers = {
        "researcher": people.researcher,
        "steward": people.steward("a"),
        "admin": people.admin,
    }[who]
    url = f"/api/v1/studies/{study_id}/keys"
    assert (
        client.post(
            url, json=_body(site_keys, study_id, chash, secret), headers=headers
        ).status_code
        == 403
    )
    assert client.get(f"{url}/mine", headers=headers).status_code == 403


def test_unapproved_study_and_unapproved_site_are_refused(
    app: FastAPI,
    client: TestClient,
    people: People,
    site_keys: dict[str, SiteKeyPair],
    secret: bytes,
) -> None:
    study_id, chash = _study(app, StudyState.AWAITING_APPROVALS)
    r = client.post(
        f"/api/v1/studies/{study_id}/keys",
        json=_body(site_keys, study_id, chash, secret),
        headers=people.node("a"),
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "keys.study_not_ready"

    # b and c approved, a did not: a may not relay, and a key for a is not expected.
    study_id, chash = _study(app, StudyState.APPROVED, approve=("b", "c"))
    r = client.post(
        f"/api/v1/studies/{study_id}/keys",
        json=_body(site_keys, study_id, chash, secret),
        headers=people.node("a"),
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "keys.not_study_site"


def test_other_site_cannot_fetch_and_forged_keys_are_refused(
    app: FastAPI,
    client: TestClient,
    people: People,
    site_keys: dict[str, SiteKeyPair],
    secret: bytes,
) -> None:
    study_id, chash = _study(app, StudyState.APPROVED)
    url = f"/api/v1/studies/{study_id}/keys"
    # A sealed key signed by another site's key (not the caller's enrolled key).
    forged = _body(site_keys, study_id, chash, secret)
    forged_keys = dict(site_keys)
    forged_keys["hospital-a"] = site_keys["hospital-b"]
    forged["sealed_keys"] = _body(forged_keys, study_id, chash, secret)["sealed_keys"]
    r = client.post(url, json=forged, headers=people.node("a"))
    assert r.status_code == 422
    assert "not signed" in r.json()["error"]["message"]
    # Missing a recipient.
    short = _body(site_keys, study_id, chash, secret)
    short["sealed_keys"] = short["sealed_keys"][:1]
    assert client.post(url, json=short, headers=people.node("a")).status_code == 422
    # Before any relay, nothing to fetch; an organisation outside the study is refused.
    assert client.get(f"{url}/mine", headers=people.node("b")).status_code == 404
    outsider = people.headers("svc-x", ["site_node"], "Hospital x")
    assert client.get(f"{url}/mine", headers=outsider).status_code == 403
