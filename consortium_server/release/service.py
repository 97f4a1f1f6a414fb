"""The release gate's rules: the final aggregate, site sign-offs, the uploaded model, and the
decision to release.

Trust model. The server never holds the study's secret key, so it cannot decrypt the final
aggregate and cannot know the model itself. Each site decrypts the aggregate with the study
key (decryption is deterministic across sites: rounded to a grid, see docs/crypto.md),
hashes the canonical model bytes (:func:`consortium_server.release.model_sha256`) and signs
that hash with its enrolled Ed25519 key. One site uploads the bytes; the server only checks
that they hash to what the sites signed. The release needs a sign-off from **every** site
of the study, all on the **same** hash: if one site's hash disagrees, the model is never
released (a site that decrypted something else would otherwise vouch for a model it never
saw). Uploading the decrypted model to the server is safe for patients only because of
differential privacy: each site trained with DP-SGD, and the (epsilon, delta) charged to its
datasets bounds what the released model reveals about any one patient; encryption only
hides individual sites' updates during training, not the final model.

Every function takes ``session`` and flushes; the request boundary commits.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.heads import decode_public_key
from concord_protocol.catalogue import parameter_count
from concord_protocol.contract import StudyContract
from concord_protocol.errors import CatalogueError, WireFormatError
from concord_protocol.policy.decisions import check_release
from concord_protocol.policy.engine import Decision
from concord_protocol.policy.facts import owner_principal
from concord_protocol.principals import Principal
from concord_protocol.release import ModelLayout, model_sha256, signoff_message
from concord_protocol.wire.format import EncodedUpdate
from consortium_server.audit.models import AuditLeaf
from consortium_server.budgets import service as budgets
from consortium_server.datasets.service import get_datasets, model_input
from consortium_server.db.base import utcnow
from consortium_server.errors import (
    CATALOGUE,
    ConflictError,
    DomainError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.policy.checks import PolicyContext
from consortium_server.release.card import ModelCard
from consortium_server.release.files import model_file
from consortium_server.release.models import (
    FinalAggregate,
    FinalAggregateBlob,
    ReleasedModel,
    ReleaseSignoff,
    StudyRelease,
)
from consortium_server.sites.models import Site
from consortium_server.sites.service import require_own_active_site, site_of_principal
from consortium_server.studies.lifecycle import transition
from consortium_server.studies.models import Study, StudyEvent, StudyState

__all__ = [
    "ReleaseCheck",
    "ReleaseProblem",
    "UploadOutcome",
    "check_release_gate",
    "get_final_aggregate",
    "get_release",
    "get_released_model",
    "list_signoffs",
    "mark_released",
    "parse_layout",
    "record_signoff",
    "released_model_file",
    "require_state",
    "require_study_site",
    "store_final_aggregate",
    "store_release",
    "study_model_input",
    "study_site_ids",
    "upload_model",
    "verify_signoff_signature",
]


def study_site_ids(study: Study) -> list[str]:
    """Every site of the study (each must sign off), sorted."""
    return sorted(s.site_id for s in study.sites)


def require_state(study: Study, *states: StudyState) -> None:
    """``release.not_completed`` unless ``study`` is in one of ``states``."""
    if study.state not in states:
        raise ConflictError(
            f"Study {study.id} is {study.state.value}; this needs "
            f"{' or '.join(s.value for s in states)}.",
            code="release.not_completed",
        )


# --------------------------------------------------------------------- final aggregate


def store_final_aggregate(
    session: Session, study_id: str, final_model: GlobalModel
) -> FinalAggregate:
    """Keep the final encrypted aggregate of a run for the sites to decrypt at release.

    Called by the coordinator when a run completes. The blobs are checked as an update in
    the wire format (header, chunk count, every chunk digest) and must name this study and
    its contract hash. Storing the same aggregate twice is a no-op; a different one is
    refused (``release.aggregate_exists``).
    """
    study = session.get(Study, study_id)
    if study is None:
        raise NotFoundError(f"No study with id {study_id!r}.", code="study.not_found")
    require_state(study, StudyState.RUNNING, StudyState.COMPLETED)
    try:
        update = EncodedUpdate.from_bytes_list(final_model.blobs)
    except WireFormatError as exc:
        raise InvalidRequestError(exc.message, code="release.aggregate_invalid") from None
    header = update.header
    problems = []
    if header.study_id != study.id:
        problems.append("it names another study")
    if header.contract_hash != study.contract_hash:
        problems.append("it names another contract hash")
    if update.digest != final_model.digest:
        problems.append("its digest does not match the header")
    if problems:
        raise InvalidRequestError(
            f"The final aggregate is refused: {'; '.join(problems)}.",
            code="release.aggregate_invalid",
        )
    existing = session.get(FinalAggregate, study.id)
    if existing is not None:
        if existing.digest == update.digest:
            return existing
        raise ConflictError(
            f"Study {study.id} already has final aggregate {existing.digest[:16]}.",
            code="release.aggregate_exists",
        )
    aggregate = FinalAggregate(
        study_id=study.id,
        contract_hash=study.contract_hash,
        round_number=final_model.round_number,
        scheme=header.scheme,
        num_params=header.num_params,
        total_weight=float(final_model.total_weight),
        digest=update.digest,
        manifest=final_model.manifest,
        blobs=[
            FinalAggregateBlob(study_id=study.id, position=i, data=bytes(blob))
            for i, blob in enumerate(final_model.blobs)
        ],
    )
    session.add(aggregate)
    session.flush()
    return aggregate


def final_round_entry(session: Session, study_id: str, round_number: int) -> int | None:
    """The audit log index of the study's ``round.completed`` entry for ``round_number``
    (the final round's, which a site compares with the aggregate it releases), if any."""
    rows = session.execute(
        select(AuditLeaf.index, AuditLeaf.entry)
        .where(AuditLeaf.action == "round.completed")
        .order_by(AuditLeaf.index.desc())
        .execution_options(yield_per=200)
    )
    for index, raw in rows:
        try:
            entry = json.loads(bytes(raw))
            record = entry["details"]["record"]
            if entry["object"]["id"] == study_id and record["round_number"] == round_number:
                return int(index)
        except (ValueError, KeyError, TypeError):
            continue
    return None


def require_study_site(session: Session, study: Study, principal: Principal) -> Site:
    """The caller's own active site, provided it is a site of ``study`` (403 otherwise)."""
    site = site_of_principal(session, principal)
    if site is None:
        raise ForbiddenError(
            "Your identity acts for no enrolled site.", code="release.not_study_site"
        )
    require_own_active_site(session, principal, site.id)
    if site.id not in study_site_ids(study):
        raise ForbiddenError(
            f"Site {site.id} takes no part in study {study.id}.", code="release.not_study_site"
        )
    return site


def get_final_aggregate(session: Session, study: Study) -> FinalAggregate:
    """The study's final aggregate (``release.no_aggregate`` if none was stored)."""
    aggregate = session.get(FinalAggregate, study.id)
    if aggregate is None:
        raise NotFoundError(
            f"No final aggregate is stored for study {study.id}.", code="release.no_aggregate"
        )
    return aggregate


# --------------------------------------------------------------------------- sign-offs


def list_signoffs(session: Session, study_id: str) -> list[ReleaseSignoff]:
    """The study's sign-offs, by site id."""
    return list(
        session.scalars(
            select(ReleaseSignoff)
            .where(ReleaseSignoff.study_id == study_id)
            .order_by(ReleaseSignoff.site_id)
        )
    )


def verify_signoff_signature(
    site: Site, *, study: Study, model_sha256: str, signature_b64: str
) -> bool:
    """True if ``signature_b64`` is ``site``'s Ed25519 signature of the sign-off message."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key = decode_public_key(site.signing_public_key)
        key.verify(
            signature,
            signoff_message(
                study_id=study.id,
                contract_hash=study.contract_hash,
                model_sha256=model_sha256,
                site_id=site.id,
            ),
        )
    except (binascii.Error, ValueError, InvalidSignature, DomainError):
        return False
    return True


def record_signoff(
    session: Session,
    study: Study,
    site: Site,
    *,
    model_sha256: str,
    signature: str,
    actor: Principal,
) -> tuple[ReleaseSignoff, bool]:
    """Store ``site``'s sign-off of ``model_sha256``; returns it and whether it is new.

    Needs a completed study with a stored final aggregate and a signature that verifies
    with the site's registered key (``release.signature_invalid``). A site signs off once:
    repeating the same hash is a no-op, another hash is refused
    (``release.already_signed_off``).
    """
    require_state(study, StudyState.COMPLETED)
    get_final_aggregate(session, study)
    if not verify_signoff_signature(
        site, study=study, model_sha256=model_sha256, signature_b64=signature
    ):
        raise InvalidRequestError(
            f"The signature does not verify with site {site.id}'s registered signing key.",
            code="release.signature_invalid",
        )
    existing = session.scalars(
        select(ReleaseSignoff).where(
            ReleaseSignoff.study_id == study.id, ReleaseSignoff.site_id == site.id
        )
    ).first()
    if existing is not None:
        if existing.model_sha256 == model_sha256:
            return existing, False
        raise ConflictError(
            f"Site {site.id} already signed off model {existing.model_sha256[:16]}.",
            code="release.already_signed_off",
        )
    signoff = ReleaseSignoff(
        study_id=study.id,
        site_id=site.id,
        contract_hash=study.contract_hash,
        model_sha256=model_sha256,
        signature=signature,
        signed_by=actor.subject,
        signed_at=utcnow(),
    )
    session.add(signoff)
    session.flush()
    return signoff, True


# ------------------------------------------------------------------------------- model


def study_model_input(session: Session, study: Study) -> tuple[tuple[int, ...], int] | None:
    """(input shape, class count) of the study's network, as the run was sized: from the
    first dataset's feature summary and the contract's preprocessing (``None`` if the
    summary states no shape)."""
    contract = StudyContract.model_validate(study.contract)
    datasets, _unknown = get_datasets(session, contract.datasets)
    if not datasets:
        return None
    return model_input(datasets[0].feature_summary, contract.preprocessing)


def parse_layout(raw: object) -> ModelLayout:
    """The uploaded parameter layout; ``release.layout_invalid`` when it does not parse."""
    try:
        return ModelLayout.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'layout'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise InvalidRequestError(
            f"The parameter layout is refused: {problems}.", code="release.layout_invalid"
        ) from None


def _check_layout(study: Study, layout: ModelLayout, num_params: int) -> None:
    """The layout covers the ``num_params`` values, and the catalogue network for its input
    shape and class count has that many parameters (``release.layout_invalid``)."""
    if layout.num_params != num_params:
        raise InvalidRequestError(
            f"The layout's tensors hold {layout.num_params} values; the model has {num_params}.",
            code="release.layout_invalid",
        )
    contract = StudyContract.model_validate(study.contract)
    try:
        count = parameter_count(
            contract.model, input_shape=layout.input_shape, num_classes=layout.num_classes
        )
    except CatalogueError as exc:
        raise InvalidRequestError(
            f"The layout's input does not suit the study's model: {exc.message}",
            code="release.layout_invalid",
        ) from None
    if count != num_params:
        raise InvalidRequestError(
            f"{contract.model.name} v{contract.model.version} for input "
            f"{list(layout.input_shape)} and {layout.num_classes} classes has {count} "
            f"parameters; the model has {num_params}.",
            code="release.layout_invalid",
        )


#: What an upload changed: a new model, the layout of the stored model, or nothing.
UploadOutcome = Literal["created", "layout_added", "unchanged"]


def upload_model(
    session: Session,
    study: Study,
    site: Site,
    data: bytes,
    *,
    layout: ModelLayout | None = None,
    actor: Principal,
) -> tuple[ReleasedModel, UploadOutcome]:
    """Store the decrypted model bytes ``site`` uploaded, and their parameter layout.

    The uploading site must have signed off, and the bytes must hash to its signed-off hash
    and be ``num_params`` finite float64 values (``release.model_invalid``); a layout must
    cover exactly those values and fit the study's catalogue network
    (``release.layout_invalid``). The first upload wins: the same bytes again are a no-op,
    other bytes ``release.model_exists``. The layout likewise: the same bytes with a layout
    add it to a model stored without one, a different layout is ``release.layout_exists``.
    """
    require_state(study, StudyState.COMPLETED)
    aggregate = get_final_aggregate(session, study)
    own = session.scalars(
        select(ReleaseSignoff).where(
            ReleaseSignoff.study_id == study.id, ReleaseSignoff.site_id == site.id
        )
    ).first()
    if own is None:
        raise ConflictError(
            f"Site {site.id} must sign off before uploading.", code="release.signoffs_missing"
        )
    digest = model_sha256(data)
    if digest != own.model_sha256:
        raise InvalidRequestError(
            f"The bytes hash to {digest[:16]}, site {site.id} signed off {own.model_sha256[:16]}.",
            code="release.model_invalid",
        )
    if len(data) != 8 * aggregate.num_params:
        raise InvalidRequestError(
            f"Expected {aggregate.num_params} float64 values ({8 * aggregate.num_params} bytes), "
            f"got {len(data)} bytes.",
            code="release.model_invalid",
        )
    if not np.isfinite(np.frombuffer(data, dtype="<f8")).all():
        raise InvalidRequestError("The model holds NaN or infinity.", code="release.model_invalid")
    stored_layout = None
    if layout is not None:
        _check_layout(study, layout, aggregate.num_params)
        stored_layout = layout.model_dump(mode="json")
    existing = session.get(ReleasedModel, study.id)
    if existing is not None:
        if existing.model_sha256 != digest:
            raise ConflictError(
                f"Model {existing.model_sha256[:16]} was already uploaded by "
                f"{existing.uploaded_by_site}.",
                code="release.model_exists",
            )
        if stored_layout is None or existing.layout == stored_layout:
            return existing, "unchanged"
        if existing.layout is not None:
            raise ConflictError(
                f"Model {digest[:16]} already has another parameter layout.",
                code="release.layout_exists",
            )
        existing.layout = stored_layout
        session.flush()
        return existing, "layout_added"
    model = ReleasedModel(
        study_id=study.id,
        model_sha256=digest,
        num_params=aggregate.num_params,
        data=data,
        layout=stored_layout,
        uploaded_by_site=site.id,
        uploaded_by=actor.subject,
        uploaded_at=utcnow(),
    )
    session.add(model)
    session.flush()
    return model, "created"


# -------------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class ReleaseProblem:
    """One reason the release is refused (``code`` is a catalogue code)."""

    code: str
    message: str
    sites: tuple[str, ...] = ()

    def as_detail(self) -> dict[str, Any]:
        """JSON form for error details and the audit entry."""
        return {"code": self.code, "message": self.message, "sites": list(self.sites)}


#: Which refusal is reported first when several apply (the others are in the details).
_PRIORITY = (
    "release.not_completed",
    "release.no_aggregate",
    "release.hash_mismatch",
    "release.signoffs_missing",
    "release.model_missing",
    "release.budget_overspent",
    "policy.denied",
)


@dataclass
class ReleaseCheck:
    """The outcome of the release gate for one request."""

    problems: list[ReleaseProblem] = field(default_factory=list)
    decision: Decision | None = None
    model_sha256: str | None = None
    signoffs: list[ReleaseSignoff] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        """True when nothing stands in the way."""
        return not self.problems

    def primary(self) -> ReleaseProblem:
        """The refusal to report as the error code."""
        return min(self.problems, key=lambda p: _PRIORITY.index(p.code))

    @property
    def status(self) -> int:
        """HTTP status of the refusal."""
        return CATALOGUE[self.primary().code].status


def _policy_decision(
    session: Session,
    context: PolicyContext,
    study: Study,
    requester: Principal,
    signed: int,
) -> Decision:
    contract = StudyContract.model_validate(study.contract)
    datasets, _unknown = get_datasets(session, contract.datasets)
    return check_release(
        context.engine(session),
        contract,
        [d.facts() for d in datasets],
        owner_principal(study.owner_subject, study.owner_organisation),
        requester,
        context.facts(session),
        study_id=study.id,
        state=study.state.value,
        sites_signed_off=signed,
    )


def _hash_groups(signoffs: Sequence[ReleaseSignoff]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for signoff in signoffs:
        groups.setdefault(signoff.model_sha256, []).append(signoff.site_id)
    return groups


def check_release_gate(
    session: Session, study: Study, *, requester: Principal, policy: PolicyContext
) -> ReleaseCheck:
    """Every reason not to release ``study`` now (none: it may be released).

    Checks the state, the stored aggregate, that every study site signed off and all on
    one hash (a disagreement is ``release.hash_mismatch``, naming each site and its hash),
    the uploaded model, that the study spent no more privacy budget than it reserved
    (``release.budget_overspent``), and the consortium policy (``ReleaseModel``). Changes
    nothing.
    """
    check = ReleaseCheck()
    sites = study_site_ids(study)
    if study.state is not StudyState.COMPLETED:
        check.problems.append(
            ReleaseProblem(
                "release.not_completed",
                f"Study {study.id} is {study.state.value}; only a completed study is released.",
            )
        )
    if session.get(FinalAggregate, study.id) is None:
        check.problems.append(
            ReleaseProblem("release.no_aggregate", "No final aggregate is stored for the study.")
        )
    signoffs = [s for s in list_signoffs(session, study.id) if s.site_id in sites]
    check.signoffs = signoffs
    groups = _hash_groups(signoffs)
    if len(groups) > 1:
        named = "; ".join(
            f"{', '.join(site_ids)} signed {digest[:16]}"
            for digest, site_ids in sorted(groups.items())
        )
        check.problems.append(
            ReleaseProblem(
                "release.hash_mismatch",
                f"The sites disagree on the final model: {named}.",
                tuple(sorted(s.site_id for s in signoffs)),
            )
        )
    missing = tuple(sorted(set(sites) - {s.site_id for s in signoffs}))
    if missing:
        check.problems.append(
            ReleaseProblem(
                "release.signoffs_missing",
                f"Not signed off yet by: {', '.join(missing)}.",
                missing,
            )
        )
    if len(groups) == 1:
        check.model_sha256 = next(iter(groups))
    model = session.get(ReleasedModel, study.id)
    if model is None or (check.model_sha256 and model.model_sha256 != check.model_sha256):
        check.problems.append(
            ReleaseProblem(
                "release.model_missing",
                "No uploaded model matches the signed-off hash."
                if model is not None
                else "No site has uploaded the decrypted model yet.",
            )
        )
    over = budgets.overspent(session, study.id)
    if over:
        named = ", ".join(f"{dataset} by ε={amount}" for dataset, amount in sorted(over.items()))
        check.problems.append(
            ReleaseProblem(
                "release.budget_overspent",
                f"The study spent more privacy budget than it reserved ({named}): the released "
                "model would not be covered by the approved guarantee.",
            )
        )
    decision = _policy_decision(session, policy, study, requester, len(signoffs))
    check.decision = decision
    if not decision.allowed:
        reasons = [r.text for r in decision.reasons] + list(decision.errors)
        check.problems.append(
            ReleaseProblem(
                "policy.denied", "The data-use policy denies the release: " + " ".join(reasons)
            )
        )
    return check


def mark_released(study: Study, *, actor: Principal, check: ReleaseCheck) -> StudyEvent:
    """``completed -> released`` (only after :func:`check_release_gate` allowed it)."""
    if not check.allowed or check.model_sha256 is None:
        raise ValueError("mark_released needs a passed release check")
    return transition(
        study,
        StudyState.RELEASED,
        actor=actor,
        reason=f"Every site signed off model {check.model_sha256[:16]}; the policy allows it.",
    )


def store_release(
    session: Session,
    study: Study,
    *,
    card: ModelCard,
    actor: Principal,
    released_at: datetime,
) -> StudyRelease:
    """Record the release and its model card."""
    release = StudyRelease(
        study_id=study.id,
        model_sha256=card.model.sha256,
        card=card.model_dump(mode="json"),
        released_by=actor.subject,
        released_at=released_at,
    )
    session.add(release)
    session.flush()
    return release


def get_release(session: Session, study: Study) -> StudyRelease:
    """The study's release (``release.not_released`` before it happened)."""
    release = session.get(StudyRelease, study.id)
    if study.state is not StudyState.RELEASED or release is None:
        raise ConflictError(
            f"Study {study.id} is {study.state.value}, not released.", code="release.not_released"
        )
    return release


def get_released_model(session: Session, study: Study) -> ReleasedModel:
    """The released model's bytes (``release.not_released`` before release)."""
    release = get_release(session, study)
    model = session.get(ReleasedModel, study.id)
    if model is None or model.model_sha256 != release.model_sha256:
        raise ConflictError("The released model is not available.", code="release.not_released")
    return model


def released_model_file(session: Session, study: Study) -> tuple[ReleasedModel, str, bytes]:
    """The released model as a safetensors file: (model, file name, file bytes).

    The file's data section is the released bytes unchanged
    (:mod:`concord_protocol.model_file`). ``release.not_released`` before release,
    ``release.layout_missing`` when the model was uploaded without its layout.
    """
    model = get_released_model(session, study)
    written = model_file(study, model)
    if written is None:
        raise ConflictError(
            "The model was uploaded without its parameter layout; only the raw bytes "
            "(GET .../release/model) are available.",
            code="release.layout_missing",
        )
    name, blob = written
    return model, name, blob
