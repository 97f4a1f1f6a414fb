"""The consortium side of a study run: the lifecycle around the federation.

``approved -> running``: :func:`begin_run` checks the state, the key relay and the first
round's policy, opens the study's first run attempt and builds the :class:`RunPlan`. Each
round the ServerApp reports passes the round gate
(:mod:`consortium_server.federation.round_gate`), which calls :func:`record_round`: an
audit entry (``round.completed`` or ``round.failed``, whose details are the round's
:class:`~concord_protocol.rounds.RoundRecord` and what the ledger charged) and, for every
round, aggregated or not, the sites' signed cumulative epsilon checked, recomputed and
charged to the ledger on each of their datasets. :func:`finish_run` moves the study to
``completed`` (keeping the final aggregate for the release gate) or ``failed``, and returns
the unused reservation.
:func:`resume_run` audits a restart after the last recorded round and checks that round's
policy again.

Each function takes a session and flushes; the caller commits.
"""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import Outcome
from concord_protocol.catalogue import parameter_count
from concord_protocol.contract import StudyContract
from concord_protocol.errors import CatalogueError
from concord_protocol.policy.decisions import check_round
from concord_protocol.policy.engine import Decision
from concord_protocol.policy.facts import owner_principal
from concord_protocol.principals import Principal
from concord_protocol.rounds import RoundAuditDetails, RoundRecord
from consortium_server.audit.log import AuditLog
from consortium_server.audit.recorder import AuditRecorder
from consortium_server.budgets import service as budgets
from consortium_server.budgets.accountant import check_report
from consortium_server.budgets.service import BudgetReportError
from consortium_server.datasets.service import get_datasets, model_input
from consortium_server.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    PolicyDeniedError,
)
from consortium_server.federation.checkpoints import GlobalModel, RoundCheckpoint
from consortium_server.federation.models import StudyKeyRelay
from consortium_server.federation.plan import RunPlan, SitePeer
from consortium_server.federation.study_runs import StudyRun, new_attempt
from consortium_server.policy.checks import PolicyContext
from consortium_server.release.service import store_final_aggregate
from consortium_server.sites.models import Site
from consortium_server.studies.lifecycle import transition
from consortium_server.studies.models import ApprovalDecision, Study, StudyState

__all__ = [
    "SOURCE",
    "begin_run",
    "check_round_policy",
    "finish_run",
    "model_size",
    "plan_for",
    "record_round",
    "resume_run",
]

SOURCE = "consortium-server/federation"


def check_round_policy(
    session: Session,
    study: Study,
    round_number: int,
    *,
    participating_sites: int,
    policy: PolicyContext,
    log: AuditLog,
) -> Decision:
    """May round ``round_number`` run? The consortium policy (RunRound) on every dataset,
    with what is left of the study's reservation; the decision is an audit entry."""
    contract = StudyContract.model_validate(study.contract)
    datasets, _ = get_datasets(session, contract.datasets)
    decision = check_round(
        policy.engine(session),
        contract,
        [d.facts() for d in datasets],
        owner_principal(study.owner_subject, study.owner_organisation),
        policy.facts(session),
        study_id=study.id,
        round_number=round_number,
        participating_sites=participating_sites,
        reservation_remaining=budgets.reservation_remaining(session, study.id),
    )
    _recorder(session, log, None).record(
        "policy.decision",
        object_type="study",
        object_id=study.id,
        outcome=Outcome.SUCCESS if decision.allowed else Outcome.DENIED,
        purpose=contract.purpose.value,
        contract_hash=study.contract_hash,
        policy_set_hash=decision.policy_set_hash,
        policy_allowed=decision.allowed,
        details={
            "action": "RunRound",
            "round": round_number,
            "reasons": [r.text for r in decision.reasons] + list(decision.errors),
        },
    )
    return decision


def model_size(contract: StudyContract, feature_summary: dict[str, object]) -> int:
    """Number of parameters of the contract's model for a dataset's input.

    The input shape and class count come from the dataset's feature summary, the spatial
    size from the contract's preprocessing when it fixes one
    (:func:`consortium_server.datasets.service.model_input`). The count is the catalogue's
    (:func:`concord_protocol.catalogue.parameter_count`): the server builds no model.
    """
    given = model_input(feature_summary, contract.preprocessing)
    if given is None:
        raise InvalidRequestError(
            "The dataset's feature summary gives neither input_shape nor features.",
            code="study.invalid",
        )
    shape, classes = given
    try:
        return parameter_count(contract.model, input_shape=shape, num_classes=classes)
    except CatalogueError as exc:
        raise InvalidRequestError(
            f"The study's model: {exc.message}", code="study.invalid"
        ) from exc


def _recorder(session: Session, log: AuditLog, actor: Principal | None) -> AuditRecorder:
    return AuditRecorder(log, session, principal=actor, source=SOURCE)


def plan_for(session: Session, study: Study, run: StudyRun) -> RunPlan:
    """The plan of ``study`` (approved or running) for the run attempt ``run``.

    Refuses an encrypted study whose key exchange has not happened yet (no public context
    relayed).
    """
    contract = StudyContract.model_validate(study.contract)
    relay = session.get(StudyKeyRelay, study.id)
    if contract.encryption.enabled and relay is None:
        raise ConflictError(
            "The sites have not exchanged the study key yet (no public context relayed).",
            code="study.invalid_transition",
        )
    datasets, _ = get_datasets(session, contract.datasets)
    sites = tuple(
        sorted(a.site_id for a in study.approvals if a.decision is ApprovalDecision.APPROVED)
    )
    return RunPlan(
        study_id=study.id,
        contract=contract,
        contract_hash=study.contract_hash,
        num_params=model_size(contract, datasets[0].feature_summary),
        sites=sites,
        public_context=relay.public_context if relay is not None else None,
        start_round=run.start_round,
        attempt=run.attempt,
        peers=tuple(_peer(session, site_id) for site_id in sites),
    )


def _peer(session: Session, site_id: str) -> SitePeer:
    """The ServerApp's view of an approved site: its enrolled SuperNode and its keys."""
    site = session.get(Site, site_id)
    if site is None:
        raise ConflictError(f"Site {site_id!r} is not enrolled.", code="study.invalid_transition")
    node = site.supernode_node_id
    return SitePeer(
        site_id=site.id,
        node_id=int(node) if node else None,
        signing_public_key=site.signing_public_key,
        exchange_public_key=site.exchange_public_key,
    )


def _study_in(session: Session, study_id: str, state: StudyState, doing: str) -> Study:
    """The study, locked for update, if it is in ``state``; else ``study.invalid_transition``."""
    study = session.get(Study, study_id, with_for_update=True)
    if study is None:
        raise ConflictError(f"No study {study_id!r}.", code="study.invalid_transition")
    if study.state is not state:
        raise ConflictError(
            f"Only {doing}; this one is {study.state.value}.", code="study.invalid_transition"
        )
    return study


def _check_or_refuse(
    session: Session,
    study: Study,
    round_number: int,
    *,
    sites: int,
    policy: PolicyContext,
    log: AuditLog,
    refusal: str,
) -> None:
    """Check the policy for ``round_number``; a denial is recorded in ``session`` (the caller
    commits it) and raised as ``policy.denied`` with ``refusal`` and the reasons."""
    decision = check_round_policy(
        session, study, round_number, participating_sites=sites, policy=policy, log=log
    )
    if not decision.allowed:
        reasons = [r.text for r in decision.reasons] + list(decision.errors)
        raise PolicyDeniedError(
            f"{refusal} " + " ".join(reasons), details=[{"reason": r} for r in reasons]
        )


def begin_run(
    session: Session,
    study_id: str,
    *,
    log: AuditLog,
    actor: Principal | None,
    policy: PolicyContext | None = None,
) -> RunPlan:
    """Move an approved study to ``running``, open its first run attempt, return the plan.

    Refuses a study that is not approved, an encrypted study whose key exchange has not
    happened yet (:func:`plan_for`), and, with ``policy``, a first round the policy denies
    (the reasons are recorded and raised as ``policy.denied``: the caller commits the
    recorded denial before failing).
    """
    study = _study_in(session, study_id, StudyState.APPROVED, "an approved study can start")
    plan = plan_for(session, study, new_attempt(session, study.id, start_round=1))
    if policy is not None:
        _check_or_refuse(
            session,
            study,
            1,
            sites=len(plan.sites),
            policy=policy,
            log=log,
            refusal="The policy does not allow the study's first round:",
        )
    before = len(study.events)
    transition(study, StudyState.RUNNING, actor=actor, reason="The federated run started.")
    session.flush()
    _recorder(session, log, actor).study_events(study, list(study.events[before:]))
    return plan


def resume_run(
    session: Session,
    study_id: str,
    run: StudyRun,
    *,
    log: AuditLog,
    policy: PolicyContext | None = None,
) -> RunPlan:
    """The plan of ``run``, a new attempt that goes on with a running study whose previous
    attempt went silent: from the round after the last recorded one.

    Audited as ``study.run_resumed``. With ``policy``, the next round is checked again (the
    policy may have changed while nothing ran); a denial is recorded and raised as
    ``policy.denied``.
    """
    study = _study_in(session, study_id, StudyState.RUNNING, "a running study can be resumed")
    plan = plan_for(session, study, run)
    _recorder(session, log, None).record(
        "study.run_resumed",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        details={
            "rounds_recorded": study.current_round,
            "next_round": plan.start_round,
            "restarts": run.restarts,
        },
    )
    if policy is not None and plan.start_round <= plan.rounds:
        _check_or_refuse(
            session,
            study,
            plan.start_round,
            sites=len(plan.sites),
            policy=policy,
            log=log,
            refusal=f"The policy does not allow round {plan.start_round}:",
        )
    session.flush()
    return plan


def _site_totals(
    contract: StudyContract, record: RoundRecord
) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """Per site: the cumulative epsilon to charge, the ledger's recomputation, and the
    reports refused or disputed (each a sentence for the audit entry).

    A verified spend report is checked and recomputed by the ledger's own accountant
    (:func:`consortium_server.budgets.accountant.check_report`): it is charged as reported,
    or at the recomputed figure when that is higher beyond the tolerance. A site whose node
    replied without a usable signed report is charged the study's whole target epsilon,
    the most its plan lets it spend: the ledger cannot know less, so it assumes the most.
    """
    totals: dict[str, float] = {}
    recomputed: dict[str, str] = {}
    refused: list[str] = []
    for site_id, spend in sorted(record.spend.items()):
        check = check_report(contract, site_id, spend)
        totals[site_id] = check.charge
        if check.recomputed is not None:
            recomputed[site_id] = f"{check.recomputed:.6f}"
        if check.problem:
            refused.append(
                f"{site_id}: report of epsilon {spend.epsilon:.6f} refused ({check.problem}); "
                f"charged {check.charge:.6f}"
            )
    for site_id, problem in sorted(record.spend_problems.items()):
        if site_id in totals:
            continue
        totals[site_id] = float(contract.privacy.epsilon)
        refused.append(
            f"{site_id}: no usable spend report ({problem}); charged the study's whole "
            f"target epsilon {contract.privacy.epsilon:g}"
        )
    return totals, recomputed, refused


def record_round(session: Session, record: RoundRecord, *, log: AuditLog) -> None:
    """Audit one round and charge the sites' spend to the ledger, whatever its status.

    Each site that trained reports its accountant's epsilon for the whole study so far in
    a signed spend report, also when its update was rejected or the round failed; it is
    charged, as an increase, to every dataset of that site in the study. Everything is
    charged: what exceeds the reservation is an overspend (audited as ``budget.overspent``;
    it blocks the release). Refused and disputed reports, and reports below what is
    already charged, are audited as ``budget.report_refused``. A round already on record
    is not recorded again.
    """
    study = session.get(Study, record.study_id, with_for_update=True)
    if study is None:
        raise ConflictError(f"No study {record.study_id!r}.", code="study.invalid_transition")
    if record.round_number <= study.current_round:
        return
    contract = StudyContract.model_validate(study.contract)
    datasets, _ = get_datasets(session, contract.datasets)
    charged: dict[str, str] = {}
    overspent: dict[str, str] = {}
    totals, recomputed, refused = _site_totals(contract, record)
    for site_id, total in sorted(totals.items()):
        for dataset in (d for d in datasets if d.site_id == site_id):
            try:
                with session.begin_nested():
                    line = budgets.charge_cumulative(session, study.id, dataset.id, total)
            except BudgetReportError as exc:
                refused.append(f"{site_id}: {exc.message}")
                continue
            charged[dataset.id] = f"{total:.6f}"
            if line.epsilon_overspent > 0:
                overspent[dataset.id] = str(line.epsilon_overspent)
    if record.status == "aggregated":
        study.current_round = record.round_number
    details = RoundAuditDetails(
        record=record,
        charged_epsilon=charged,
        overspent=overspent,
        recomputed_epsilon=recomputed,
        refused_reports=refused,
    )
    recorder = _recorder(session, log, None)
    recorder.record(
        "round.completed" if record.status == "aggregated" else "round.failed",
        object_type="study",
        object_id=study.id,
        outcome=Outcome.SUCCESS
        if record.status == "aggregated" and not overspent
        else Outcome.FAILURE,
        purpose=contract.purpose.value,
        contract_hash=study.contract_hash,
        details=details.model_dump(mode="json"),
    )
    flagged: list[tuple[str, str, object]] = [
        ("budget.report_refused", "reports", refused),
        ("budget.overspent", "overspent", overspent),
    ]
    for action, key, value in flagged:
        if value:
            recorder.record(
                action,
                object_type="study",
                object_id=study.id,
                outcome=Outcome.FAILURE,
                contract_hash=study.contract_hash,
                details={"round": record.round_number, key: value},
            )
    session.flush()


def finish_run(
    session: Session,
    study_id: str,
    *,
    completed: bool,
    reason: str,
    log: AuditLog,
    final_model: GlobalModel | None = None,
) -> Study:
    """``completed`` (with ``final_model`` kept for the release gate) or ``failed`` with
    ``reason``; the unused reservation goes back and the study's checkpoints are dropped.

    A completion whose final aggregate cannot be kept fails the study instead.
    """
    study = session.get(Study, study_id, with_for_update=True)
    if study is None:
        raise ConflictError(f"No study {study_id!r}.", code="study.invalid_transition")
    if completed:
        try:
            if final_model is None:
                raise InvalidRequestError("No final aggregate.", code="release.no_aggregate")
            with session.begin_nested():
                # Kept for the release gate: sites decrypt it and sign off the model's hash.
                store_final_aggregate(session, study.id, final_model)
        except DomainError as exc:
            completed = False
            reason = f"the final aggregate cannot be kept for release: {exc.public_message()}"
    if completed:
        assert final_model is not None
        reason = (
            f"{study.current_round} round(s) aggregated; final aggregate {final_model.digest[:16]}."
        )
    else:
        reason = f"The run failed: {reason or 'no reason given'}"
    before = len(study.events)
    transition(
        study,
        StudyState.COMPLETED if completed else StudyState.FAILED,
        actor=None,
        reason=reason,
    )
    released = budgets.release(session, study.id)
    session.execute(
        delete(RoundCheckpoint)
        .where(RoundCheckpoint.study_id == study.id)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    recorder = _recorder(session, log, None)
    recorder.study_events(study, list(study.events[before:]))
    recorder.record(
        "budget.released",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        details={
            "released": {line.dataset_id: str(line.epsilon_released) for line in released},
        },
    )
    return study
