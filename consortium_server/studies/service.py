"""Submitting studies, deciding on them per site, and who may see what.

Services take a session and flush; the request (or CLI command) commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from concord_protocol.canonical import sha256_hex
from concord_protocol.catalogue import check_task, get_entry, resolve_hyperparameters
from concord_protocol.contract import RosterMember, StudyContract, StudyDraft
from concord_protocol.errors import (
    IncompatibleInputError,
    InvalidHyperparameterError,
    UnknownModelError,
)
from concord_protocol.principals import Principal, Role
from concord_protocol.site_decisions import SignedDecision, SiteDecision
from concord_protocol.site_keys import SignatureError, site_key_fingerprint
from consortium_server.budgets import service as budgets
from consortium_server.budgets.accountant import evaluation_epsilon
from consortium_server.budgets.service import BudgetExceededError
from consortium_server.datasets.models import Dataset
from consortium_server.datasets.service import get_datasets, model_input
from consortium_server.db.base import utcnow
from consortium_server.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    PolicyDeniedError,
)
from consortium_server.sites.models import Site, SiteStatus
from consortium_server.sites.service import require_own_active_site, site_of_principal
from consortium_server.studies.lifecycle import transition
from consortium_server.studies.models import (
    ApprovalDecision,
    Study,
    StudyApproval,
    StudyEvent,
    StudySite,
    StudyState,
)
from consortium_server.studies.schemas import ApprovalCreate, StudyPublic, StudySitePublic

__all__ = [
    "ABORTED_ON_REVOCATION",
    "AbortedStudy",
    "ApprovalGate",
    "GateDecision",
    "SubmissionGate",
    "abort_studies_of_site",
    "abort_study",
    "can_see_study",
    "decide",
    "get_visible_study",
    "list_visible_studies",
    "submit_study",
    "to_public",
]


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the policy check at submission."""

    allowed: bool
    reasons: list[str] = field(default_factory=list)
    policy_set_hash: str | None = None


#: Called at submission with the contract, the datasets it names and the submitter.
SubmissionGate = Callable[[StudyContract, list[Dataset], Principal], GateDecision]
#: Called when a site approves, with the study and the site's id.
ApprovalGate = Callable[[Study, str], GateDecision]


def _structural_gate(
    contract: StudyContract, datasets: list[Dataset], _: Principal
) -> GateDecision:
    """Checks that hold whatever the policy: enough distinct sites for ``min_sites``."""
    sites = {d.site_id for d in datasets}
    if len(sites) < contract.federation.min_sites:
        return GateDecision(
            False,
            [
                f"The study needs {contract.federation.min_sites} sites but its datasets come "
                f"from {len(sites)}."
            ],
        )
    return GateDecision(True)


def study_roster(datasets: list[Dataset], sites: dict[str, Site]) -> list[RosterMember]:
    """The roster of a study over ``datasets``: each owning site, sorted by id, with its
    keys' fingerprint and the records it published for these datasets."""
    members = []
    for site_id in sorted({d.site_id for d in datasets}):
        site = sites[site_id]
        members.append(
            RosterMember(
                site_id=site_id,
                key_fingerprint=site_key_fingerprint(
                    site.signing_public_key, site.exchange_public_key
                ),
                max_examples=sum(d.record_count for d in datasets if d.site_id == site_id),
            )
        )
    return members


def complete_draft(
    draft: StudyDraft, datasets: list[Dataset], sites: dict[str, Site]
) -> StudyContract:
    """The contract of ``draft``: its roster from the catalogue and the site directory, and
    the key generator the researcher named (default: the first roster member).

    Raises :class:`ConflictError` (``study.roster_mismatch``) when the draft carries a
    roster other than this one, and :class:`InvalidRequestError` for a key generator that
    is not in the roster.
    """
    roster = study_roster(datasets, sites)
    if draft.roster is not None and draft.roster != roster:
        raise ConflictError(
            "The roster in the draft is not the study's: its datasets' sites and their "
            "current keys give another one. Leave the roster out, or fetch the site "
            "directory again.",
            code="study.roster_mismatch",
            details=[
                {
                    "site_id": m.site_id,
                    "key_fingerprint": m.key_fingerprint,
                    "max_examples": m.max_examples,
                }
                for m in roster
            ],
        )
    key_generator = draft.key_generator or roster[0].site_id
    if key_generator not in {m.site_id for m in roster}:
        raise InvalidRequestError(
            f"The key generator {key_generator!r} is not a site of the study.",
            code="study.invalid",
            details=[{"field": "key_generator", "message": "must be a site of the study"}],
        )
    return draft.complete(roster, key_generator)


def _check_model(draft: StudyDraft) -> None:
    """Refuse a model the catalogue does not have, or hyperparameters outside its ranges,
    with the field named: the sites would refuse it anyway, after their stewards spent
    time approving it."""
    try:
        entry = get_entry(draft.model.name, draft.model.version)
        resolve_hyperparameters(entry, draft.model.hyperparameters)
    except InvalidHyperparameterError as exc:
        raise InvalidRequestError(
            exc.message,
            code="study.invalid",
            details=[{"field": f"model.hyperparameters.{exc.name}", "message": exc.message}],
        ) from None
    except UnknownModelError as exc:
        raise InvalidRequestError(
            exc.message,
            code="study.invalid",
            details=[{"field": "model", "message": exc.message}],
        ) from None


def _check_task(draft: StudyDraft, datasets: list[Dataset]) -> None:
    """Refuse a study whose model, or one of whose datasets, is not of its task (a
    classifier named for masks, a segmentation study over labelled records): every site
    would refuse its rounds."""
    try:
        check_task(draft.model, draft.task)
    except IncompatibleInputError as exc:
        raise InvalidRequestError(
            exc.message,
            code="study.invalid",
            details=[{"field": "model", "message": exc.message}],
        ) from None
    segmentation = draft.task.kind == "segmentation"
    wrong = sorted(d.id for d in datasets if (d.task == "segmentation") != segmentation)
    if wrong:
        message = f"Dataset(s) {', '.join(wrong)} are not labelled for {draft.task.kind}."
        raise InvalidRequestError(
            message,
            code="study.invalid",
            details=[{"field": "datasets", "message": message}],
        )


def _check_preprocessing(draft: StudyDraft, datasets: list[Dataset]) -> None:
    """Refuse declared preprocessing that a dataset cannot take: tabular data, or images
    with other spatial axes than the steps are declared for (every site would refuse the
    rounds, ``data.preprocessing_*``, after its steward approved the study)."""
    spec = draft.preprocessing
    if not spec.steps:
        return
    rank = spec.spatial_rank
    wrong = []
    for dataset in datasets:
        given = model_input(dataset.feature_summary)
        spatial = len(given[0]) - 1 if given is not None else 0
        if dataset.modality == "tabular" or spatial < 2 or rank not in (None, spatial):
            wrong.append(dataset.id)
    if wrong:
        axes = f"{rank}D images" if rank is not None else "images"
        message = (
            f"The study's preprocessing applies to {axes}; dataset(s) {', '.join(sorted(wrong))} "
            "are not."
        )
        raise InvalidRequestError(
            message,
            code="study.invalid",
            details=[{"field": "preprocessing", "message": message}],
        )


def _check_evaluation_budget(draft: StudyDraft) -> None:
    """Refuse a draft whose evaluation releases alone would spend its whole epsilon (an
    explicit ``evaluation.noise_multiplier`` too small): no site could train it."""
    alone = evaluation_epsilon(draft)
    if alone is not None and alone >= draft.privacy.epsilon:
        raise InvalidRequestError(
            f"The evaluation releases alone would cost epsilon {alone:.3f}, not less than the "
            f"study's target {draft.privacy.epsilon:g}: raise evaluation.noise_multiplier, "
            "or set evaluation.epsilon_share instead.",
            code="study.invalid",
            details=[
                {
                    "field": "evaluation.noise_multiplier",
                    "message": f"releases alone cost epsilon {alone:.3f}",
                }
            ],
        )


def replayed_submission(
    session: Session, draft: StudyDraft, *, actor: Principal, idempotency_key: str
) -> Study | None:
    """The study an earlier submission with ``idempotency_key`` made, when it was the same
    draft (None when the key is new); ``study.idempotency_conflict`` (409) when the key was
    used with another draft."""
    study = session.scalars(
        select(Study).where(
            Study.owner_subject == actor.subject, Study.idempotency_key == idempotency_key
        )
    ).first()
    if study is None:
        return None
    if study.idempotency_draft_hash != draft_hash(draft):
        raise ConflictError(
            f"The Idempotency-Key {idempotency_key!r} was used for another study draft "
            f"(study {study.id}); use a new key for a new study.",
            code="study.idempotency_conflict",
        )
    return study


def draft_hash(draft: StudyDraft) -> str:
    """SHA-256 of the draft as submitted (its canonical JSON): what a replay must repeat."""
    return sha256_hex(draft.model_dump(mode="json"))


def submit_study(
    session: Session,
    draft: StudyDraft,
    *,
    actor: Principal,
    approval_window: timedelta,
    gate: SubmissionGate | None = None,
    idempotency_key: str | None = None,
) -> Study:
    """Complete a draft with its roster, record the study, check it, and move it to
    ``awaiting_approvals`` or ``rejected``.

    Unknown datasets, datasets of revoked sites, and a draft whose roster or key generator
    is not the one the catalogue gives are refused outright (nothing stored); a policy
    denial is recorded as a ``rejected`` study with every reason.
    """
    datasets, unknown = get_datasets(session, draft.datasets)
    if unknown:
        raise InvalidRequestError(
            f"Unknown dataset(s): {', '.join(unknown)}.",
            code="study.invalid",
            details=[{"field": "datasets", "message": f"unknown dataset {i!r}"} for i in unknown],
        )
    _check_evaluation_budget(draft)
    _check_model(draft)
    _check_task(draft, datasets)
    _check_preprocessing(draft, datasets)
    site_ids = sorted({d.site_id for d in datasets})
    sites = {s.id: s for s in session.scalars(select(Site).where(Site.id.in_(site_ids)))}
    revoked = [sid for sid in site_ids if sites[sid].status is SiteStatus.REVOKED]
    if revoked:
        raise InvalidRequestError(
            f"Dataset(s) belong to revoked site(s): {', '.join(revoked)}.", code="study.invalid"
        )
    contract = complete_draft(draft, datasets, sites)
    now = utcnow()
    study = Study(
        title=contract.title,
        owner_subject=actor.subject,
        owner_organisation=actor.organisation,
        contract=contract.model_dump(mode="json"),
        contract_hash=contract.contract_hash(),
        state=StudyState.SUBMITTED,
        approval_deadline=now + approval_window,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
        idempotency_draft_hash=draft_hash(draft) if idempotency_key else None,
    )
    session.add(study)
    session.flush()
    study.sites = [StudySite(study_id=study.id, site_id=s) for s in site_ids]
    study.events.append(_created_event(study, actor))

    decision = _structural_gate(contract, datasets, actor)
    if decision.allowed and gate is not None:
        decision = gate(contract, datasets, actor)
    if decision.allowed:
        session.add(transition(study, StudyState.AWAITING_APPROVALS, actor=actor))
    else:
        session.add(
            transition(study, StudyState.REJECTED, actor=actor, reason=" ".join(decision.reasons))
        )
    session.flush()
    return study


def _created_event(study: Study, actor: Principal) -> StudyEvent:
    return StudyEvent(
        study_id=study.id,
        from_state=None,
        to_state=StudyState.SUBMITTED,
        actor_subject=actor.subject,
        actor_organisation=actor.organisation,
        reason="",
        at=study.created_at,
    )


def _expire_if_overdue(session: Session, study: Study) -> None:
    if study.state is StudyState.AWAITING_APPROVALS and utcnow() > study.approval_deadline:
        session.add(
            transition(
                study,
                StudyState.REJECTED,
                actor=None,
                reason="The approval window closed before every site decided.",
            )
        )
        session.flush()


def _site_ids_of(session: Session, principal: Principal) -> set[str]:
    site = site_of_principal(session, principal)
    return {site.id} if site is not None else set()


def _can_see(session: Session, principal: Principal, study: Study) -> bool:
    if principal.has(Role.CONSORTIUM_ADMIN, Role.COMPLIANCE_OFFICER):
        return True
    if principal.has(Role.RESEARCHER) and study.owner_subject == principal.subject:
        return True
    if principal.has(Role.DATA_STEWARD, Role.SITE_NODE):
        own = _site_ids_of(session, principal)
        return any(s.site_id in own for s in study.sites)
    return False


def can_see_study(session: Session, principal: Principal, study_id: str) -> bool:
    """Whether ``principal`` may see the study ``study_id`` (False if there is none): the
    rule of study reads, which audit-entry reads follow too."""
    study = session.get(Study, study_id)
    return study is not None and _can_see(session, principal, study)


def get_visible_study(session: Session, study_id: str, principal: Principal) -> Study:
    """The study if it exists and the principal may see it, else ``study.not_found``.

    Existence is not revealed to those who may not see the study.
    """
    study = session.get(Study, study_id)
    if study is None or not _can_see(session, principal, study):
        raise NotFoundError(f"No study with id {study_id!r}.", code="study.not_found")
    _expire_if_overdue(session, study)
    return study


def list_visible_studies(
    session: Session, principal: Principal, *, state: StudyState | None = None
) -> list[Study]:
    """Studies the principal may see, newest first."""
    query = select(Study).order_by(Study.created_at.desc(), Study.id)
    if state is not None:
        query = query.where(Study.state == state)
    if not principal.has(Role.CONSORTIUM_ADMIN, Role.COMPLIANCE_OFFICER):
        clauses = []
        if principal.has(Role.RESEARCHER):
            clauses.append(Study.owner_subject == principal.subject)
        if principal.has(Role.DATA_STEWARD, Role.SITE_NODE):
            own = _site_ids_of(session, principal)
            if own:
                clauses.append(
                    Study.id.in_(select(StudySite.study_id).where(StudySite.site_id.in_(own)))
                )
        if not clauses:
            return []
        query = query.where(or_(*clauses))
    studies = list(session.scalars(query))
    for study in studies:
        _expire_if_overdue(session, study)
    return [s for s in studies if state is None or s.state is state]


def signed_decision(study_id: str, data: ApprovalCreate) -> SignedDecision:
    """The signed decision an approval body carries; :class:`InvalidRequestError` when it
    is not one (bad base64, a field the signed form refuses)."""
    try:
        return SignedDecision(
            decision=SiteDecision(
                study_id=study_id,
                contract_hash=data.contract_hash,
                site_id=data.site_id,
                decision=data.decision.value,
                reason=data.reason,
                decided_at=data.decided_at,
            ),
            signature=data.signature,
        )
    except ValidationError as exc:
        raise InvalidRequestError(
            "The decision is not a signed site decision.",
            code="approval.signature_invalid",
            details=[
                {"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
            ],
        ) from None


def _verify_signed_decision(study: Study, site: Site, data: ApprovalCreate) -> None:
    """The decision must be signed by the key the study's roster names for the site, and
    the site must still hold that key (a rotation since submission needs a new study)."""
    contract = StudyContract.model_validate(study.contract)
    member = contract.member(site.id)
    if member is None:
        raise ConflictError(
            f"Site {site.id!r} is not in the study's roster.", code="approval.not_requested"
        )
    current = site_key_fingerprint(site.signing_public_key, site.exchange_public_key)
    if current != member.key_fingerprint:
        raise ConflictError(
            f"Site {site.id!r} changed its keys after the study was submitted: the roster "
            "names the old ones. Abort the study and submit it again.",
            code="approval.roster_key_changed",
        )
    try:
        signed_decision(study.id, data).verify(site.signing_public_key)
    except SignatureError as exc:
        raise InvalidRequestError(
            f"The decision is not signed by site {site.id!r}'s key: {exc.message}",
            code="approval.signature_invalid",
        ) from None


def is_recorded(study: Study, data: ApprovalCreate) -> bool:
    """Whether exactly this signed decision is already on record for the study.

    Posting the same signed decision again is a no-op, not a conflict: the site's CLI and
    its agent (which re-posts decisions it holds unposted) can race, and a client that
    lost the answer to its first post must be able to retry. A *different* decision from
    the same site is still ``approval.duplicate``.
    """
    return any(
        a.site_id == data.site_id
        and a.signature == data.signature
        and a.contract_hash == data.contract_hash
        and a.decision is data.decision
        for a in study.approvals
    )


def decide(
    session: Session,
    study_id: str,
    data: ApprovalCreate,
    *,
    actor: Principal,
    gate: ApprovalGate | None = None,
) -> Study:
    """Record a site's approval or decline of the study's exact contract hash.

    An approval is checked against the policy (``gate``) first: a denial is refused with
    its reasons and nothing is recorded. When every site has approved, the study's epsilon
    is reserved on every dataset it uses and it becomes ``approved``; if a dataset no
    longer has the budget, it becomes ``rejected`` with the numbers. One decline rejects it.
    The same signed decision posted again changes nothing (:func:`is_recorded`).
    """
    study = get_visible_study(session, study_id, actor)
    site = require_own_active_site(session, actor, data.site_id)
    if site.id not in {s.site_id for s in study.sites}:
        raise ConflictError(
            f"Study {study.id} uses no dataset of site {site.id!r}.", code="approval.not_requested"
        )
    if is_recorded(study, data):
        return study
    if any(a.site_id == site.id for a in study.approvals):
        raise ConflictError(
            f"Site {site.id!r} has already decided on this study.", code="approval.duplicate"
        )
    if study.state is not StudyState.AWAITING_APPROVALS:
        raise ConflictError(
            f"The study is {study.state.value}; only studies awaiting approvals can be decided.",
            code="study.invalid_transition",
        )
    if data.contract_hash != study.contract_hash:
        raise ConflictError(
            "The contract hash you approved is not this study's contract hash: "
            "fetch the study again and review the current contract.",
            code="approval.hash_mismatch",
        )
    if data.decision is ApprovalDecision.DECLINED and not data.reason.strip():
        raise InvalidRequestError(
            "A decline needs a reason.",
            code="request.invalid",
            details=[{"field": "body.reason", "message": "required when declining"}],
        )
    _verify_signed_decision(study, site, data)
    if data.decision is ApprovalDecision.APPROVED and gate is not None:
        verdict = gate(study, site.id)
        if not verdict.allowed:
            raise PolicyDeniedError(
                "The consortium policy does not allow this site to approve: "
                + " ".join(verdict.reasons),
                details=[{"reason": r} for r in verdict.reasons],
            )
    approval = StudyApproval(
        study_id=study.id,
        site_id=site.id,
        decision=data.decision,
        contract_hash=data.contract_hash,
        decided_by=actor.subject,
        reason=data.reason,
        decided_at=utcnow(),
        signed_at=data.decided_at,
        signature=data.signature,
    )
    session.add(approval)
    study.approvals.append(approval)
    if data.decision is ApprovalDecision.DECLINED:
        session.add(
            transition(
                study,
                StudyState.REJECTED,
                actor=actor,
                reason=f"Declined by site {site.id}: {data.reason}",
            )
        )
    elif {a.site_id for a in study.approvals if a.decision is ApprovalDecision.APPROVED} >= {
        s.site_id for s in study.sites
    }:
        _reserve_and_approve(session, study, actor)
    session.flush()
    return study


def _reserve_and_approve(session: Session, study: Study, actor: Principal) -> None:
    contract = StudyContract.model_validate(study.contract)
    try:
        with session.begin_nested():
            budgets.reserve(
                session,
                study.id,
                contract.datasets,
                contract.privacy.epsilon,
                contract.privacy.delta,
            )
    except BudgetExceededError as exc:
        transition(
            study,
            StudyState.REJECTED,
            actor=actor,
            reason=f"Every site approved, but the privacy budget is exhausted: {exc.message}",
        )
        return
    transition(
        study,
        StudyState.APPROVED,
        actor=actor,
        reason=f"Every site approved; ε={contract.privacy.epsilon:g} reserved on "
        f"{len(contract.datasets)} dataset(s).",
    )


def abort_study(session: Session, study_id: str, *, actor: Principal, reason: str) -> Study:
    """Stop a study: its owner or a consortium admin."""
    study = get_visible_study(session, study_id, actor)
    is_owner = principal_owns(actor, study)
    if not (is_owner or actor.has(Role.CONSORTIUM_ADMIN)):
        raise ForbiddenError("Only the study's owner or a consortium admin can abort it.")
    _abort(session, study, actor=actor, reason=reason)
    session.flush()
    return study


def _abort(session: Session, study: Study, *, actor: Principal, reason: str) -> None:
    transition(study, StudyState.ABORTED, actor=actor, reason=reason)
    budgets.release(session, study.id)


#: States of a study that a revoked site's withdrawal ends: not yet finished.
ABORTED_ON_REVOCATION = frozenset(
    {StudyState.AWAITING_APPROVALS, StudyState.APPROVED, StudyState.RUNNING}
)


@dataclass(frozen=True)
class AbortedStudy:
    """A study that a site's revocation aborted, and how many events it had before."""

    study: Study
    events_before: int
    was_running: bool


def abort_studies_of_site(
    session: Session, site_id: str, *, actor: Principal, reason: str
) -> list[AbortedStudy]:
    """Abort every unfinished study (awaiting approvals, approved or running) that uses a
    dataset of ``site_id``, which was just revoked: the site must not keep taking part in,
    or holding the keys of, a study it was removed from. Each transition names the
    revocation; the unused budget is returned. Completed studies are left alone (their
    results are fixed; the release gate still counts the site's earlier sign-off).

    Each study row is locked (``FOR UPDATE`` on PostgreSQL) before it changes, so a round
    report that the round gate holds the lock for lands first, and the next one is told
    to stop.
    """
    ids = session.scalars(
        select(Study.id)
        .join(StudySite, StudySite.study_id == Study.id)
        .where(StudySite.site_id == site_id, Study.state.in_(ABORTED_ON_REVOCATION))
        .order_by(Study.id)
    ).all()
    aborted = []
    for study_id in ids:
        study = session.get(Study, study_id, with_for_update=True, populate_existing=True)
        if study is None or study.state not in ABORTED_ON_REVOCATION:
            continue
        before, running = len(study.events), study.state is StudyState.RUNNING
        _abort(
            session,
            study,
            actor=actor,
            reason=f"Site {site_id} was revoked ({reason}); the study cannot go on without it.",
        )
        aborted.append(AbortedStudy(study, before, running))
    session.flush()
    return aborted


def principal_owns(principal: Principal, study: Study) -> bool:
    """True if ``principal`` submitted ``study`` as a researcher."""
    return principal.has(Role.RESEARCHER) and study.owner_subject == principal.subject


def to_public(study: Study) -> StudyPublic:
    """Response body of a study, with every needed site and its decision."""
    decided = {a.site_id: a for a in study.approvals}
    sites = []
    for link in study.sites:
        approval = decided.get(link.site_id)
        sites.append(
            StudySitePublic(
                site_id=link.site_id,
                decision=approval.decision if approval else None,
                contract_hash=approval.contract_hash if approval else None,
                decided_by=approval.decided_by if approval else None,
                decided_at=approval.decided_at if approval else None,
                reason=approval.reason if approval else None,
                signed_at=approval.signed_at if approval else None,
                signature=approval.signature if approval else None,
            )
        )
    return StudyPublic.model_validate(
        {
            **{
                k: getattr(study, k)
                for k in (
                    "id",
                    "title",
                    "state",
                    "owner_subject",
                    "owner_organisation",
                    "contract_hash",
                    "created_at",
                    "updated_at",
                    "state_reason",
                    "contract",
                    "approval_deadline",
                    "current_round",
                    "events",
                )
            },
            "sites": sites,
        }
    )
