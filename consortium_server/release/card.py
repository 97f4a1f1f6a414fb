"""The model card of a released study: what was trained, on whose data, at what privacy
cost, who vouched for the model, and where the release sits in the audit log.

The card is built once, at release, and stored with the release; only ``witnessed`` of its
audit head is refreshed when it is read (sites cosign heads after the fact). It holds no
patient data: counts and epsilons per dataset, aggregate evaluation metrics, hashes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.contract import StudyContract
from concord_protocol.disclosure import DISCLOSURES, NEIGHBOURING, NOT_COVERED, PRIVACY_UNIT
from concord_protocol.fields import format_utc
from concord_protocol.principals import Principal
from concord_protocol.release import MODEL_ENCODING, ModelLayout
from concord_protocol.rounds import RoundAuditDetails
from consortium_server.audit.models import AuditLeaf
from consortium_server.budgets import service as budgets
from consortium_server.budgets.accountant import evaluation_epsilon
from consortium_server.datasets.service import get_datasets
from consortium_server.release.files import model_file
from consortium_server.release.models import FinalAggregate, ReleasedModel, ReleaseSignoff
from consortium_server.studies.models import Study

__all__ = [
    "CARD_VERSION",
    "CardAuditHead",
    "CardDataset",
    "CardModel",
    "CardSignoff",
    "ModelCard",
    "audit_head",
    "build_card",
    "last_evaluation",
    "privacy_statement",
    "render_markdown",
]

CARD_VERSION: Literal["concord.model-card/1"] = "concord.model-card/1"

DP_NOTE = (
    "Each site trained with differentially private SGD and released its test-split "
    "evaluation only as noisy histograms (a Gaussian mechanism), both composed in the "
    "site's one accountant. The (epsilon, delta) charged to each dataset bound what the "
    "released model and the published evaluation metrics together reveal about any one "
    "record of that dataset (neighbouring datasets: one record added or removed). The "
    "fields listed as public were released without DP, as the stewards declared; the "
    "guarantee does not cover what is listed under not_covered."
)


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CardModel(_Card):
    """The released model: catalogue entry, hyperparameters, and the exact bytes' hash."""

    name: str
    version: str
    hyperparameters: dict[str, Any]
    sha256: str = Field(description="SHA-256 of the released bytes (every site signed it).")
    encoding: str = Field(description="Byte layout of the parameter vector.")
    num_params: int
    size_bytes: int
    input_shape: list[int] | None = Field(
        default=None, description="One record's shape the network was built for."
    )
    num_classes: int | None = None
    file_name: str | None = Field(
        default=None, description="The safetensors file (`GET .../release/model.safetensors`)."
    )
    file_sha256: str | None = Field(
        default=None,
        description="SHA-256 of that whole file (its data section hashes to `sha256`).",
    )


class CardDataset(_Card):
    """Privacy spent on one dataset by this study (decimal strings, as in the ledger)."""

    dataset_id: str
    site_id: str
    epsilon_charged: str
    delta_charged: str


class CardSignoff(_Card):
    """One site's Ed25519 signature over the model hash (see ``signoff_message``)."""

    site_id: str
    model_sha256: str
    signature: str
    signed_at: str


class CardAuditHead(_Card):
    """The signed audit tree head that covers the release entry."""

    tree_size: int
    root_hash: str
    timestamp: str
    key_id: str
    signature: str
    server_public_key: str
    witnessed: bool
    witness_quorum: int


class ModelCard(_Card):
    """Everything a reader of the released model needs to judge and verify it."""

    card_version: Literal["concord.model-card/1"] = "concord.model-card/1"
    study_id: str
    title: str
    purpose: str
    description: str
    ethics_reference: str
    contract_hash: str
    model: CardModel
    training: dict[str, Any]
    rounds_completed: int
    final_round: int
    final_aggregate_digest: str
    sites: list[str]
    datasets: list[CardDataset]
    privacy: dict[str, Any]
    evaluation: dict[str, float] | None = Field(
        default=None, description="Weighted evaluation metrics of the last round, if any."
    )
    evaluation_round: int | None = None
    signoffs: list[CardSignoff]
    audit_head: CardAuditHead
    released_by: dict[str, str | None]
    released_at: str


def last_evaluation(session: Session, study_id: str) -> tuple[int, dict[str, float]] | None:
    """(round, metrics) of the study's latest ``round.completed`` entry with an evaluation."""
    rows = session.scalars(
        select(AuditLeaf.entry)
        .where(AuditLeaf.action == "round.completed")
        .order_by(AuditLeaf.index.desc())
    )
    for raw in rows:
        entry = AuditEntry.from_canonical_bytes(bytes(raw))
        if entry.object.id != study_id:
            continue
        record = RoundAuditDetails.model_validate(entry.details).record
        if record.evaluation:
            return record.round_number, dict(record.evaluation)
    return None


def audit_head(
    head: SignedTreeHead, *, server_public_key: str, witnessed: bool, quorum: int
) -> CardAuditHead:
    """The card's view of a signed tree head."""
    return CardAuditHead(
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp=format_utc(head.timestamp),
        key_id=head.key_id,
        signature=head.signature,
        server_public_key=server_public_key,
        witnessed=witnessed,
        witness_quorum=quorum,
    )


def _datasets(session: Session, study: Study, contract: StudyContract) -> list[CardDataset]:
    known, _unknown = get_datasets(session, contract.datasets)
    out: list[CardDataset] = []
    for dataset in sorted(known, key=lambda d: d.id):
        view = budgets.show(session, dataset.id)
        lines = [line for line in view.lines if line.study_id == study.id]
        eps = sum((line.epsilon_charged for line in lines), start=Decimal(0))
        delta = sum((line.delta_charged for line in lines), start=Decimal(0))
        out.append(
            CardDataset(
                dataset_id=dataset.id,
                site_id=dataset.site_id,
                epsilon_charged=format(eps, "f"),
                delta_charged=format(delta, "f"),
            )
        )
    return out


def privacy_statement(contract: StudyContract) -> dict[str, Any]:
    """The card's privacy section: targets, unit, neighbouring relation, the evaluation
    releases and their cost, what was public and what the guarantee does not cover."""
    noise = contract.evaluation_noise()
    alone = evaluation_epsilon(contract)
    return {
        "epsilon_target": contract.privacy.epsilon,
        "delta_target": contract.privacy.delta,
        "max_grad_norm": contract.privacy.max_grad_norm,
        "unit": PRIVACY_UNIT,
        "neighbouring": NEIGHBOURING,
        "evaluation": {
            "mode": contract.evaluation.mode,
            "releases": contract.training.rounds if noise is not None else 0,
            "noise_multiplier": noise,
            "score_bins": contract.evaluation.score_bins,
            "epsilon_releases_alone": round(alone, 6) if alone is not None else None,
        },
        "disclosures": [d.as_dict() for d in DISCLOSURES],
        "public": list(contract.public_fields),
        "not_covered": list(NOT_COVERED),
        "note": DP_NOTE,
    }


def build_card(
    session: Session,
    study: Study,
    *,
    model: ReleasedModel,
    aggregate: FinalAggregate,
    signoffs: list[ReleaseSignoff],
    head: CardAuditHead,
    released_by: Principal,
    released_at: datetime,
) -> ModelCard:
    """The model card of ``study`` as it is being released."""
    contract = StudyContract.model_validate(study.contract)
    evaluation = last_evaluation(session, study.id)
    layout = ModelLayout.model_validate(model.layout) if model.layout is not None else None
    written = model_file(study, model)
    return ModelCard(
        study_id=study.id,
        title=contract.title,
        purpose=contract.purpose.value,
        description=contract.description,
        ethics_reference=contract.ethics_reference,
        contract_hash=study.contract_hash,
        model=CardModel(
            name=contract.model.name,
            version=contract.model.version,
            hyperparameters=dict(contract.model.hyperparameters),
            sha256=model.model_sha256,
            encoding=MODEL_ENCODING,
            num_params=model.num_params,
            size_bytes=len(model.data),
            input_shape=list(layout.input_shape) if layout is not None else None,
            num_classes=layout.num_classes if layout is not None else None,
            file_name=written[0] if written is not None else None,
            file_sha256=hashlib.sha256(written[1]).hexdigest() if written is not None else None,
        ),
        training=contract.training.model_dump(mode="json"),
        rounds_completed=study.current_round,
        final_round=aggregate.round_number,
        final_aggregate_digest=aggregate.digest,
        sites=sorted(s.site_id for s in study.sites),
        datasets=_datasets(session, study, contract),
        privacy=privacy_statement(contract),
        evaluation=evaluation[1] if evaluation else None,
        evaluation_round=evaluation[0] if evaluation else None,
        signoffs=[
            CardSignoff(
                site_id=s.site_id,
                model_sha256=s.model_sha256,
                signature=s.signature,
                signed_at=format_utc(s.signed_at),
            )
            for s in sorted(signoffs, key=lambda s: s.site_id)
        ],
        audit_head=head,
        released_by={"subject": released_by.subject, "organisation": released_by.organisation},
        released_at=format_utc(released_at),
    )


def _privacy_details(privacy: dict[str, Any]) -> list[str]:
    """Markdown lines of the unit, the evaluation cost and the public fields (cards built
    before these were recorded have none of them)."""
    if "unit" not in privacy:
        return []
    evaluation = privacy.get("evaluation") or {}
    if evaluation.get("releases"):
        cost = (
            f"{evaluation['releases']} noisy histogram release(s), noise multiplier "
            f"{evaluation['noise_multiplier']:.4g}; alone they would cost epsilon "
            f"{evaluation['epsilon_releases_alone']} (composed with training, inside the "
            "target above)"
        )
    else:
        cost = "none: the sites released no evaluation"
    return [
        f"- Unit of privacy: {privacy['unit']}; neighbouring datasets: {privacy['neighbouring']}.",
        f"- Evaluation releases: {cost}.",
        "- Released without DP (declared public): " + "; ".join(privacy.get("public", [])) + ".",
        "- Not covered: " + "; ".join(privacy.get("not_covered", [])) + ".",
        "",
    ]


def render_markdown(card: ModelCard) -> str:
    """A human-readable rendering of ``card`` (the JSON stays the reference)."""
    lines = [
        f"# Model card: {card.title}",
        "",
        f"- Study: `{card.study_id}` ({card.purpose}, ethics {card.ethics_reference})",
        f"- Contract hash: `{card.contract_hash}`",
        f"- Model: {card.model.name} v{card.model.version}, {card.model.num_params} parameters "
        f"({card.model.encoding}), hyperparameters `{json.dumps(card.model.hyperparameters)}`",
        f"- Model SHA-256: `{card.model.sha256}`",
        *(
            [
                f"- Model file: `{card.model.file_name}` (safetensors, SHA-256 "
                f"`{card.model.file_sha256}`), input {card.model.input_shape}, "
                f"{card.model.num_classes} classes"
            ]
            if card.model.file_name
            else []
        ),
        f"- Rounds: {card.rounds_completed} completed of {card.training.get('rounds')} planned; "
        f"final aggregate `{card.final_aggregate_digest}` (round {card.final_round})",
        f"- Sites: {', '.join(card.sites)}",
        f"- Released {card.released_at} by {card.released_by.get('subject')}",
        "",
        "## Privacy",
        "",
        f"Target epsilon {card.privacy['epsilon_target']}, delta {card.privacy['delta_target']}. "
        + str(card.privacy["note"]),
        "",
        *_privacy_details(card.privacy),
        "| dataset | site | epsilon charged | delta charged |",
        "| --- | --- | --- | --- |",
        *(
            f"| {d.dataset_id} | {d.site_id} | {d.epsilon_charged} | {d.delta_charged} |"
            for d in card.datasets
        ),
        "",
        "## Evaluation",
        "",
    ]
    if card.evaluation:
        lines.append(
            f"Round {card.evaluation_round}, from the sum of the sites' noisy test-split "
            "histograms (noise-sd: the noise's standard deviation on each summed count):"
        )
        lines.append("")
        lines.extend(f"- {name}: {value:.4f}" for name, value in sorted(card.evaluation.items()))
    else:
        lines.append("No evaluation was recorded.")
    lines += [
        "",
        "## Site sign-offs",
        "",
        "| site | model SHA-256 | signed at |",
        "| --- | --- | --- |",
        *(f"| {s.site_id} | `{s.model_sha256}` | {s.signed_at} |" for s in card.signoffs),
        "",
        "## Audit log",
        "",
        f"Tree head {card.audit_head.tree_size} `{card.audit_head.root_hash}` signed "
        f"{card.audit_head.timestamp}; "
        + (
            f"witnessed by at least {card.audit_head.witness_quorum} site(s)."
            if card.audit_head.witnessed
            else f"not yet witnessed (quorum {card.audit_head.witness_quorum})."
        ),
        "",
    ]
    return "\n".join(lines)
