"""A consortium with history, for report tests (unit and browser).

Through the API: three hospitals (with signing keys we keep, so they can cosign heads),
one dataset each, two studies approved by every site and one declined. Then rounds, each
recorded by the federation's own :func:`~consortium_server.federation.coordinator.record_round`
(the ``round.completed`` audit entry and the ledger charge, exactly as a study run records
them), then a signed tree head that two sites cosign.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import Cosignature
from concord_protocol.audit.entries import AuditEntry, AuditObject, Outcome
from concord_protocol.audit.heads import encode_public_key
from concord_protocol.contract import StudyContract
from concord_protocol.rounds import RoundAuditDetails, RoundRecord
from consortium_server.audit.cosignatures import record_cosignature
from consortium_server.audit.recorder import SERVER_ACTOR
from consortium_server.db.base import utcnow
from consortium_server.federation.coordinator import record_round
from tests.support.studies import on_plan_spend
from tests.support.world import (
    SIGNING_KEYS,
    People,
    dataset_body,
    signed_approval,
    site_enrolment,
    study_contract,
)

SITES = ("a", "b", "c")
DATASETS = ["bc-a", "bc-b", "bc-c"]

#: Cumulative epsilon per dataset after each round (what each site's accountant reports).
MAIN_ROUNDS: list[dict[str, str]] = [
    {"bc-a": "0.9", "bc-b": "1.1", "bc-c": "0.8"},
    {"bc-a": "1.6", "bc-b": "1.9", "bc-c": "1.5"},
    {"bc-a": "2.2", "bc-b": "2.6", "bc-c": "2.1"},
]
PILOT_ROUNDS: list[dict[str, str]] = [
    {"bc-a": "0.7", "bc-b": "0.6", "bc-c": "0.9"},
    {"bc-a": "1.2", "bc-b": "1.1", "bc-c": "1.4"},
]
SAMPLES = {"hospital-a": 190, "hospital-b": 152, "hospital-c": 227}


@dataclass
class ReportWorld:
    """Ids and keys of what :func:`populate` created."""

    main_study: dict[str, Any]
    pilot_study: dict[str, Any]
    declined_study: dict[str, Any]
    site_keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    round_indices: list[int] = field(default_factory=list)

    @property
    def main_title(self) -> str:
        return str(self.main_study["title"])


def _published(contract: StudyContract, site_id: str) -> int:
    member = contract.member(site_id)
    return member.max_examples if member is not None else 1


def round_record(
    study: dict[str, Any], round_number: int, epsilon: dict[str, str], samples: dict[str, int]
) -> RoundRecord:
    """The round as the ServerApp reports it (each site holds the dataset ``bc-<letter>``),
    with each site's signed spend report on the contract's plan."""
    contract = StudyContract.model_validate(study["contract"])
    return RoundRecord(
        study_id=study["id"],
        contract_hash=study["contract_hash"],
        round_number=round_number,
        status="aggregated",
        participants=sorted(samples),
        sample_counts=dict(samples),
        epsilon={f"hospital-{d.removeprefix('bc-')}": float(e) for d, e in epsilon.items()},
        spend={
            f"hospital-{d.removeprefix('bc-')}": on_plan_spend(
                contract,
                round_number,
                float(e),
                _published(contract, f"hospital-{d.removeprefix('bc-')}"),
            )
            for d, e in epsilon.items()
        },
        site_digests={
            site: hashlib.sha256(f"{site}/{round_number}".encode()).hexdigest() for site in samples
        },
        aggregate_digest=hashlib.sha256(f"aggregate/{round_number}".encode()).hexdigest(),
        total_weight=float(sum(samples.values())),
        evaluation={"accuracy": 0.8 + 0.01 * round_number, "auc": 0.9, "noise-sd": 12.5},
    )


def append_round(
    app: FastAPI,
    session: Session,
    study: dict[str, Any],
    round_number: int,
    epsilon: dict[str, str],
    samples: dict[str, int] | None = None,
    *,
    charge: bool = True,
) -> int:
    """Record a completed round as the federation does (``record_round``: the audit entry
    and the ledger charge). ``charge=False``: the entry alone, as if the ledger had not
    been charged (a disagreement the report must show)."""
    record = round_record(study, round_number, epsilon, samples or SAMPLES)
    log = app.state.audit_log
    if charge:
        record_round(session, record, log=log)
        return int(log.size(session=session)) - 1
    details = RoundAuditDetails(record=record, charged_epsilon=dict(epsilon))
    entry = AuditEntry(
        actor=SERVER_ACTOR,
        action="round.completed",
        object=AuditObject(type="study", id=study["id"]),
        outcome=Outcome.SUCCESS,
        purpose=study["contract"]["purpose"],
        contract_hash=study["contract_hash"],
        at=utcnow(),
        source="consortium-server/federation",
        details=details.model_dump(mode="json"),
    )
    index, _ = log.append(entry, session=session)
    return int(index)


def _enrol(client: Any, people: People, site: str) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    body = site_enrolment(f"hospital-{site}", f"Hospital {site}")
    body["display_name"] = f"Hospital {site.upper()}"
    body["signing_public_key"] = encode_public_key(key.public_key())
    SIGNING_KEYS[body["signing_public_key"]] = key  # the site signs its decisions with it
    response = client.post("/api/v1/sites", json=body, headers=people.admin)
    assert response.status_code == 201, response.text
    response = client.post(
        "/api/v1/datasets",
        json=dataset_body(f"bc-{site}", f"hospital-{site}"),
        headers=people.steward(site),
    )
    assert response.status_code == 201, response.text
    return key


def _submit(client: Any, people: People, **overrides: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/studies", json=study_contract(DATASETS, **overrides), headers=people.researcher
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["state"] == "awaiting_approvals", body
    return body


def _decide(
    client: Any, people: People, study: dict[str, Any], site: str, decision: str, reason: str
) -> dict[str, Any]:
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals",
        json=signed_approval(
            client, people.steward(site), study, f"hospital-{site}", decision, reason
        ),
        headers=people.steward(site),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def cosign_latest(app: FastAPI, session: Session, keys: dict[str, Ed25519PrivateKey]) -> int:
    """Sign the current log and have the sites in ``keys`` cosign it; returns its size."""
    head = app.state.tree_head_signer.sign_latest(session)
    for site_id, key in keys.items():
        log_id = app.state.audit_log.log_id
        unsigned = Cosignature(
            site_id=site_id,
            tree_size=head.tree_size,
            root_hash=head.root_hash,
            timestamp=utcnow(),
            signature="",
            log_id=log_id,
            key_id=head.key_id,
            head_timestamp=head.timestamp,
        )
        signature = base64.b64encode(key.sign(unsigned.message())).decode()
        record_cosignature(
            session,
            unsigned.model_copy(update={"signature": signature}),
            site_public_key=encode_public_key(key.public_key()),
            log_id=log_id,
        )
    return int(head.tree_size)


def populate(client: Any, people: People, app: FastAPI) -> ReportWorld:
    """Build the consortium and its history; commits."""
    keys = {f"hospital-{site}": _enrol(client, people, site) for site in SITES}
    main = _submit(client, people, title="Malignancy from FNA features")
    for site in SITES:
        main = _decide(
            client, people, main, site, "approved", f"DAC minutes 2026-{site}: approved."
        )
    assert main["state"] == "approved", main
    pilot = _submit(
        client,
        people,
        title="Tumour grading pilot",
        privacy={"epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0},
    )
    for site in SITES:
        pilot = _decide(client, people, pilot, site, "approved", "Low risk pilot.")
    declined = _submit(client, people, title="Cohort linkage study")
    declined = _decide(
        client, people, declined, "b", "declined", "Cohort overlaps with a running trial."
    )
    assert declined["state"] == "rejected", declined

    world = ReportWorld(main, pilot, declined, site_keys=keys)
    with app.state.sessionmaker() as session:
        for number, epsilon in enumerate(MAIN_ROUNDS, start=1):
            world.round_indices.append(append_round(app, session, main, number, epsilon))
        for number, epsilon in enumerate(PILOT_ROUNDS, start=1):
            world.round_indices.append(append_round(app, session, pilot, number, epsilon))
        session.commit()
        cosign_latest(app, session, {k: keys[k] for k in ("hospital-a", "hospital-b")})
        session.commit()
    return world


def spent(dataset_id: str) -> Decimal:
    """What the ledger must show as spent on ``dataset_id`` after :func:`populate`."""
    return Decimal(MAIN_ROUNDS[-1][dataset_id]) + Decimal(PILOT_ROUNDS[-1][dataset_id])
