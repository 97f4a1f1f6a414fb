"""Decisions made at the site (site_node.studies): the review a steward sees before approving,
and the approvals it refuses, tried as a malicious server or a rogue site would."""

from __future__ import annotations

from typing import Any

import pytest

from site_node.studies import StudyDecisionError, decide_study
from tests.support.world import dataset_body, site_enrolment, study_contract
from tests.unit.site_node.agent.conftest import World


def _decide(world: World, letter: str, study_id: str, contract_hash: str, **kw: Any) -> Any:
    site = world.sites[letter]
    return decide_study(
        site.api,
        world.review(letter, study_id),
        decision=kw.pop("decision", "approved"),
        contract_hash=contract_hash,
        reason=kw.pop("reason", ""),
        site_id=site.site_id,
        keys=site.keys,
        store=site.store,
    )


def _submit(world: World, datasets: list[str], **draft: Any) -> dict[str, Any]:
    response = world.client.post(
        "/api/v1/studies",
        json=study_contract(datasets) | draft,
        headers=world.people.researcher,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_study_within_every_policy_and_roster_is_approvable(world: World) -> None:
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    review = world.review("a", study["id"])
    assert review.approvable, review.problems
    assert review.policy is not None
    assert review.policy.allowed
    assert review.policy.site_policy_set_hash  # the site's own policy took part
    signed, posted = _decide(world, "a", study["id"], study["contract_hash"])
    assert posted
    assert signed.decision.site_id == "hospital-a"
    signed.verify(world.sites["a"].keys.signing_public_b64)
    assert world.sites["a"].store.get(study["contract_hash"]) is not None


def test_a_contract_over_the_sites_own_policy_is_refused_at_the_site(world: World) -> None:
    """Attack 4: encryption off, epsilon 100, 500 rounds. The consortium policy is loosened
    by the (malicious) operator so that the server lets it through; the site's default
    policy still refuses, and nothing is stored or posted."""
    files = dict(world.client.get("/api/v1/policy", headers=world.people.admin).json()["files"])
    response = world.client.post(
        "/api/v1/policy",
        json={"files": {"permits.cedar": files["permits.cedar"]}},  # every forbid dropped
        headers=world.people.admin,
    )
    assert response.status_code == 201, response.text
    study = _submit(
        world,
        ["bc-a", "bc-b", "bc-c"],
        encryption={"enabled": False},
        privacy={"epsilon": 100.0, "delta": 1e-5, "max_grad_norm": 1.0},
        training={"rounds": 500, "local_epochs": 1, "batch_size": 64, "learning_rate": 0.1},
    )
    assert study["state"] == "awaiting_approvals", study.get("state_reason")
    review = world.review("a", study["id"])
    assert not review.approvable
    ids = {r.policy_id for r in review.policy.reasons} if review.policy else set()
    assert {"site.require-encryption", "site.epsilon-cap", "site.max-rounds"} <= ids
    site = world.sites["a"]
    site.transport.requests.clear()
    with pytest.raises(StudyDecisionError) as info:
        _decide(world, "a", study["id"], study["contract_hash"])
    assert info.value.code == "study.refused"
    assert site.store.get(study["contract_hash"]) is None
    assert not any(path.endswith("/approvals") for path in site.transport.posts())


def test_a_sybil_site_that_sorts_first_cannot_become_the_key_generator(world: World) -> None:
    """Attack 3: the operator enrols a fake site whose id sorts first and gives it a dataset;
    it heads the roster and generates the key by default. No real site pinned it, so none
    can approve the study, and no key is ever sealed to or from it."""
    body = site_enrolment("hospital-0", "Hospital zero")
    assert (
        world.client.post("/api/v1/sites", json=body, headers=world.people.admin).status_code == 201
    )
    response = world.client.post(
        "/api/v1/datasets",
        json=dataset_body("bc-0", "hospital-0"),
        headers=world.people.headers("steward-0", ["data_steward"], "Hospital zero"),
    )
    assert response.status_code == 201, response.text
    study = _submit(world, ["bc-0", "bc-a", "bc-b", "bc-c"], federation={"min_sites": 3})
    assert study["contract"]["key_generator"] == "hospital-0"
    for letter in "abc":
        review = world.review(letter, study["id"])
        assert [p.code for p in review.problems if p.code.startswith("roster")] == [
            "roster.unpinned"
        ]
        with pytest.raises(StudyDecisionError):
            _decide(world, letter, study["id"], study["contract_hash"])


def test_a_roster_naming_other_keys_than_the_pinned_ones_is_refused(world: World) -> None:
    """Attack 3: the server swapped b's keys in its directory before the study was
    submitted, so the roster names the server's keys for b. a's pin disagrees."""
    from site_node.crypto.sealing import SiteKeyPair

    impostor = SiteKeyPair.generate()
    with world.client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        from consortium_server.sites.models import Site

        site = session.get(Site, "hospital-b")
        assert site is not None
        site.signing_public_key = impostor.signing_public_b64
        site.exchange_public_key = impostor.exchange_public_b64
        session.commit()
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    review = world.review("a", study["id"])
    assert [p.code for p in review.problems] == ["roster.key_mismatch"]
    review_b = world.review("b", study["id"])
    assert "roster.own_key_mismatch" in [p.code for p in review_b.problems]


def test_approving_a_hash_other_than_the_reviewed_one_is_refused(world: World) -> None:
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    with pytest.raises(StudyDecisionError) as info:
        _decide(world, "a", study["id"], "f" * 64)
    assert info.value.code == "study.not_reviewed"


def test_deciding_twice_is_refused_locally(world: World) -> None:
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    _decide(world, "a", study["id"], study["contract_hash"])
    with pytest.raises(StudyDecisionError) as info:
        _decide(world, "a", study["id"], study["contract_hash"])
    assert info.value.code == "study.already_decided"


def test_a_decline_is_signed_and_rejects_the_study(world: World) -> None:
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    signed, posted = _decide(
        world, "b", study["id"], study["contract_hash"], decision="declined", reason="Overlap."
    )
    assert posted
    assert signed.decision.decision == "declined"
    assert world.study(study["id"])["state"] == "rejected"
    assert world.sites["b"].store.get(study["contract_hash"]) is None


def test_other_sites_decisions_are_shown_verified_against_their_pins(world: World) -> None:
    study = _submit(world, ["bc-a", "bc-b", "bc-c"])
    _decide(world, "b", study["id"], study["contract_hash"])
    review = world.review("a", study["id"])
    shown = {d.site_id: d for d in review.peers}
    assert shown["hospital-b"].verified
    assert shown["hospital-b"].decision == "approved"
    assert shown["hospital-c"].decision is None
