"""HTTP routes of the study key relay (``/api/v1/studies/{id}/keys``), for site nodes only."""

from __future__ import annotations

from fastapi import APIRouter, status

from consortium_server.api.deps import CurrentPrincipal, SessionDep, require_roles
from consortium_server.federation.keys import (
    MySealedKey,
    StudyKeysCreate,
    StudyKeysPublic,
    my_sealed_key,
    upload_study_keys,
)
from consortium_server.identity.principal import Role

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/studies", tags=["federation"])


@router.post(
    "/{study_id}/keys",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.SITE_NODE)],
)
def post_study_keys(
    study_id: str, body: StudyKeysCreate, session: SessionDep, principal: CurrentPrincipal
) -> StudyKeysPublic:
    """Relay a study key: the public context and one sealed key per other approved site.

    Only the ``site_node`` identity of an approved site of an approved or running study;
    the first upload wins (``keys.exists`` afterwards).
    """
    return upload_study_keys(session, study_id=study_id, principal=principal, body=body)


@router.get("/{study_id}/keys/mine", dependencies=[require_roles(Role.SITE_NODE)])
def get_my_study_key(
    study_id: str, session: SessionDep, principal: CurrentPrincipal
) -> MySealedKey:
    """The study key sealed to the caller's site, the sender, and the public context."""
    return my_sealed_key(session, study_id=study_id, principal=principal)
