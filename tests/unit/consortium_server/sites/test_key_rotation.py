"""A site changes its keys with a rotation signed by the old and the new key; the server
relays and audits it, and cannot make one itself."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concord_protocol.fields import format_utc, utcnow
from concord_protocol.site_keys import KeyRotation, follow_rotations, sign_rotation
from site_node.crypto.sealing import SiteKeyPair
from site_node.peers import own_keys
from tests.support.roster import site_keys
from tests.support.world import SIGNING_KEYS, People, signed_approval, study_contract


def _rotation(site_id: str, old: SiteKeyPair, new: SiteKeyPair) -> KeyRotation:
    return sign_rotation(
        site_id=site_id,
        previous=own_keys(site_id, old),
        previous_signing_key=old.signing_key,
        new_signing_key=new.signing_key,
        new_exchange_public_key=new.exchange_public_b64,
        rotated_at=format_utc(utcnow()),
    )


def _post(client: TestClient, people: People, rotation: KeyRotation, site: str = "a") -> Any:
    return client.post(
        f"/api/v1/sites/hospital-{site}/keys",
        json=rotation.model_dump(mode="json"),
        headers=people.node(site),
    )


def test_a_signed_rotation_changes_the_keys_and_peers_can_follow_it(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    old, new = site_keys("hospital-a"), SiteKeyPair.generate()
    response = _post(client, consortium, _rotation("hospital-a", old, new))
    assert response.status_code == 200, response.text
    site = response.json()
    assert site["signing_public_key"] == new.signing_public_b64
    assert site["key_fingerprint"] == own_keys("hospital-a", new).fingerprint
    history = client.get("/api/v1/sites/hospital-a/keys/history", headers=consortium.researcher)
    assert history.status_code == 200
    rows = history.json()
    assert [r["seq"] for r in rows] == [1]
    rotations = [KeyRotation.model_validate(r["rotation"]) for r in rows]
    assert follow_rotations(own_keys("hospital-a", old), rotations) == own_keys("hospital-a", new)
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    rotated = [e for e in entries if e.action == "site.keys_rotated"]
    assert rotated[0].details["fingerprint"] == site["key_fingerprint"]
    assert rotated[0].details["rotation"]["new_signature"]


def test_the_server_cannot_make_a_rotation_without_the_sites_old_key(
    client: TestClient, consortium: People
) -> None:
    """A rotation signed by a key the site never had (what a server would have to forge)."""
    stranger, new = SiteKeyPair.generate(), SiteKeyPair.generate()
    forged = _rotation("hospital-a", site_keys("hospital-a"), new).model_copy(
        update={"previous_signature": stranger.signing_key.sign(b"anything")}
    )
    response = _post(client, consortium, forged)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "signature.invalid"
    site = client.get("/api/v1/sites/hospital-a", headers=consortium.researcher).json()
    assert site["signing_public_key"] == site_keys("hospital-a").signing_public_b64


def test_a_rotation_without_proof_of_the_new_key_is_refused(
    client: TestClient, consortium: People
) -> None:
    rotation = _rotation("hospital-a", site_keys("hospital-a"), SiteKeyPair.generate())
    unproven = rotation.model_copy(
        update={"new_signature": Ed25519PrivateKey.generate().sign(rotation.signed_bytes())}
    )
    response = _post(client, consortium, unproven)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "signature.invalid"


def test_a_rotation_from_other_keys_is_a_409(client: TestClient, consortium: People) -> None:
    stale = _rotation("hospital-a", SiteKeyPair.generate(), SiteKeyPair.generate())
    response = _post(client, consortium, stale)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "keys.rotation_invalid"


def test_a_site_cannot_rotate_another_sites_keys(client: TestClient, consortium: People) -> None:
    rotation = _rotation("hospital-b", site_keys("hospital-b"), SiteKeyPair.generate())
    response = client.post(
        "/api/v1/sites/hospital-b/keys",
        json=rotation.model_dump(mode="json"),
        headers=consortium.node("a"),
    )
    assert response.status_code == 403


def test_a_rotation_during_approvals_stops_the_old_roster_from_being_approved(
    client: TestClient, consortium: People
) -> None:
    study = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    new = SiteKeyPair.generate()
    assert (
        _post(client, consortium, _rotation("hospital-a", site_keys("hospital-a"), new)).status_code
        == 200
    )
    SIGNING_KEYS[new.signing_public_b64] = new.signing_key
    body = signed_approval(client, consortium.steward("a"), study, "hospital-a")
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=consortium.steward("a")
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "approval.roster_key_changed"
