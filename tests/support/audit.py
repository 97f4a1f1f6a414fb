"""Audit entries for tests: realistic, and distinct for each number."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from concord_protocol.audit.entries import (
    Actor,
    AuditEntry,
    AuditObject,
    Outcome,
    PolicyDecision,
    PolicyRef,
)

BASE_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_entry(n: int, *, action: str = "study.approved", subject: str = "alice") -> AuditEntry:
    """A realistic entry, distinct for each ``n``."""
    return AuditEntry(
        actor=Actor(subject=subject, organisation="hospital-a", roles=("data_steward",)),
        action=action,
        object=AuditObject(type="study", id=f"study-{n}"),
        outcome=Outcome.SUCCESS,
        purpose="diagnostic_research",
        policy=PolicyRef(set_hash="a" * 64, decision=PolicyDecision.ALLOW),
        contract_hash="b" * 64,
        at=BASE_TIME + timedelta(seconds=n),
        request_id=f"req-{n}",
        source="consortium-server/api",
        details={"n": n},
    )
