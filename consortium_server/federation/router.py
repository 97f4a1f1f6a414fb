"""HTTP routes of the federation: the study key relay (site nodes only) and starting a run."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from concord_protocol.principals import Role
from consortium_server.api.deps import (
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.errors import (
    ForbiddenError,
    PolicyDeniedError,
    ServiceUnavailableError,
)
from consortium_server.federation.coordinator import begin_run
from consortium_server.federation.key_relay import (
    MySealedKey,
    StudyKeysCreate,
    StudyKeysPublic,
    my_sealed_key,
    upload_study_keys,
)
from consortium_server.federation.runs import RunManager
from consortium_server.studies import service as studies
from consortium_server.studies.schemas import StudyPublic

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/studies", tags=["federation"])


@router.post(
    "/{study_id}/keys",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.SITE_NODE)],
)
def post_study_keys(
    study_id: str,
    body: StudyKeysCreate,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> StudyKeysPublic:
    """Relay a study key: the public context and one sealed key per other approved site.

    Only the ``site_node`` identity of an approved site of an approved or running study;
    the first upload wins (``keys.exists`` afterwards).
    """
    relayed = upload_study_keys(session, study_id=study_id, principal=principal, body=body)
    audit.record(
        "keys.relayed",
        object_type="study",
        object_id=study_id,
        contract_hash=relayed.contract_hash,
        details={
            "sender_site_id": relayed.sender_site_id,
            "recipients": relayed.recipients,
            "key_fingerprint": relayed.key_fingerprint,
            "public_context_sha256": relayed.public_context_sha256,
        },
    )
    return relayed


@router.get("/{study_id}/keys/mine", dependencies=[require_roles(Role.SITE_NODE)])
def get_my_study_key(
    study_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> MySealedKey:
    """The study key sealed to the caller's site, the sender, and the public context."""
    mine = my_sealed_key(session, study_id=study_id, principal=principal)
    audit.record(
        "keys.fetched",
        object_type="study",
        object_id=study_id,
        details={
            "sender_site_id": mine.sender_site_id,
            "key_fingerprint": mine.key_fingerprint,
            "sealed": mine.sealed_key is not None,
        },
    )
    return mine


@router.post(
    "/{study_id}/run",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)],
)
def start_run(
    study_id: str,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
) -> StudyPublic:
    """Start the federated run of an approved study (its owner or a consortium admin).

    The study becomes ``running`` now; the rounds run in the background on the consortium's
    SuperLink, each one reported to and checked by this server before the next one starts.
    Follow them with ``GET /api/v1/studies/{id}`` and the audit log.
    """
    manager: RunManager | None = getattr(request.app.state, "run_manager", None)
    study = studies.get_visible_study(session, study_id, principal)
    if not (studies.principal_owns(principal, study) or principal.has(Role.CONSORTIUM_ADMIN)):
        raise ForbiddenError("Only the study's owner or a consortium admin can start its run.")
    if manager is None:
        raise ServiceUnavailableError(
            "No SuperLink is configured: set CONCORD_FEDERATION__SUPERLINK_ADDRESS."
        )
    try:
        plan = begin_run(
            session,
            study_id,
            log=request.app.state.audit_log,
            actor=principal,
            policy=request.app.state.policy_context,
        )
    except PolicyDeniedError:
        session.commit()  # keep the recorded denial of the first round
        raise
    session.commit()  # the run's ServerApp must find the study running, with its attempt
    manager.start(plan)
    return studies.to_public(study)
