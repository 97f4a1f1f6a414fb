"""/api/v1/studies: submit (researcher), decide per site (data steward), follow, abort."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, status

from consortium_server.api.deps import (
    ANY_MEMBER,
    CurrentPrincipal,
    SessionDep,
    SettingsDep,
    require_roles,
)
from consortium_server.identity.principal import Role
from consortium_server.studies import service
from consortium_server.studies.contract import StudyContract
from consortium_server.studies.models import StudyState
from consortium_server.studies.schemas import (
    ApprovalCreate,
    StudyAbort,
    StudyPublic,
    StudySummary,
)

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.RESEARCHER)],
)
def submit_study(
    body: StudyContract,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
) -> StudyPublic:
    """Submit a study contract. A policy denial is returned as a `rejected` study with reasons."""
    study = service.submit_study(
        session,
        body,
        actor=principal,
        approval_window=timedelta(days=settings.studies.approval_window_days),
        gate=getattr(request.app.state, "submission_gate", None),
    )
    return service.to_public(study)


@router.get("", dependencies=[ANY_MEMBER])
def list_studies(
    session: SessionDep, principal: CurrentPrincipal, state: StudyState | None = None
) -> list[StudySummary]:
    """Studies you may see: your own (researcher), your site's (steward, site node), or all."""
    return [
        StudySummary.model_validate(s)
        for s in service.list_visible_studies(session, principal, state=state)
    ]


@router.get("/{study_id}", dependencies=[ANY_MEMBER])
def get_study(study_id: str, session: SessionDep, principal: CurrentPrincipal) -> StudyPublic:
    """A study with its contract, its contract hash, each site's decision and its history."""
    return service.to_public(service.get_visible_study(session, study_id, principal))


@router.post(
    "/{study_id}/approvals",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.DATA_STEWARD)],
)
def decide(
    study_id: str, body: ApprovalCreate, session: SessionDep, principal: CurrentPrincipal
) -> StudyPublic:
    """Approve or decline the study for your site, naming the contract hash you reviewed."""
    return service.to_public(service.decide(session, study_id, body, actor=principal))


@router.post(
    "/{study_id}/abort",
    dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)],
)
def abort_study(
    study_id: str, body: StudyAbort, session: SessionDep, principal: CurrentPrincipal
) -> StudyPublic:
    """Stop a study (its owner or a consortium admin)."""
    study = service.abort_study(session, study_id, actor=principal, reason=body.reason)
    return service.to_public(study)
