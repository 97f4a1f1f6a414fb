"""The study state machine: which transitions exist, in one place.

::

    submitted -> rejected | awaiting_approvals
    awaiting_approvals -> rejected (declined / expired) | approved | aborted
    approved -> running | aborted
    running -> completed | failed | aborted
    completed -> released
"""

from __future__ import annotations

from concord_protocol.principals import Principal
from consortium_server.db.base import utcnow
from consortium_server.errors import ConflictError
from consortium_server.studies.models import Study, StudyEvent, StudyState

__all__ = ["SERVER_SUBJECT", "TERMINAL_STATES", "TRANSITIONS", "transition"]

#: Who the history names when the server itself changes a study (expiry, failures).
SERVER_SUBJECT = "system:consortium-server"

S = StudyState
TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    S.SUBMITTED: frozenset({S.REJECTED, S.AWAITING_APPROVALS}),
    S.AWAITING_APPROVALS: frozenset({S.REJECTED, S.APPROVED, S.ABORTED}),
    S.APPROVED: frozenset({S.RUNNING, S.ABORTED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.ABORTED}),
    S.COMPLETED: frozenset({S.RELEASED}),
    S.REJECTED: frozenset(),
    S.FAILED: frozenset(),
    S.ABORTED: frozenset(),
    S.RELEASED: frozenset(),
}
TERMINAL_STATES = frozenset(state for state, nexts in TRANSITIONS.items() if not nexts)


def transition(
    study: Study, to: StudyState, *, actor: Principal | None, reason: str = ""
) -> StudyEvent:
    """Move ``study`` to ``to``, append the event to its history, and return the event.

    ``actor`` None means the server itself (expiry, a round failing).
    """
    current = study.state
    if to not in TRANSITIONS[current]:
        raise ConflictError(
            f"A study that is {current.value} cannot become {to.value}.",
            code="study.invalid_transition",
        )
    study.state = to
    study.state_reason = reason or None
    study.updated_at = utcnow()
    event = StudyEvent(
        study_id=study.id,
        from_state=current,
        to_state=to,
        actor_subject=actor.subject if actor else SERVER_SUBJECT,
        actor_organisation=actor.organisation if actor else None,
        reason=reason,
        at=utcnow(),
    )
    study.events.append(event)
    return event
