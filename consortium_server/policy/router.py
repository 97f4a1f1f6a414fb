"""/api/v1/policy: dry-run a study against the policies; read, publish and roll back the
consortium's policy set (operator actions, versioned and audited)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, status
from pydantic import BaseModel, Field, StringConstraints

from concord_protocol.contract import StudyDraft
from concord_protocol.principals import Role
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.errors import NotFoundError
from consortium_server.policy import service
from consortium_server.policy.checks import PolicyContext, dry_run
from consortium_server.policy.models import PolicyVersion
from consortium_server.schemas import StrictModel

router = APIRouter(prefix="/api/v1/policy", tags=["policy"])
ADMIN = require_roles(Role.CONSORTIUM_ADMIN)


class ReasonPublic(BaseModel):
    """One reason of a decision: the policy's id and its sentence."""

    policy_id: str
    text: str
    resource: str | None = None


class DecisionPublic(BaseModel):
    """A policy decision, with every reason and the policy set that made it."""

    allowed: bool
    reasons: list[ReasonPublic]
    errors: list[str]
    policy_set_hash: str


class PolicyVersionPublic(BaseModel):
    """A published version of the consortium policy set."""

    version: int
    policy_set_hash: str
    active: bool
    published_by: str
    published_at: datetime
    note: str
    files: dict[str, str] | None = None


class PolicyPublish(StrictModel):
    """A new consortium policy set: every file, and optionally a new schema."""

    files: dict[
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*\.cedar$")],
        Annotated[str, StringConstraints(max_length=100_000)],
    ] = Field(min_length=1)
    schema_text: Annotated[str, StringConstraints(max_length=100_000)] | None = Field(
        default=None, alias="schema"
    )
    note: Annotated[str, StringConstraints(max_length=2000)] = ""


class PolicyChangePublic(BaseModel):
    """What a publish or activation changed."""

    version: PolicyVersionPublic
    changed: bool
    details: dict[str, Any]


def _version(row: PolicyVersion, *, with_files: bool = False) -> PolicyVersionPublic:
    return PolicyVersionPublic(
        version=row.version,
        policy_set_hash=row.policy_set_hash,
        active=row.active,
        published_by=row.published_by,
        published_at=row.published_at,
        note=row.note,
        files=dict(row.policies) if with_files else None,
    )


@router.post("/check", dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)])
def check(
    body: StudyDraft, request: Request, session: SessionDep, principal: CurrentPrincipal
) -> DecisionPublic:
    """Dry-run: the decision a submission of this contract would get now. Nothing is stored."""
    context: PolicyContext = request.app.state.policy_context
    decision = dry_run(session, context, body, principal)
    return DecisionPublic(
        allowed=decision.allowed,
        reasons=[
            ReasonPublic(policy_id=r.policy_id, text=r.text, resource=r.resource)
            for r in decision.reasons
        ],
        errors=list(decision.errors),
        policy_set_hash=decision.policy_set_hash,
    )


@router.get("", dependencies=[ANY_MEMBER])
def active(session: SessionDep) -> PolicyVersionPublic:
    """The active policy set, with its files."""
    row = service.active_version(session)
    if row is None:
        raise NotFoundError("No policy set is published yet.", code="policy.not_published")
    return _version(row, with_files=True)


@router.get("/versions", dependencies=[ANY_MEMBER])
def versions(session: SessionDep) -> list[PolicyVersionPublic]:
    """Every published version, newest first."""
    return [_version(v) for v in service.list_versions(session)]


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def publish(
    body: PolicyPublish, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> PolicyChangePublic:
    """Publish a new policy set (consortium admin). It is validated against the schema
    first: an invalid set is refused with the file, line and reason."""
    change = service.publish_policy_set(
        session, body.files, principal.subject, schema=body.schema_text, note=body.note
    )
    audit.record(
        "policy.published",
        object_type="policy_set",
        object_id=str(change.version.version),
        policy_set_hash=change.version.policy_set_hash,
        policy_allowed=True,
        details=change.audit_details(),
    )
    return PolicyChangePublic(
        version=_version(change.version), changed=change.changed, details=change.audit_details()
    )


@router.post("/versions/{version}/activate", dependencies=[ADMIN])
def activate(
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> PolicyChangePublic:
    """Make an earlier version active again (roll back), audited."""
    change = service.activate_version(session, version, principal.subject)
    audit.record(
        "policy.activated",
        object_type="policy_set",
        object_id=str(version),
        policy_set_hash=change.version.policy_set_hash,
        policy_allowed=True,
        details=change.audit_details(),
    )
    return PolicyChangePublic(
        version=_version(change.version), changed=change.changed, details=change.audit_details()
    )
