"""Request and response bodies of the studies API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from consortium_server.schemas import Sha256Hex, Slug, StrictModel
from consortium_server.studies.models import ApprovalDecision, StudyState

__all__ = [
    "ApprovalCreate",
    "ApprovalPublic",
    "StudyAbort",
    "StudyEventPublic",
    "StudyPublic",
    "StudySitePublic",
    "StudySummary",
]


class ApprovalCreate(StrictModel):
    """A site's signed decision on one exact contract hash (``site-node study approve``).

    The fields are the :class:`~concord_protocol.site_decisions.SiteDecision` the site
    signed (the study id is the path's), verbatim: the server checks ``signature`` with
    the key the study's roster names for the site before recording anything.
    """

    site_id: Slug
    contract_hash: Sha256Hex = Field(description="The hash you reviewed (GET the study first).")
    decision: ApprovalDecision
    reason: Annotated[str, StringConstraints(max_length=2000)] = ""
    decided_at: Annotated[str, StringConstraints(min_length=1, max_length=40)] = Field(
        description="When the steward decided, as the site signed it (ISO 8601, UTC)."
    )
    signature: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="The site's Ed25519 signature over the decision (base64)."
    )


class StudyAbort(StrictModel):
    """Why a study is being stopped."""

    reason: Annotated[str, StringConstraints(min_length=3, max_length=2000)]


class ApprovalPublic(BaseModel):
    """A recorded decision."""

    model_config = ConfigDict(from_attributes=True)

    site_id: str
    decision: ApprovalDecision
    contract_hash: str
    decided_by: str
    reason: str
    decided_at: datetime


class StudySitePublic(BaseModel):
    """A site the study needs, and its decision so far."""

    site_id: str
    decision: ApprovalDecision | None = None
    contract_hash: str | None = Field(
        default=None, description="The exact contract hash this site decided on."
    )
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    signed_at: str | None = Field(
        default=None, description="The decision time the site signed (with `signature`)."
    )
    signature: str | None = Field(
        default=None,
        description="The site's Ed25519 signature (base64) over the SiteDecision of "
        "(study id, contract_hash, site_id, decision, reason, signed_at).",
    )


class StudyEventPublic(BaseModel):
    """A lifecycle transition."""

    model_config = ConfigDict(from_attributes=True)

    from_state: StudyState | None
    to_state: StudyState
    actor_subject: str
    actor_organisation: str | None
    reason: str
    at: datetime


class StudySummary(BaseModel):
    """A study in a list."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    title: str
    state: StudyState
    owner_subject: str
    contract_hash: str
    created_at: datetime
    updated_at: datetime


class StudyPublic(StudySummary):
    """A study with its contract, approvals and history."""

    owner_organisation: str | None
    state_reason: str | None
    contract: dict[str, Any]
    approval_deadline: datetime
    current_round: int
    sites: list[StudySitePublic]
    events: list[StudyEventPublic]
