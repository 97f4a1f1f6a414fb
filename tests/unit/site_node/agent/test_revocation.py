"""A revoked site drops what it held for its studies: revocation aborts them at the server
and ends the site's access; its next agent pass, refused with ``auth.site_revoked``,
withdraws every approval and deletes every study key, while the other sites keep theirs
until they, too, see the studies aborted."""

from __future__ import annotations

from concord_protocol.contract import StudyContract
from site_node.crypto import generate_study_context
from tests.unit.site_node.agent.conftest import World


def test_the_revoked_sites_next_pass_drops_the_keys_of_its_aborted_studies(
    world: World,
) -> None:
    study_id, contract_hash = world.submit_study(approve=())
    contract = StudyContract.model_validate(world.study(study_id)["contract"])
    assert contract.contract_hash() == contract_hash
    secret = generate_study_context()
    for site in world.sites.values():  # as if every site had approved and got the key
        site.store.approve(study_id, contract, contract_hash)
        site.store.save_study_key(study_id, secret, sender_id="hospital-a")

    response = world.client.post(
        "/api/v1/sites/hospital-b/revoke",
        json={"reason": "Credentials leaked."},
        headers=world.people.admin,
    )
    assert response.status_code == 200, response.text
    assert world.study(study_id)["state"] == "aborted"

    revoked = world.sites["b"]
    report = revoked.agent.run_pass()
    assert report.sync is not None
    assert report.sync.revoked == [study_id]
    # It read nothing to learn it: the server refuses a revoked site everything.
    peers = next(s for s in report.steps if s.name == "peers")
    assert (peers.ok, peers.code) == (False, "auth.site_revoked")
    assert revoked.store.get(contract_hash) is None
    assert revoked.store.study_key(study_id) is None
    assert not (revoked.state_dir / "federation" / "study-keys" / f"{study_id}.ctx").exists()

    again = revoked.agent.run_pass()  # idempotent: nothing left to drop
    assert again.sync is not None
    assert again.sync.revoked == []

    other = world.sites["a"]
    assert other.store.study_key(study_id) is not None  # until its own next pass
    other.agent.run_pass()
    assert other.store.study_key(study_id) is None
    assert other.store.get(contract_hash) is None
