"""The consortium side of a study run: the lifecycle around the federation.

``approved -> running``: :func:`begin_run` checks the state and the key relay, and builds the
:class:`RunPlan`. Each round's :class:`RoundRecord` goes through :func:`record_round`: an
audit entry (``round.completed`` or ``round.failed``, with participants, sample counts,
epsilon, ciphertext digests and rejected replies) and, for an aggregated round, the
sites' cumulative epsilon charged to the ledger on each of their datasets. :func:`finish_run`
moves the study to ``completed`` or ``failed`` and returns the unused reservation.

Each function takes a session and flushes; :func:`run_with_lifecycle` commits between the
steps, so a crash mid-study leaves every finished round recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.entries import Outcome
from concord_protocol.catalogue import parameter_count
from concord_protocol.contract import StudyContract
from concord_protocol.errors import CatalogueError
from concord_protocol.policy.decisions import check_round
from concord_protocol.policy.engine import Decision
from concord_protocol.policy.facts import owner_principal
from concord_protocol.principals import Principal
from concord_protocol.rounds import RoundRecord
from consortium_server.audit.log import AuditLog
from consortium_server.audit.recorder import AuditRecorder
from consortium_server.budgets import service as budgets
from consortium_server.budgets.service import BudgetOverchargeError
from consortium_server.datasets.service import get_datasets
from consortium_server.db.session import session_scope
from consortium_server.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    PolicyDeniedError,
)
from consortium_server.federation.models import StudyKeyRelay
from consortium_server.federation.strategy import RoundHook, RunPlan, StudyOutcome
from consortium_server.policy.checks import PolicyContext
from consortium_server.release.service import store_final_aggregate
from consortium_server.studies.lifecycle import transition
from consortium_server.studies.models import ApprovalDecision, Study, StudyState

__all__ = [
    "RunStoppedError",
    "Runner",
    "begin_run",
    "check_round_policy",
    "continue_run",
    "finish_run",
    "model_size",
    "plan_for",
    "record_round",
    "resume_run",
    "run_with_lifecycle",
]

SOURCE = "consortium-server/federation"


class RunStoppedError(Exception):
    """Raised from a round hook to stop a run (the policy denies the next round)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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

    The input shape comes from the catalogue entry's feature summary (``input_shape``, or
    ``features`` for tabular data); the class count from ``num_classes`` (default 2). The
    count is the catalogue's (:func:`concord_protocol.catalogue.parameter_count`): the
    server builds no model.
    """
    shape = feature_summary.get("input_shape")
    if not isinstance(shape, list):
        features = feature_summary.get("features")
        if not isinstance(features, int):
            raise InvalidRequestError(
                "study.invalid",
                "The dataset's feature summary gives neither input_shape nor features.",
            )
        shape = [features]
    classes = feature_summary.get("num_classes", 2)
    try:
        return parameter_count(
            contract.model,
            input_shape=tuple(int(d) for d in shape),
            num_classes=int(classes) if isinstance(classes, int) else 2,
        )
    except CatalogueError as exc:
        raise InvalidRequestError("study.invalid", f"The study's model: {exc.message}") from exc


def _recorder(session: Session, log: AuditLog, actor: Principal | None) -> AuditRecorder:
    return AuditRecorder(log, session, principal=actor, source=SOURCE)


def plan_for(session: Session, study: Study, *, records_dir: Path | None) -> RunPlan:
    """The run plan of ``study`` (approved or running) from round 1.

    Refuses an encrypted study whose key exchange has not happened yet (no public context
    relayed).
    """
    contract = StudyContract.model_validate(study.contract)
    relay = session.get(StudyKeyRelay, study.id)
    if contract.encryption.enabled and relay is None:
        raise ConflictError(
            "study.invalid_transition",
            "The sites have not exchanged the study key yet (no public context relayed).",
        )
    datasets, _ = get_datasets(session, contract.datasets)
    return RunPlan(
        study_id=study.id,
        contract=contract,
        contract_hash=study.contract_hash,
        num_params=model_size(contract, datasets[0].feature_summary),
        sites=tuple(
            sorted(a.site_id for a in study.approvals if a.decision is ApprovalDecision.APPROVED)
        ),
        public_context=relay.public_context if relay is not None else None,
        records_dir=records_dir,
    )


def _study_in(session: Session, study_id: str, state: StudyState, doing: str) -> Study:
    """The study, locked for update, if it is in ``state``; else ``study.invalid_transition``."""
    study = session.get(Study, study_id, with_for_update=True)
    if study is None:
        raise ConflictError("study.invalid_transition", f"No study {study_id!r}.")
    if study.state is not state:
        raise ConflictError(
            "study.invalid_transition",
            f"Only {doing}; this one is {study.state.value}.",
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
        raise PolicyDeniedError(f"{refusal} " + " ".join(reasons), [{"reason": r} for r in reasons])


def resume_run(
    session: Session,
    study_id: str,
    *,
    log: AuditLog,
    records_dir: Path,
    policy: PolicyContext | None = None,
) -> RunPlan:
    """The plan that goes on with a study left ``running`` by a consortium server that
    stopped: from the round after the last recorded one (``study.current_round``).

    Audited as ``study.run_resumed``. With ``policy``, the next round is checked again (the
    server may have stopped between recording a round and checking the next); a denial is
    recorded and raised as ``policy.denied``.
    """
    study = _study_in(session, study_id, StudyState.RUNNING, "a running study can be resumed")
    plan = replace(
        plan_for(session, study, records_dir=records_dir), start_round=study.current_round + 1
    )
    _recorder(session, log, None).record(
        "study.run_resumed",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        details={"rounds_recorded": study.current_round, "next_round": plan.start_round},
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


def begin_run(
    session: Session,
    study_id: str,
    *,
    log: AuditLog,
    actor: Principal | None,
    records_dir: Path | None = None,
    policy: PolicyContext | None = None,
) -> RunPlan:
    """Move an approved study to ``running`` and return the plan for its run.

    Refuses a study that is not approved, an encrypted study whose key exchange has not
    happened yet (:func:`plan_for`), and, with ``policy``, a first round the policy denies
    (the reasons are recorded and raised as ``policy.denied``).
    """
    study = _study_in(session, study_id, StudyState.APPROVED, "an approved study can start")
    plan = plan_for(session, study, records_dir=records_dir)
    if policy is not None:  # a denial is recorded: the caller commits it before failing
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


def record_round(session: Session, record: RoundRecord, *, log: AuditLog) -> None:
    """Audit one round and charge the sites' epsilon to the ledger.

    Each site reports its accountant's epsilon for the whole study so far; it is charged,
    as an increase, to every dataset of that site in the study. A charge beyond the
    reservation is refused by the ledger and recorded as a failed charge (the round stays
    audited; the study is failed by :func:`finish_run`).
    """
    study = session.get(Study, record.study_id, with_for_update=True)
    if study is None:
        raise ConflictError("study.invalid_transition", f"No study {record.study_id!r}.")
    if record.round_number <= study.current_round:
        # Delivered again after a restart: the round is on record already.
        return
    contract = StudyContract.model_validate(study.contract)
    datasets, _ = get_datasets(session, contract.datasets)
    details = record.as_record()
    charged: dict[str, str] = {}
    overcharged: list[str] = []
    if record.status == "aggregated":
        for site_id, epsilon in sorted(record.epsilon.items()):
            if epsilon is None:
                continue
            for dataset in (d for d in datasets if d.site_id == site_id):
                try:
                    with session.begin_nested():
                        budgets.charge_cumulative(session, study.id, dataset.id, epsilon)
                    charged[dataset.id] = f"{epsilon:.6f}"
                except BudgetOverchargeError as exc:
                    overcharged.append(exc.message)
        study.current_round = record.round_number
    details["charged_epsilon"] = charged
    if overcharged:
        details["overcharged"] = overcharged
    _recorder(session, log, None).record(
        "round.completed" if record.status == "aggregated" else "round.failed",
        object_type="study",
        object_id=study.id,
        outcome=Outcome.SUCCESS
        if record.status == "aggregated" and not overcharged
        else Outcome.FAILURE,
        purpose=contract.purpose.value,
        contract_hash=study.contract_hash,
        details=details,
    )
    session.flush()


def finish_run(session: Session, outcome: StudyOutcome, *, log: AuditLog) -> Study:
    """``completed`` or ``failed``, with the reason; the unused reservation goes back."""
    study = session.get(Study, outcome.study_id, with_for_update=True)
    if study is None:
        raise ConflictError("study.invalid_transition", f"No study {outcome.study_id!r}.")
    completed = outcome.status == "completed"
    if completed and outcome.final_model is not None:
        try:
            with session.begin_nested():
                # Kept for the release gate: sites decrypt it and sign off the model's hash.
                store_final_aggregate(session, study.id, outcome.final_model)
        except DomainError as exc:
            completed = False
            outcome = StudyOutcome(
                outcome.study_id,
                outcome.contract_hash,
                "failed",
                outcome.rounds,
                failure=f"the final aggregate cannot be kept for release: {exc.public_message()}",
            )
    if completed:
        digest = outcome.final_model.digest if outcome.final_model else "none"
        reason = f"{len(outcome.rounds)} round(s) aggregated; final aggregate {digest[:16]}."
    else:
        reason = f"The run failed: {outcome.failure or 'no reason given'}"
    before = len(study.events)
    transition(
        study,
        StudyState.COMPLETED if completed else StudyState.FAILED,
        actor=None,
        reason=reason,
    )
    released = budgets.release(session, study.id)
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


Runner = Callable[[RunPlan, RoundHook], StudyOutcome]


def run_with_lifecycle(
    factory: sessionmaker[Session],
    log: AuditLog,
    study_id: str,
    runner: Runner,
    *,
    actor: Principal | None = None,
    records_dir: Path | None = None,
    policy: PolicyContext | None = None,
) -> StudyOutcome:
    """Run a study: begin (commit), each round recorded as it ends (commit), finish (commit).

    ``runner(plan, hook)`` executes the federation (real processes or an in-process grid)
    and must call ``hook`` with each round's record.
    """
    with session_scope(factory) as session:
        try:
            plan = begin_run(
                session, study_id, log=log, actor=actor, records_dir=records_dir, policy=policy
            )
        except PolicyDeniedError:
            session.commit()  # keep the recorded denial
            raise
    return continue_run(factory, log, plan, runner, policy=policy)


def continue_run(
    factory: sessionmaker[Session],
    log: AuditLog,
    plan: RunPlan,
    runner: Runner,
    *,
    policy: PolicyContext | None = None,
) -> StudyOutcome:
    """After :func:`begin_run` committed: run, record each round as it ends, finish.

    With ``policy``, the next round is checked after each round is recorded; a denial
    stops the run (:class:`RunStoppedError` from the hook) and fails the study with the
    reasons. A runner that raises (the SuperLink went away, a timeout) fails the study with
    the error as the reason; the rounds already recorded stay recorded.
    """

    def hook(record: RoundRecord) -> None:
        with session_scope(factory) as session:
            record_round(session, record, log=log)
        if policy is None or record.status != "aggregated" or record.round_number >= plan.rounds:
            return
        with session_scope(factory) as session:
            study = session.get(Study, plan.study_id)
            assert study is not None
            decision = check_round_policy(
                session,
                study,
                record.round_number + 1,
                participating_sites=len(record.participants),
                policy=policy,
                log=log,
            )
        if not decision.allowed:
            reasons = " ".join([r.text for r in decision.reasons] + list(decision.errors))
            raise RunStoppedError(f"the policy denies round {record.round_number + 1}: {reasons}")

    try:
        outcome = runner(plan, hook)
    except RunStoppedError as exc:
        outcome = StudyOutcome(plan.study_id, plan.contract_hash, "failed", failure=exc.reason)
    except Exception as exc:  # the run's end must be recorded whatever broke
        outcome = StudyOutcome(
            plan.study_id, plan.contract_hash, "failed", failure=f"{type(exc).__name__}: {exc}"
        )
    with session_scope(factory) as session:
        finish_run(session, outcome, log=log)
    return outcome
