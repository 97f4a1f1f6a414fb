"""/api/v1/sites: enrolment (consortium admin) and the public directory of sites."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from concord_protocol.principals import Role
from concord_protocol.site_keys import KeyRotation
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.federation.supernodes import SuperLinkRefusedError, SuperNodeRegistry
from consortium_server.sites import service
from consortium_server.sites.schemas import KeyRotationPublic, SiteEnrol, SitePublic, SiteRevoke
from consortium_server.studies import service as studies

router = APIRouter(prefix="/api/v1/sites", tags=["sites"])
ADMIN = require_roles(Role.CONSORTIUM_ADMIN)


def _registry(request: Request) -> SuperNodeRegistry | None:
    return getattr(request.app.state, "supernode_registry", None)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def enrol_site(
    body: SiteEnrol,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> SitePublic:
    """Enrol a hospital with its public keys (consortium admin).

    With a SuperLink configured, the site's SuperNode key is registered with it as part of
    the enrolment (the response carries ``supernode_node_id``); if the SuperLink does not
    accept it, nothing is enrolled (502 ``federation.superlink_error``).
    """
    site = service.enrol_site(session, body, actor=principal)
    registry = _registry(request)
    if registry is not None:
        site.supernode_node_id = registry.register(site.supernode_public_key, name=site.id)
    audit.record(
        "site.enrolled",
        object_type="site",
        object_id=site.id,
        details={
            "organisation": site.organisation,
            "signing_public_key": site.signing_public_key,
            "exchange_public_key": site.exchange_public_key,
            "supernode_node_id": site.supernode_node_id,
        },
    )
    return SitePublic.model_validate(site)


@router.get("", dependencies=[ANY_MEMBER])
def list_sites(session: SessionDep, _: CurrentPrincipal) -> list[SitePublic]:
    """Every enrolled site with its public keys (any consortium member)."""
    return [SitePublic.model_validate(s) for s in service.list_sites(session)]


@router.get("/{site_id}", dependencies=[ANY_MEMBER])
def get_site(site_id: str, session: SessionDep, _: CurrentPrincipal) -> SitePublic:
    """One site (any consortium member)."""
    return SitePublic.model_validate(service.get_site(session, site_id))


@router.post(
    "/{site_id}/keys",
    dependencies=[require_roles(Role.SITE_NODE, Role.DATA_STEWARD)],
)
def rotate_keys(
    site_id: str,
    body: KeyRotation,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> SitePublic:
    """Replace your site's signing and exchange keys (``site-node keys rotate``).

    The body is the rotation the site signed with its current key and with the new one;
    peers accept the new keys only by following that signature from the keys they pinned.
    The audit entry carries the whole statement, so the log holds every site's key history.
    """
    record = service.rotate_site_keys(session, site_id, body, actor=principal)
    audit.record(
        "site.keys_rotated",
        object_type="site",
        object_id=site_id,
        details={
            "seq": record.seq,
            "previous_fingerprint": record.previous_fingerprint,
            "fingerprint": record.fingerprint,
            "rotation": body.model_dump(mode="json"),
        },
    )
    return SitePublic.model_validate(service.get_site(session, site_id))


@router.get("/{site_id}/keys/history", dependencies=[ANY_MEMBER])
def key_history(site_id: str, session: SessionDep, _: CurrentPrincipal) -> list[KeyRotationPublic]:
    """A site's key rotations, oldest first (any member): what peers follow from a pin."""
    service.get_site(session, site_id)
    return [
        KeyRotationPublic(
            seq=r.seq,
            previous_fingerprint=r.previous_fingerprint,
            fingerprint=r.fingerprint,
            rotation=KeyRotation.model_validate_json(r.statement),
            recorded_by=r.recorded_by,
            recorded_at=r.recorded_at,
        )
        for r in service.key_history(session, site_id)
    ]


@router.post("/{site_id}/revoke", dependencies=[ADMIN])
def revoke_site(
    site_id: str,
    body: SiteRevoke,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> SitePublic:
    """Revoke a site: it can no longer publish, approve or train (consortium admin).

    Its SuperNode is unregistered from the SuperLink too. The revocation stands even if
    the SuperLink cannot be reached; the audit entry then says the node is still registered
    (``supernode_unregistered: false``), for the operator to remove by hand.

    Every unfinished study the site belongs to (awaiting approvals, approved or running) is
    aborted, each with a ``study.aborted`` entry naming the revocation (``site.revoked``
    lists them), and the Flower runs of the running ones are stopped. The site's agent
    withdraws their approvals and drops their keys at its next pass.
    """
    site = service.revoke_site(session, site_id, reason=body.reason)
    aborted = studies.abort_studies_of_site(session, site.id, actor=principal, reason=body.reason)
    details: dict[str, object] = {
        "reason": body.reason,
        "aborted_studies": [item.study.id for item in aborted],
    }
    registry = _registry(request)
    if registry is not None and site.supernode_node_id is not None:
        details["supernode_node_id"] = site.supernode_node_id
        try:
            registry.unregister(site.supernode_node_id)
        except SuperLinkRefusedError as exc:
            details["supernode_unregistered"] = False
            details["supernode_error"] = exc.public_message()
        else:
            details["supernode_unregistered"] = True
            site.supernode_node_id = None
    audit.record("site.revoked", object_type="site", object_id=site.id, details=details)
    for item in aborted:
        audit.study_events(item.study, list(item.study.events[item.events_before :]))
    session.commit()  # the ServerApps must find their studies aborted when their runs stop
    manager = getattr(request.app.state, "run_manager", None)
    if manager is not None:
        manager.stop_runs([item.study.id for item in aborted if item.was_running])
    return SitePublic.model_validate(site)
