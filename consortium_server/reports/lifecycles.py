"""The lifecycle section of the report: each selected study's contract, approvals,
transitions and rounds.

Every transition is paired with the ``study.<state>`` audit entry that records it (in
order, per study and state), so that an inspector can go from the table to the entry and
its inclusion proof; a transition with no entry shows none rather than a guess. Approvals
say whether they were given on the study's current contract hash. Transitions and
approvals ignore the time range (half a lifecycle would mislead); rounds are clipped to it.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.contract import StudyContract
from concord_protocol.disclosure import public
from consortium_server.audit.models import AuditLeaf
from consortium_server.budgets.accountant import evaluation_epsilon
from consortium_server.reports.rounds import AuditedRound
from consortium_server.reports.rows import (
    ApprovalRow,
    LifecycleEvent,
    ReportFilters,
    RoundRow,
    StudyLifecycle,
    amount_or_none,
)
from consortium_server.reports.selection import datasets_of, selected_studies
from consortium_server.studies.models import Study

__all__ = ["lifecycles"]


def evaluation_summary(contract: dict[str, object]) -> str:
    """One line on the study's evaluation releases and their privacy cost (empty for a
    stored contract that does not validate)."""
    try:
        parsed = StudyContract.model_validate(contract)
    except ValueError:
        return ""
    noise = parsed.evaluation_noise()
    if noise is None:
        return "none released"
    alone = evaluation_epsilon(parsed) or 0.0
    return (
        f"noisy test-split histogram, one per round trained ({parsed.training.rounds}), "
        f"noise multiplier {noise:.4g}; alone the releases cost epsilon {alone:.3f}, "
        "charged inside the target with the training"
    )


def _event_indices(
    session: Session, study_ids: set[str], tree_size: int | None
) -> dict[tuple[str, str], list[int]]:
    """(study id, action) -> indices of the audit entries recording that transition."""
    query = select(AuditLeaf.index, AuditLeaf.entry).where(AuditLeaf.action.like("study.%"))
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, data in session.execute(query.order_by(AuditLeaf.index)):
        try:
            entry = AuditEntry.from_canonical_bytes(bytes(data))
        except ValueError:
            continue
        if entry.object.type == "study" and entry.object.id in study_ids:
            found[(entry.object.id, entry.action)].append(index)
    return found


def lifecycles(
    session: Session,
    filters: ReportFilters,
    *,
    rounds: list[AuditedRound],
    tree_size: int | None = None,
) -> list[StudyLifecycle]:
    """Each selected study's approvals, transitions (with their audit entries) and rounds."""
    selected = selected_studies(session, filters)
    query = select(Study).order_by(Study.created_at, Study.id)
    if selected is not None:
        query = query.where(Study.id.in_(sorted(selected)))
    studies = list(session.scalars(query))
    indices = _event_indices(session, {s.id for s in studies}, tree_size)
    rounds_of: dict[str, list[AuditedRound]] = defaultdict(list)
    for record in rounds:
        rounds_of[record.study_id].append(record)
    result = []
    for study in studies:
        contract = study.contract or {}
        privacy = contract.get("privacy") if isinstance(contract.get("privacy"), dict) else {}
        used: dict[tuple[str, str], int] = defaultdict(int)
        events = []
        for event in study.events:
            key = (study.id, f"study.{event.to_state.value}")
            position = used[key]
            matches = indices.get(key, [])
            used[key] += 1
            events.append(
                LifecycleEvent(
                    at=event.at,
                    from_state=event.from_state.value if event.from_state else None,
                    to_state=event.to_state.value,
                    actor=event.actor_subject,
                    organisation=event.actor_organisation,
                    reason=event.reason,
                    audit_index=matches[position] if position < len(matches) else None,
                )
            )
        result.append(
            StudyLifecycle(
                study_id=study.id,
                title=study.title,
                owner=study.owner_subject,
                owner_organisation=study.owner_organisation,
                purpose=str(contract["purpose"]) if contract.get("purpose") else None,
                state=study.state.value,
                state_reason=study.state_reason,
                contract_hash=study.contract_hash,
                datasets=datasets_of(study),
                epsilon=amount_or_none((privacy or {}).get("epsilon")),
                delta=amount_or_none((privacy or {}).get("delta")),
                created_at=study.created_at,
                evaluation=evaluation_summary(contract),
                public=public(),
                approvals=[
                    ApprovalRow(
                        site_id=a.site_id,
                        decision=a.decision.value,
                        decided_by=a.decided_by,
                        decided_at=a.decided_at,
                        reason=a.reason,
                        contract_hash=a.contract_hash,
                        matches_contract=a.contract_hash == study.contract_hash,
                    )
                    for a in study.approvals
                ],
                events=events,
                rounds=[
                    RoundRow(
                        round=r.round,
                        at=r.at,
                        participants=r.participants,
                        samples=sum(r.samples.values()),
                        epsilon=r.epsilon,
                        digests=len(r.digests),
                        audit_index=r.index,
                        evaluation=r.evaluation,
                    )
                    for r in rounds_of.get(study.id, [])
                    if filters.in_range(r.at)
                ],
            )
        )
    return result
