"""The server's answer to each round: record it, charge it, check the next one, go on or stop.

Every round of a running study passes this gate before the next one starts. The ServerApp
uploads the round's encrypted aggregate (:func:`put_checkpoint`), then reports the round
(:func:`report_round`) and waits; in the one transaction of that report the server

1. checks that the report comes from the study's current run attempt and is the next round
   (a report of a round already on record is answered again, never recorded twice);
2. audits the round and charges the sites' epsilon to the ledger
   (:func:`~consortium_server.federation.coordinator.record_round`);
3. ends the study if the round failed, or completes it after the last round, keeping the
   final checkpoint as the aggregate the release gate works on;
4. otherwise evaluates the data-use policy for the next round, with what is left of the
   budget reservation, and answers ``continue`` only if it allows it.

So a policy published while round N trains stops the study before any message of round
N+1 leaves, and no site trains (or spends privacy budget) on a round the policy denies.
:func:`heartbeat` tells a live ServerApp from one that died; :func:`report_failure` marks
an attempt as stopped so the run manager restarts it at once. Functions take a session and
flush; the internal API commits before it answers.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from concord_protocol.contract import StudyContract
from concord_protocol.rounds import RoundRecord
from consortium_server.audit.log import AuditLog
from consortium_server.audit.recorder import AuditRecorder
from consortium_server.errors import ConflictError, InvalidRequestError, NotFoundError
from consortium_server.federation.checkpoints import (
    GlobalModel,
    get_checkpoint,
    store_checkpoint,
)
from consortium_server.federation.coordinator import (
    SOURCE,
    check_round_policy,
    finish_run,
    record_round,
)
from consortium_server.federation.run_messages import RunVerdict
from consortium_server.federation.study_runs import current_run, silence_attempt, touch
from consortium_server.policy.checks import PolicyContext
from consortium_server.studies.models import Study, StudyState

__all__ = ["heartbeat", "put_checkpoint", "read_checkpoint", "report_failure", "report_round"]


def _stop(reason: str) -> RunVerdict:
    return RunVerdict(action="stop", reason=reason)


def _study(session: Session, study_id: str, *, lock: bool = False) -> Study:
    study = session.get(Study, study_id, with_for_update=lock)
    if study is None:
        raise NotFoundError(f"No study {study_id!r}.", code="study.not_found")
    return study


def _refusal(session: Session, study: Study, attempt: str) -> RunVerdict | None:
    """A stop verdict if ``attempt`` may no longer act for the study; ``None`` if it may."""
    run = current_run(session, study.id)
    if run is None or run.attempt != attempt:
        return _stop("This run attempt was replaced by another; it must stop.")
    if study.state is not StudyState.RUNNING:
        return _stop(f"The study is {study.state.value}.")
    return None


def heartbeat(session: Session, study_id: str, attempt: str) -> RunVerdict:
    """The ServerApp of ``attempt`` is alive: ``continue`` while it is the study's current
    attempt and the study runs, ``stop`` otherwise (replaced, aborted, ended)."""
    study = _study(session, study_id)
    refusal = _refusal(session, study, attempt)
    if refusal is not None:
        return refusal
    touch(session, study_id, attempt)
    return RunVerdict(action="continue", next_round=study.current_round + 1)


def put_checkpoint(session: Session, study_id: str, attempt: str, model: GlobalModel) -> RunVerdict:
    """Keep the encrypted aggregate of ``model.round_number`` for the run's report.

    Refused (409 ``federation.round_out_of_order``) for a round that is not the next one;
    a round already on record keeps the checkpoint it was recorded with.
    """
    study = _study(session, study_id, lock=True)
    refusal = _refusal(session, study, attempt)
    if refusal is not None:
        return refusal
    if model.round_number <= study.current_round:
        return RunVerdict(action="continue", next_round=study.current_round + 1)
    if model.round_number != study.current_round + 1:
        raise ConflictError(
            f"Round {model.round_number} cannot follow round {study.current_round}.",
            code="federation.round_out_of_order",
        )
    contract = StudyContract.model_validate(study.contract)
    scheme = contract.encryption.scheme if contract.encryption.enabled else "plain"
    store_checkpoint(session, study_id, model, expect=(scheme,))
    touch(session, study_id, attempt)
    return RunVerdict(action="continue", next_round=model.round_number)


def read_checkpoint(
    session: Session, study_id: str, attempt: str, round_number: int
) -> GlobalModel:
    """The stored aggregate of ``round_number`` (a restarted run starts from it)."""
    study = _study(session, study_id)
    refusal = _refusal(session, study, attempt)
    if refusal is not None:
        raise ConflictError(refusal.reason, code="federation.attempt_stale")
    row = get_checkpoint(session, study_id, round_number)
    if row is None or round_number > study.current_round:
        raise NotFoundError(
            f"No checkpoint of round {round_number} is kept.", code="federation.checkpoint_missing"
        )
    return row.model()


def report_round(
    session: Session,
    study_id: str,
    attempt: str,
    record: RoundRecord,
    *,
    log: AuditLog,
    policy: PolicyContext,
) -> RunVerdict:
    """Record ``record`` and decide whether the next round may start (see the module)."""
    study = _study(session, study_id, lock=True)
    if record.study_id != study_id or record.contract_hash != study.contract_hash:
        raise InvalidRequestError(
            "The round record names another study or contract.", code="federation.report_invalid"
        )
    refusal = _refusal(session, study, attempt)
    if refusal is not None:
        return refusal
    contract = StudyContract.model_validate(study.contract)
    number = record.round_number
    if number <= study.current_round:  # the answer to an earlier post was lost
        touch(session, study_id, attempt)
        return RunVerdict(action="continue", next_round=study.current_round + 1)
    if number != study.current_round + 1:
        raise ConflictError(
            f"Round {number} cannot follow round {study.current_round}.",
            code="federation.round_out_of_order",
        )
    checkpoint = None
    if record.status == "aggregated":
        row = get_checkpoint(session, study_id, number)
        if row is None or row.digest != record.aggregate_digest:
            raise ConflictError(
                f"Upload the aggregate of round {number} before reporting the round.",
                code="federation.checkpoint_missing",
            )
        checkpoint = row.model()
    record_round(session, record, log=log)
    touch(session, study_id, attempt, progress=True)
    if record.status != "aggregated":
        reason = f"round {number}: {record.failure or 'the round failed'}"
        finish_run(session, study_id, completed=False, reason=reason, log=log)
        return _stop(f"The study failed: {reason}")
    if number >= contract.training.rounds:
        finished = finish_run(
            session, study_id, completed=True, final_model=checkpoint, log=log, reason=""
        )
        return _stop(f"The study is {finished.state.value}.")
    decision = check_round_policy(
        session,
        study,
        number + 1,
        participating_sites=len(record.participants),
        policy=policy,
        log=log,
    )
    if not decision.allowed:
        reasons = " ".join([r.text for r in decision.reasons] + list(decision.errors))
        reason = f"the policy denies round {number + 1}: {reasons}"
        finish_run(session, study_id, completed=False, reason=reason, log=log)
        return _stop(f"The study failed: {reason}")
    return RunVerdict(action="continue", next_round=number + 1)


def report_failure(
    session: Session, study_id: str, attempt: str, reason: str, *, log: AuditLog
) -> RunVerdict:
    """The ServerApp of ``attempt`` stopped on an error: audited (``study.run_interrupted``),
    and the attempt is marked silent so the run manager replaces it without waiting."""
    study = _study(session, study_id, lock=True)
    refusal = _refusal(session, study, attempt)
    if refusal is not None:
        return refusal
    silence_attempt(session, study_id, attempt)
    AuditRecorder(log, session, principal=None, source=SOURCE).record(
        "study.run_interrupted",
        object_type="study",
        object_id=study_id,
        contract_hash=study.contract_hash,
        details={"round": study.current_round + 1, "reason": reason[:500]},
    )
    return _stop("The run manager will restart the study from its last recorded round.")
