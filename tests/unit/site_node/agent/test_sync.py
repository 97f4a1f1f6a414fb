"""Study sync: a site follows only the studies it approved itself; the server's claims of
approvals, and contracts it changed, are refused; withdrawn studies are revoked locally."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from site_node.agent.sync import sync_approvals
from site_node.peers import PeerStore
from tests.unit.site_node.agent.conftest import World


def test_a_study_every_site_approved_here_is_active_with_its_verified_roster(
    world: World,
) -> None:
    study_id, contract_hash = world.submit_study()
    assert world.study(study_id)["state"] == "approved"
    for site in world.sites.values():
        record = site.store.get(contract_hash)
        assert record is not None
        assert record.study_id == study_id
        report = site.agent.run_pass()
        assert report.ok, report.steps
        assert report.sync is not None
        [active] = report.sync.active
        assert active.roster == ("hospital-a", "hospital-b", "hospital-c")
        assert active.approved_sites == ("hospital-a", "hospital-b", "hospital-c")
        assert active.key_generator == "hospital-a"
        assert active.fully_approved


def test_the_servers_claim_that_this_site_approved_is_not_believed(world: World) -> None:
    """Attack: the server reports site c's decision as approved (and the study approved)
    although c's steward never approved. c records nothing and takes no key."""
    study_id, contract_hash = world.submit_study(approve=("a", "b"))
    site = world.sites["c"]

    def forge(request: httpx.Request, body: Any) -> Any:
        if request.url.path == "/api/v1/studies":
            for summary in body:
                summary["state"] = "approved"
        if request.url.path == f"/api/v1/studies/{study_id}":
            body["state"] = "approved"
            for entry in body["sites"]:
                if entry["site_id"] == "hospital-c":
                    entry.update(decision="approved", contract_hash=contract_hash)
        return body

    site.transport.rewrite = forge
    report = site.agent.run_pass()
    assert report.sync is not None
    assert report.sync.unapproved == [study_id]
    assert report.sync.active == []
    assert site.store.get(contract_hash) is None
    assert site.store.study_key(study_id) is None
    assert not any("/keys" in path for path in site.transport.posts())


def test_a_contract_the_server_changed_after_approval_is_refused(world: World) -> None:
    study_id, contract_hash = world.submit_study()
    site = world.sites["b"]

    def alter(request: httpx.Request, body: Any) -> Any:
        if request.url.path == f"/api/v1/studies/{study_id}":
            body["contract"]["privacy"]["epsilon"] = 9.0  # the server "changes" the contract
        return body

    site.transport.rewrite = alter
    report = site.agent.run_pass()
    assert not report.ok
    assert report.sync is not None
    assert report.sync.refused == {study_id: "agent.contract_hash_mismatch"}
    assert report.sync.active == []
    assert site.store.get(contract_hash) is not None  # what the steward approved stays


def test_a_contract_rewritten_with_its_hash_is_not_the_approved_one(world: World) -> None:
    """A server that rewrites both contract and hash serves a hash this site never
    approved: refused, and the approved contract is what the site keeps."""
    study_id, contract_hash = world.submit_study()
    site = world.sites["c"]
    from concord_protocol.contract import StudyContract

    def alter(request: httpx.Request, body: Any) -> Any:
        if request.url.path == f"/api/v1/studies/{study_id}":
            body["contract"]["training"]["rounds"] = 50
            body["contract_hash"] = StudyContract.model_validate(body["contract"]).contract_hash()
        return body

    site.transport.rewrite = alter
    report = site.agent.run_pass()
    assert report.sync is not None
    assert report.sync.refused == {study_id: "agent.approval_hash_mismatch"}
    record = site.store.get(contract_hash)
    assert record is not None
    assert record.contract.training.rounds == 3


def test_a_peer_approval_without_a_valid_signature_does_not_count(world: World) -> None:
    """Attack: the server shows b's approval with a signature b never made. a does not count
    b as approved, so the generator seals no key yet."""
    study_id, _ = world.submit_study()
    site = world.sites["a"]

    def forge(request: httpx.Request, body: Any) -> Any:
        if request.url.path == f"/api/v1/studies/{study_id}":
            for entry in body["sites"]:
                if entry["site_id"] == "hospital-b":
                    entry["signature"] = base64.b64encode(
                        world.sites["c"].keys.signing_key.sign(b"another decision")
                    ).decode()
        return body

    site.transport.rewrite = forge
    report = site.agent.run_pass()
    assert report.sync is not None
    [active] = report.sync.active
    assert active.approved_sites == ("hospital-a", "hospital-c")
    assert not active.fully_approved
    assert report.keys is not None
    assert report.keys.waiting == [study_id]
    assert site.store.study_key(study_id) is None


def test_a_peer_that_is_not_pinned_does_not_count_as_approved(world: World) -> None:
    _study_id, _ = world.submit_study()
    site = world.sites["a"]
    PeerStore(site.state_dir).unpin("hospital-c")
    result = sync_approvals(
        site.api, site_id=site.site_id, store=site.store, peers=PeerStore(site.state_dir).all()
    )
    [active] = result.active
    assert active.approved_sites == ("hospital-a", "hospital-b")


def test_a_decision_made_while_the_server_was_down_is_posted_by_the_agent(
    world: World,
) -> None:
    from site_node.studies import decide_study

    study_id, contract_hash = world.submit_study(approve=("a", "b"))
    site = world.sites["c"]
    review = world.review("c", study_id)
    site.transport.fail_next = [503]
    _, posted = decide_study(
        site.api,
        review,
        decision="approved",
        contract_hash=contract_hash,
        reason="DAC minutes 12",
        site_id=site.site_id,
        keys=site.keys,
        store=site.store,
    )
    assert not posted
    assert world.study(study_id)["state"] == "awaiting_approvals"
    report = site.agent.run_pass()
    assert report.sync is not None
    assert report.sync.recorded == [study_id]
    assert world.study(study_id)["state"] == "approved"
    again = site.agent.run_pass()
    assert again.sync is not None
    assert again.sync.recorded == []


def test_an_aborted_study_is_revoked_locally_with_its_key(world: World) -> None:
    study_id, contract_hash = world.submit_study()
    a = world.sites["a"]
    assert a.agent.run_pass().ok
    assert a.store.study_key(study_id) is not None

    r = world.client.post(
        f"/api/v1/studies/{study_id}/abort",
        json={"reason": "ethics approval withdrawn"},
        headers=world.people.researcher,
    )
    assert r.status_code == 200, r.text
    report = a.agent.run_pass()

    assert report.ok, report.steps
    assert report.sync is not None
    assert report.sync.revoked == [study_id]
    assert a.store.get(contract_hash) is None
    assert a.store.study_key(study_id) is None
    again = a.agent.run_pass()
    assert again.sync is not None
    assert again.sync.revoked == []
