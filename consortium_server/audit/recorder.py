"""Recording what happens, from the HTTP edge and from services, into the audit log.

A recorder is bound to one unit of work (the request's session) and to who is acting; its
entries are committed with the change they describe, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from concord_protocol.audit.entries import (
    Actor,
    AuditEntry,
    AuditObject,
    Outcome,
    PolicyDecision,
    PolicyRef,
)
from concord_protocol.principals import Principal
from consortium_server.audit.log import AppendedEntry, AuditLog
from consortium_server.studies.lifecycle import SERVER_SUBJECT
from consortium_server.studies.models import Study, StudyEvent

__all__ = ["SERVER_ACTOR", "AuditRecorder"]

#: The server acting on its own (expiry, a failed round).
SERVER_ACTOR = Actor(subject=SERVER_SUBJECT)


@dataclass
class AuditRecorder:
    """Appends audit entries in ``session`` on behalf of ``principal``."""

    log: AuditLog
    session: Session
    principal: Principal | None
    request_id: str | None = None
    source: str = "consortium-server/api"

    def actor(self) -> Actor:
        """The acting identity (the server itself when there is no principal)."""
        return Actor.from_principal(self.principal) if self.principal else SERVER_ACTOR

    def record(
        self,
        action: str,
        *,
        object_type: str,
        object_id: str,
        outcome: Outcome = Outcome.SUCCESS,
        purpose: str | None = None,
        contract_hash: str | None = None,
        policy_set_hash: str | None = None,
        policy_allowed: bool | None = None,
        details: dict[str, Any] | None = None,
        actor: Actor | None = None,
    ) -> AppendedEntry:
        """Append one entry; returns its index and leaf hash."""
        policy = None
        if policy_set_hash is not None and policy_allowed is not None:
            policy = PolicyRef(
                set_hash=policy_set_hash,
                decision=PolicyDecision.ALLOW if policy_allowed else PolicyDecision.DENY,
            )
        entry = AuditEntry(
            actor=actor or self.actor(),
            action=action,
            object=AuditObject(type=object_type, id=object_id),
            outcome=outcome,
            purpose=purpose,
            policy=policy,
            contract_hash=contract_hash,
            request_id=self.request_id,
            source=self.source,
            details=details or {},
        )
        return self.log.append(entry, session=self.session)

    def study_events(self, study: Study, events: list[StudyEvent]) -> None:
        """One entry per lifecycle transition of ``study`` (``study.<new state>``)."""
        purpose = str(study.contract.get("purpose")) if study.contract else None
        for event in events:
            if event.actor_subject == SERVER_ACTOR.subject:
                actor = SERVER_ACTOR
            else:
                same = self.principal is not None and event.actor_subject == self.principal.subject
                actor = Actor(
                    subject=event.actor_subject,
                    organisation=event.actor_organisation,
                    roles=self.actor().roles if same else (),
                )
            outcome = Outcome.DENIED if event.to_state.value == "rejected" else Outcome.SUCCESS
            self.record(
                f"study.{event.to_state.value}",
                object_type="study",
                object_id=study.id,
                outcome=outcome,
                purpose=purpose,
                contract_hash=study.contract_hash,
                details={
                    "from": event.from_state.value if event.from_state else None,
                    "to": event.to_state.value,
                    "reason": event.reason,
                },
                actor=actor,
            )
