"""ORM models of studies, their per-site approvals and their lifecycle history."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Enum, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from consortium_server.db.base import Base, JSONType, UTCDateTime, str_enum, utcnow

__all__ = [
    "ApprovalDecision",
    "Study",
    "StudyApproval",
    "StudyEvent",
    "StudySite",
    "StudyState",
]


class StudyState(StrEnum):
    """Lifecycle states (see docs/architecture.md and DESIGN.md)."""

    SUBMITTED = "submitted"
    REJECTED = "rejected"
    AWAITING_APPROVALS = "awaiting_approvals"
    APPROVED = "approved"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    RELEASED = "released"


class ApprovalDecision(StrEnum):
    """A data steward's decision for their site."""

    APPROVED = "approved"
    DECLINED = "declined"


def _state_enum() -> Enum:
    return str_enum(StudyState, 32)


def _new_id() -> str:
    return str(uuid.uuid4())


class Study(Base):
    """A submitted study contract and where it is in its lifecycle."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    title: Mapped[str] = mapped_column(String(200))
    owner_subject: Mapped[str] = mapped_column(String(255), index=True)
    owner_organisation: Mapped[str | None] = mapped_column(String(200), nullable=True)
    contract: Mapped[dict[str, Any]] = mapped_column(JSONType)
    contract_hash: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[StudyState] = mapped_column(_state_enum(), default=StudyState.SUBMITTED)
    state_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    approval_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    #: The submitter's ``Idempotency-Key`` and the SHA-256 of the draft it came with: the
    #: same key again returns this study, with another draft it is refused.
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    idempotency_draft_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (UniqueConstraint("owner_subject", "idempotency_key"),)

    sites: Mapped[list[StudySite]] = relationship(
        back_populates="study", order_by="StudySite.site_id", lazy="selectin"
    )
    approvals: Mapped[list[StudyApproval]] = relationship(
        back_populates="study", order_by="StudyApproval.decided_at", lazy="selectin"
    )
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", order_by="StudyEvent.id", lazy="selectin"
    )


class StudySite(Base):
    """A site whose datasets a study uses: its data steward must approve."""

    __tablename__ = "study_sites"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True, index=True)

    study: Mapped[Study] = relationship(back_populates="sites")


class StudyApproval(Base):
    """One site's decision on one exact contract hash, with who, when and why."""

    __tablename__ = "study_approvals"
    __table_args__ = (UniqueConstraint("study_id", "site_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    decision: Mapped[ApprovalDecision] = mapped_column(str_enum(ApprovalDecision, 16))
    contract_hash: Mapped[str] = mapped_column(String(64))
    decided_by: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: The decision time the site signed, verbatim, and its Ed25519 signature (base64).
    signed_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    signature: Mapped[str | None] = mapped_column(String(200), nullable=True)

    study: Mapped[Study] = relationship(back_populates="approvals")


class StudyEvent(Base):
    """A lifecycle transition (from, to, who, when, why). Insert-only."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    from_state: Mapped[StudyState | None] = mapped_column(_state_enum(), nullable=True)
    to_state: Mapped[StudyState] = mapped_column(_state_enum())
    actor_subject: Mapped[str] = mapped_column(String(255))
    actor_organisation: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="events")
