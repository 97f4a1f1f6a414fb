"""Opening an aggregate at the site: every claim of the manifest is checked with the site's
own pins, its own contribution must be in it, and the ledger answers once per round."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from concord_protocol.contributions import AggregateManifest
from concord_protocol.wire.format import CKKS_TAG_SLOTS, EncodedUpdate
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.plan import RunPlan
from site_node.crypto import CkksCodec, generate_study_context, public_context
from site_node.federation.aggregates import (
    AggregateRefusedError,
    RoundLedger,
    open_aggregate,
    roster_keys,
)
from site_node.peers import PeerStore
from tests.support.flower import breast_cancer_contract
from tests.support.roster import pin_all, site_keys
from tests.support.studies import signed_aggregate

SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
N = 3000


@pytest.fixture(scope="module")
def secret() -> bytes:
    return generate_study_context()


@pytest.fixture
def plan(secret: bytes) -> RunPlan:
    contract = breast_cancer_contract(rounds=3, sites=SITES)
    return RunPlan("study-9", contract, contract.contract_hash(), N, SITES, public_context(secret))


@pytest.fixture
def site_a(tmp_path: Path, plan: RunPlan) -> Path:
    state = tmp_path / "hospital-a"
    pin_all(state, "hospital-a", SITES)
    return state


def _model(plan: RunPlan, secret: bytes, sites: tuple[str, ...], **kw: object) -> GlobalModel:
    rng = np.random.default_rng(1)
    vectors = {s: rng.normal(0, 0.1, N) for s in sites}
    weights = {s: 50 + i for i, s in enumerate(sites)}
    return signed_aggregate(plan, secret, 2, vectors, weights, **kw)  # type: ignore[arg-type]


def _open(plan: RunPlan, secret: bytes, state: Path, model: GlobalModel, **kw: object) -> object:
    keys = roster_keys(
        plan.contract,
        site_id="hospital-a",
        own_signing_key=site_keys("hospital-a").signing_public_b64,
        peers=PeerStore(state),
    )
    args: dict[str, object] = {
        "manifest_json": model.manifest,
        "total_weight": model.total_weight,
        "round_number": model.round_number,
        "contract": plan.contract,
        "contract_hash": plan.contract_hash,
        "study_id": plan.study_id,
        "site_id": "hospital-a",
        "num_params": N,
        "codec": CkksCodec(secret, tag_slots=CKKS_TAG_SLOTS),
        "keys": keys,
        "ledger": RoundLedger(state, plan.study_id, plan.contract_hash),
    }
    args.update(kw)
    return open_aggregate(list(model.blobs), **args)  # type: ignore[arg-type]


def _refused(plan: RunPlan, secret: bytes, state: Path, model: GlobalModel, **kw: object) -> str:
    with pytest.raises(AggregateRefusedError) as refused:
        _open(plan, secret, state, model, **kw)
    return refused.value.code


def test_a_verified_aggregate_opens(plan: RunPlan, secret: bytes, site_a: Path) -> None:
    opened = _open(plan, secret, site_a, _model(plan, secret, SITES[:3]))
    assert opened.manifest.sites == SITES[:3]  # type: ignore[attr-defined]


def test_an_aggregate_without_this_sites_timely_contribution_is_refused(
    plan: RunPlan, secret: bytes, site_a: Path
) -> None:
    """With four sites the server could sum b, c and d alone; a site that answered in good
    time does not use an aggregate that leaves it out (nor one listing another update)."""
    model = _model(plan, secret, SITES[1:])
    ledger = RoundLedger(site_a, plan.study_id, plan.contract_hash)
    _open(plan, secret, site_a, model)  # nothing sent in round 2 yet: fine
    ledger.record_contribution(2, "ab" * 32, timely=False)
    _open(plan, secret, site_a, model)  # late: the server may leave it out
    ledger.record_contribution(2, "ab" * 32, timely=True)
    assert _refused(plan, secret, site_a, model) == "aggregate.own_contribution_omitted"
    with_a = _model(plan, secret, SITES[:3])  # lists a, but not the update a sent
    assert _refused(plan, secret, site_a, with_a) == "aggregate.own_contribution_omitted"
    sent = AggregateManifest.from_json(with_a.manifest).contribution_of("hospital-a")
    assert sent is not None
    ledger.record_contribution(2, sent.update_digest, timely=True)
    _open(plan, secret, site_a, with_a)


def test_a_weight_above_the_roster_is_refused(plan: RunPlan, secret: bytes, site_a: Path) -> None:
    member = plan.contract.member("hospital-b")
    assert member is not None
    rng = np.random.default_rng(2)
    vectors = {s: rng.normal(0, 0.1, N) for s in SITES[:3]}
    weights = {"hospital-a": 10, "hospital-b": member.max_examples + 1, "hospital-c": 10}
    model = signed_aggregate(plan, secret, 2, vectors, weights)
    assert _refused(plan, secret, site_a, model) == "aggregate.weight_exceeds_roster"


def test_signatures_are_checked_with_this_sites_pins(
    plan: RunPlan, secret: bytes, site_a: Path
) -> None:
    # The server re-signs b's contribution with a key of its own (as if it had swapped
    # b's key in its directory): a's pin of b does not verify it.
    forged = _model(
        plan,
        secret,
        SITES[:3],
        signers={
            "hospital-a": site_keys("hospital-a").signing_key,
            "hospital-b": Ed25519PrivateKey.generate(),
            "hospital-c": site_keys("hospital-c").signing_key,
        },
    )
    assert _refused(plan, secret, site_a, forged) == "aggregate.bad_signature"
    # A roster member this site never pinned is not believed either.
    PeerStore(site_a).unpin("hospital-c")
    honest = _model(plan, secret, SITES[:3])
    assert _refused(plan, secret, site_a, honest) == "aggregate.unknown_site"


def test_a_malformed_or_mismatched_aggregate_is_refused(
    plan: RunPlan, secret: bytes, site_a: Path
) -> None:
    model = _model(plan, secret, SITES[:3])
    assert _refused(plan, secret, site_a, dataclasses.replace(model, manifest="{")) == (
        "aggregate.manifest_malformed"
    )
    assert _refused(plan, secret, site_a, model, round_number=3) == "update.global_mismatch"
    assert _refused(plan, secret, site_a, model, num_params=N + 1) == "update.global_mismatch"
    header = EncodedUpdate.from_bytes_list(list(model.blobs)).header
    assert header.tag_slots == CKKS_TAG_SLOTS
    untagged = CkksCodec(secret)  # a site expecting no tags refuses a tagged aggregate
    assert _refused(plan, secret, site_a, model, codec=untagged) == "update.global_mismatch"


def test_the_ledger_answers_one_evaluation_per_round(tmp_path: Path) -> None:
    ledger = RoundLedger(tmp_path, "study-1", "ab" * 32)
    with ledger.evaluation(1, "11" * 32) as slot:
        assert slot.answered is None
        slot.answer({"accuracy": 0.9})
    with ledger.evaluation(1, "11" * 32) as slot:
        assert slot.answered == {"accuracy": 0.9}
    with pytest.raises(AggregateRefusedError) as refused, ledger.evaluation(1, "22" * 32):
        pass
    assert refused.value.code == "evaluation.already_answered"
    with ledger.evaluation(2, "22" * 32) as slot:  # the next round is another question
        assert slot.answered is None
    assert ledger.path.stat().st_mode & 0o777 == 0o600
