"""Study sync: approved contracts land in every site's ApprovalStore, re-hashed; altered
contracts are refused; withdrawn studies are revoked locally."""

from __future__ import annotations

from typing import Any

import httpx

from site_node.agent.sync import sync_approvals
from tests.unit.site_node.agent.conftest import World


def test_study_approved_by_all_three_sites_is_recorded_at_each_site(world: World) -> None:
    study_id, contract_hash = world.submit_study()
    assert world.study(study_id)["state"] == "approved"

    for site in world.sites.values():
        assert site.store.get(contract_hash) is None
        report = site.agent.run_pass()
        assert report.ok, report.steps
        assert report.sync is not None
        assert report.sync.recorded == [study_id]
        record = site.store.get(contract_hash)
        assert record is not None
        assert record.study_id == study_id
        assert record.contract.contract_hash() == contract_hash
        assert [s.approved_sites for s in report.sync.active] == [
            ("hospital-a", "hospital-b", "hospital-c")
        ]


def test_study_awaiting_approvals_is_not_recorded(world: World) -> None:
    study_id, _contract_hash = world.submit_study(approve=("a", "b"))
    assert world.study(study_id)["state"] == "awaiting_approvals"
    result = sync_approvals(
        world.sites["a"].api, site_id="hospital-a", store=world.sites["a"].store
    )
    assert result.recorded == []
    assert result.active == []
    assert world.sites["a"].store.approved_hashes() == set()


def test_contract_that_does_not_match_its_hash_is_refused(world: World) -> None:
    study_id, _contract_hash = world.submit_study()
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
    assert site.store.approved_hashes() == set()
    assert [s.name for s in report.steps if not s.ok] == ["sync"]


def test_hash_rewritten_along_with_the_contract_is_not_the_approved_study(world: World) -> None:
    """A server that rewrites both contract and hash sends a hash nobody approved: the
    store only ever holds a contract that hashes to the hash it is filed under."""
    study_id, contract_hash = world.submit_study()
    site = world.sites["c"]

    def alter(request: httpx.Request, body: Any) -> Any:
        if request.url.path == f"/api/v1/studies/{study_id}":
            for entry in body["sites"]:
                if entry["site_id"] == "hospital-c":
                    entry["contract_hash"] = "0" * 64  # its approval names another hash
        return body

    site.transport.rewrite = alter
    report = site.agent.run_pass()
    assert report.sync is not None
    assert report.sync.refused == {study_id: "agent.approval_hash_mismatch"}
    assert site.store.get(contract_hash) is None


def test_aborted_study_is_revoked_locally(world: World) -> None:
    study_id, contract_hash = world.submit_study()
    site = world.sites["a"]
    assert site.agent.run_pass().ok
    assert site.store.get(contract_hash) is not None

    r = world.client.post(
        f"/api/v1/studies/{study_id}/abort",
        json={"reason": "ethics approval withdrawn"},
        headers=world.people.researcher,
    )
    assert r.status_code == 200, r.text
    report = site.agent.run_pass()

    assert report.ok, report.steps
    assert report.sync is not None
    assert report.sync.revoked == [study_id]
    assert site.store.get(contract_hash) is None
    assert site.store.approved_hashes() == set()
    # and revoking is idempotent
    again = site.agent.run_pass()
    assert again.sync is not None
    assert again.sync.revoked == []
