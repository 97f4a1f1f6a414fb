"""Studies driven to a given point through the API, and the parts of synthetic runs.

Shared by the coordinator, run-API, release-gate, agent and drill tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concord_protocol.contract import StudyContract
from concord_protocol.contributions import AggregateManifest, Contribution, sign_contribution
from concord_protocol.dp_plan import step_plan
from concord_protocol.rounds import RoundRecord, SiteSpend
from concord_protocol.wire.format import CKKS_TAG_SLOTS
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.models import StudyKeyRelay
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto import (
    CkksCodec,
    generate_study_context,
    public_context,
    study_key_fingerprint,
)
from tests.support.world import People, signed_approval, study_contract

SITES = ("hospital-a", "hospital-b", "hospital-c")


def submit_and_approve(
    client: TestClient,
    people: People,
    datasets: Sequence[str] = ("bc-a", "bc-b", "bc-c"),
    *,
    letters: Sequence[str] = ("a", "b", "c"),
    **contract: Any,
) -> dict[str, Any]:
    """Submit a study over ``datasets`` as the researcher; each steward of ``letters``
    approves its exact contract hash. Returns the study as the researcher sees it then."""
    response = client.post(
        "/api/v1/studies",
        json=study_contract(list(datasets), **contract),
        headers=people.researcher,
    )
    assert response.status_code == 201, response.text
    study: dict[str, Any] = response.json()
    for letter in letters:
        body = signed_approval(client, people.steward(letter), study, f"hospital-{letter}")
        response = client.post(
            f"/api/v1/studies/{study['id']}/approvals", json=body, headers=people.steward(letter)
        )
        assert response.status_code == 201, response.text
    fresh: dict[str, Any] = client.get(
        f"/api/v1/studies/{study['id']}", headers=people.researcher
    ).json()
    return fresh


def relay_study_key(
    app: FastAPI, study: dict[str, Any], secret: bytes | None = None, *, sender: str = "hospital-a"
) -> bytes:
    """Store the study's relayed public context as the key exchange would (the secret is
    returned for the test's sites; the server keeps only the public half)."""
    secret = secret or generate_study_context()
    public = public_context(secret)
    with app.state.sessionmaker() as session:
        session.add(
            StudyKeyRelay(
                study_id=study["id"],
                sender_site_id=sender,
                contract_hash=study["contract_hash"],
                public_context=public,
                public_context_sha256=hashlib.sha256(public).hexdigest(),
                key_fingerprint=study_key_fingerprint(secret),
                uploaded_by=f"service-account-{sender.removeprefix('hospital-')}",
            )
        )
        session.commit()
    return secret


def audit_actions(app: FastAPI, study_id: str) -> list[str]:
    """The actions of the audit entries about ``study_id``, in log order."""
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    return [e.action for e in entries if e.object.id == study_id]


def on_plan_spend(contract: StudyContract, n: int, epsilon: float, num_samples: int) -> SiteSpend:
    """A verified spend report after round ``n`` that is on ``contract``'s plan: the steps
    of ``n`` rounds at the plan's sample rate and ``n`` evaluation releases at the
    contract's noise, with training noise so large that the ledger's own recomputation is
    about the releases' cost alone (a report above it stands as reported)."""
    training = contract.training
    steps = step_plan(num_samples, training.batch_size)
    return SiteSpend(
        epsilon=epsilon,
        delta=contract.privacy.delta,
        noise_multiplier=50.0,
        sample_rate=steps.sample_rate,
        steps=n * steps.steps_per_epoch * training.local_epochs,
        num_samples=num_samples,
        evaluations=n if contract.evaluation.releases else 0,
        evaluation_noise_multiplier=contract.evaluation_noise(),
    )


def site_spend(plan: RunPlan, n: int, epsilon: float, num_samples: int) -> SiteSpend:
    """:func:`on_plan_spend` for the study of ``plan``."""
    return on_plan_spend(plan.contract, n, epsilon, num_samples)


def round_record(plan: RunPlan, n: int, epsilon: float, status: str = "aggregated") -> RoundRecord:
    """A round's record as the ServerApp would write it (three sites, or two when failed);
    every site that replied has its spend report in it."""
    replied = list(SITES) if status == "aggregated" else ["hospital-a", "hospital-b"]
    counts = {s: 100 + i for i, s in enumerate(SITES)}
    return RoundRecord(
        study_id=plan.study_id,
        contract_hash=plan.contract_hash,
        round_number=n,
        status=status,
        participants=list(SITES) if status == "aggregated" else ["hospital-a", "hospital-b"],
        sample_counts={s: 100 + i for i, s in enumerate(SITES)},
        epsilon={s: epsilon for s in SITES},
        spend={s: site_spend(plan, n, epsilon, counts[s]) for s in replied},
        site_digests={s: "ab" * 32 for s in SITES},
        aggregate_digest="cd" * 32 if status == "aggregated" else None,
        missing_sites=[] if status == "aggregated" else ["hospital-c"],
        failure=None if status == "aggregated" else "only 2 valid replies; the minimum is 3",
    )


def signed_aggregate(
    plan: RunPlan,
    secret: bytes,
    round_number: int,
    vectors: Mapping[str, npt.NDArray[np.float64]],
    weights: Mapping[str, int],
    *,
    signers: Mapping[str, Ed25519PrivateKey] | None = None,
) -> GlobalModel:
    """A real aggregate of ``vectors`` (site -> update) weighted by ``weights``: the sites'
    tagged CKKS updates summed blindly, with the manifest of their contributions signed
    with ``signers`` (default: their test keys), as a run makes it."""
    from tests.support.roster import site_keys

    strategy = BlindAggregationStrategy(plan)
    codec = CkksCodec(secret, tag_slots=CKKS_TAG_SLOTS)
    info = strategy.round_info(round_number)
    encoded = {
        site: codec.encode(vector, weight=float(weights[site]), info=info, site_id=site)
        for site, vector in vectors.items()
    }
    summed = strategy._sum(round_number, {s: u.to_bytes_list() for s, u in encoded.items()})
    manifest = AggregateManifest.of(
        [
            sign_contribution(
                Contribution(
                    study_id=plan.study_id,
                    contract_hash=plan.contract_hash,
                    attempt=plan.attempt,
                    round_number=round_number,
                    site_id=site,
                    update_digest=update.digest,
                    weight=int(weights[site]),
                ),
                signers[site] if signers is not None else site_keys(site).signing_key,
            )
            for site, update in encoded.items()
        ],
        study_id=plan.study_id,
        contract_hash=plan.contract_hash,
        round_number=round_number,
    )
    return GlobalModel(
        round_number,
        tuple(summed.to_bytes_list()),
        float(sum(weights[s] for s in vectors)),
        summed.digest,
        manifest.to_json(),
    )


def final_aggregate(
    plan: RunPlan,
    secret: bytes,
    round_number: int,
    *,
    sites: Sequence[str] = SITES,
    signers: Mapping[str, Ed25519PrivateKey] | None = None,
) -> GlobalModel:
    """A real aggregate of random updates of ``sites``, each of weight 100."""
    rng = np.random.default_rng(round_number)
    vectors = {site: rng.normal(size=plan.num_params) for site in sites}
    return signed_aggregate(
        plan, secret, round_number, vectors, dict.fromkeys(sites, 100), signers=signers
    )
