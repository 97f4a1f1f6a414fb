"""The activity section of the report: who did what, from the audit log itself.

The indexed query columns of ``audit_leaves`` (actor, time) narrow the scan, but every row
shown is decoded from the bytes its leaf hash covers: the copied columns are not covered
by the hash, so trusting them would let an edited row through. A row whose bytes do not
match its leaf hash is listed by index as corrupt, never shown. Each row's summary is
short and names ids and counts (long values such as digests and keys are cut short).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.merkle import leaf_hash
from consortium_server.audit.models import AuditLeaf
from consortium_server.reports.rounds import ROUND_ACTION
from consortium_server.reports.rows import ActivityRow, ReportFilters
from consortium_server.reports.selection import selected_studies

__all__ = ["activity"]


def _leaves(
    session: Session, *, tree_size: int | None, filters: ReportFilters
) -> Iterable[tuple[int, AuditEntry | None]]:
    """(index, entry) for stored leaves below ``tree_size``; entry None if it is corrupt.

    The indexed query columns narrow the scan (actor, time); every row is then decoded
    from its hashed bytes, and a row whose bytes do not match its leaf hash is reported,
    not shown.
    """
    query = select(AuditLeaf).order_by(AuditLeaf.index)
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    if filters.user:
        query = query.where(AuditLeaf.actor_subject == filters.user)
    if filters.since:
        query = query.where(AuditLeaf.at >= filters.since)
    if filters.until:
        query = query.where(AuditLeaf.at < filters.until)
    for row in session.scalars(query.execution_options(yield_per=500)):
        data = bytes(row.entry)
        if leaf_hash(data) != bytes(row.leaf_hash):
            yield row.index, None
            continue
        try:
            yield row.index, AuditEntry.from_canonical_bytes(data)
        except ValueError:
            yield row.index, None


def _study_of(entry: AuditEntry) -> str | None:
    if entry.object.type == "study":
        return entry.object.id
    value = entry.details.get("study_id")
    return value if isinstance(value, str) else None


def _mentions_dataset(entry: AuditEntry, dataset_id: str) -> bool:
    if entry.object.type == "dataset" and entry.object.id == dataset_id:
        return True
    details = entry.details
    if details.get("dataset_id") == dataset_id:
        return True
    for key in ("datasets", "epsilon"):
        value = details.get(key)
        if isinstance(value, list | dict) and dataset_id in value:
            return True
    return False


def _summary(entry: AuditEntry) -> str:
    """A short, id-only description of ``details`` for the table."""
    details = entry.details
    if entry.action == ROUND_ACTION:
        samples = details.get("samples")
        total = (
            sum(v for v in samples.values() if isinstance(v, int))
            if isinstance(samples, dict)
            else 0
        )
        participants = details.get("participants")
        count = len(participants) if isinstance(participants, list) else 0
        return f"round {details.get('round')}: {count} sites, {total} samples"
    if "from" in details and "to" in details:
        text = f"{details.get('from') or '-'} → {details.get('to')}"
        reason = details.get("reason")
        return f"{text}: {reason}" if reason else text
    parts = []
    for key, value in details.items():
        if isinstance(value, str) and len(value) > 40:  # keys, digests: their start is enough
            parts.append(f"{key}={value[:16]}…")
        elif isinstance(value, str | int | float | bool) or value is None:
            parts.append(f"{key}={value}")
        elif isinstance(value, dict | list):
            parts.append(f"{key}=[{len(value)}]")
    text = ", ".join(parts)
    return text if len(text) <= 160 else text[:157] + "..."


def activity(
    session: Session,
    filters: ReportFilters,
    *,
    tree_size: int | None = None,
    limit: int | None = None,
) -> tuple[list[ActivityRow], int, dict[str, int], dict[str, int], list[int]]:
    """Audit entries matching ``filters`` (below ``tree_size``), newest first.

    Returns ``(rows, total, by_action, by_actor, corrupt_indices)``; ``rows`` holds at
    most ``limit`` entries while the counts cover every match.
    """
    studies = selected_studies(session, filters)
    rows: list[ActivityRow] = []
    by_action: dict[str, int] = defaultdict(int)
    by_actor: dict[str, int] = defaultdict(int)
    corrupt: list[int] = []
    total = 0
    for index, entry in _leaves(session, tree_size=tree_size, filters=filters):
        if entry is None:
            corrupt.append(index)
            continue
        if studies is not None:
            about_study = _study_of(entry) in studies
            about_dataset = filters.dataset_id is not None and _mentions_dataset(
                entry, filters.dataset_id
            )
            if not (about_study or (filters.study_id is None and about_dataset)):
                continue
        total += 1
        by_action[entry.action] += 1
        by_actor[entry.actor.subject] += 1
        rows.append(
            ActivityRow(
                index=index,
                at=entry.at,
                actor=entry.actor.subject,
                organisation=entry.actor.organisation,
                roles=list(entry.actor.roles),
                action=entry.action,
                object_type=entry.object.type,
                object_id=entry.object.id,
                outcome=entry.outcome.value,
                purpose=entry.purpose,
                policy_decision=entry.policy.decision.value if entry.policy else None,
                contract_hash=entry.contract_hash,
                summary=_summary(entry),
            )
        )
    rows.reverse()
    if limit is not None:
        rows = rows[:limit]
    return (
        rows,
        total,
        dict(sorted(by_action.items(), key=lambda kv: (-kv[1], kv[0]))),
        dict(sorted(by_actor.items(), key=lambda kv: (-kv[1], kv[0]))),
        corrupt,
    )
