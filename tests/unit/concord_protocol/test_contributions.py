"""Signed contributions and manifests: what a reply states, and what an aggregate lists."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from concord_protocol.contributions import (
    AggregateManifest,
    Contribution,
    ManifestError,
    SignedContribution,
    sign_contribution,
)
from concord_protocol.site_keys import SignatureError
from consortium_server.federation.plan import RunPlan, SitePeer
from tests.support.flower import breast_cancer_contract
from tests.support.roster import site_keys

HASH = "cd" * 32
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _signed(site: str, *, round_number: int = 2, weight: int = 40, key: object = None) -> Any:
    contribution = Contribution(
        study_id="s-1",
        contract_hash=HASH,
        attempt="0" * 32,
        round_number=round_number,
        site_id=site,
        update_digest="ee" * 32,
        weight=weight,
    )
    return sign_contribution(contribution, key or site_keys(site).signing_key)  # type: ignore[arg-type]


def _keys() -> dict[str, str]:
    return {s: site_keys(s).signing_public_b64 for s in SITES}


def _verify(manifest: AggregateManifest, **kw: object) -> None:
    args: dict[str, object] = {
        "study_id": "s-1",
        "contract_hash": HASH,
        "round_number": 2,
        "keys": _keys(),
        "min_sites": 3,
        "total_weight": 120.0,
    }
    args.update(kw)
    manifest.verify(**args)  # type: ignore[arg-type]


def _manifest(signed: list[SignedContribution], round_number: int = 2) -> AggregateManifest:
    return AggregateManifest.of(
        signed, study_id="s-1", contract_hash=HASH, round_number=round_number
    )


def test_a_contribution_round_trips_and_verifies_with_its_sites_key_only() -> None:
    signed = _signed("hospital-a")
    again = SignedContribution.from_json(signed.to_json())
    assert again == signed
    again.verify(site_keys("hospital-a").signing_public_b64)
    with pytest.raises(SignatureError):
        again.verify(site_keys("hospital-b").signing_public_b64)
    tampered = SignedContribution(
        contribution=signed.contribution.model_copy(update={"weight": 4000}),
        signature=signed.signature,
    )
    with pytest.raises(SignatureError):
        tampered.verify(site_keys("hospital-a").signing_public_b64)
    with pytest.raises(ManifestError) as bad:
        SignedContribution.from_json('{"contribution": {}}')
    assert bad.value.code == "aggregate.manifest_malformed"


def test_a_manifest_is_believed_only_if_every_claim_checks_out() -> None:
    honest = _manifest([_signed(s) for s in reversed(SITES)])
    assert honest.sites == SITES  # sorted by site
    assert honest.total_weight == 120
    assert AggregateManifest.from_json(honest.to_json()) == honest
    _verify(honest)
    cases = [
        (dict(round_number=3), "aggregate.wrong_round"),
        (dict(study_id="s-2"), "aggregate.wrong_round"),
        (dict(min_sites=4), "aggregate.too_few_sites"),
        (dict(total_weight=1200.0), "aggregate.weight_mismatch"),
        (
            dict(keys={**_keys(), "hospital-b": site_keys("x").signing_public_b64}),
            "aggregate.bad_signature",
        ),
        (dict(keys={"hospital-a": _keys()["hospital-a"]}), "aggregate.unknown_site"),
    ]
    for kw, code in cases:
        with pytest.raises(ManifestError) as refused:
            _verify(honest, **kw)
        assert refused.value.code == code, kw
    swapped = _manifest(
        [_signed("hospital-a"), _signed("hospital-b", round_number=1), _signed("hospital-c")]
    )
    with pytest.raises(ManifestError) as refused:
        _verify(swapped)
    assert refused.value.code == "aggregate.swapped_contribution"
    forged = _manifest(
        [
            _signed("hospital-a"),
            _signed("hospital-b", key=Ed25519PrivateKey.generate()),
            _signed("hospital-c"),
        ]
    )
    with pytest.raises(ManifestError) as refused:
        _verify(forged)
    assert refused.value.code == "aggregate.bad_signature"
    twice = AggregateManifest(
        study_id="s-1",
        contract_hash=HASH,
        round_number=2,
        contributions=(_signed("hospital-a"), _signed("hospital-a"), _signed("hospital-b")),
    )
    with pytest.raises(ManifestError) as refused:
        _verify(twice, total_weight=None)
    assert refused.value.code == "aggregate.duplicate_site"


def test_the_run_plan_carries_the_rosters_nodes_and_refuses_other_keys() -> None:
    contract = breast_cancer_contract(sites=SITES, encryption=False)
    peers = tuple(
        SitePeer(s, 7 + i, site_keys(s).signing_public_b64, site_keys(s).exchange_public_b64)
        for i, s in enumerate(SITES)
    )
    plan = RunPlan("s-1", contract, contract.contract_hash(), 10, SITES, peers=peers)
    assert RunPlan.from_run_config(plan.to_run_config()) == plan
    assert plan.node_sites == {7: "hospital-a", 8: "hospital-b", 9: "hospital-c"}
    swapped = SitePeer(
        "hospital-b", 8, site_keys("x").signing_public_b64, peers[1].exchange_public_key
    )
    with pytest.raises(ValueError, match="not the roster's"):
        RunPlan("s-1", contract, contract.contract_hash(), 10, SITES, peers=(peers[0], swapped))
    outsider = SitePeer("hospital-z", 9, peers[0].signing_public_key, peers[0].exchange_public_key)
    with pytest.raises(ValueError, match="not in the contract's roster"):
        RunPlan("s-1", contract, contract.contract_hash(), 10, SITES, peers=(outsider,))
