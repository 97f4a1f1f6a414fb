"""/api/v1/sites: enrolment (consortium admin) and the public directory of sites."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from concord_protocol.principals import Role
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.federation.supernodes import SuperLinkRefusedError, SuperNodeRegistry
from consortium_server.sites import service
from consortium_server.sites.schemas import SiteEnrol, SitePublic, SiteRevoke

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


@router.post("/{site_id}/revoke", dependencies=[ADMIN])
def revoke_site(
    site_id: str, body: SiteRevoke, request: Request, session: SessionDep, audit: AuditDep
) -> SitePublic:
    """Revoke a site: it can no longer publish, approve or train (consortium admin).

    Its SuperNode is unregistered from the SuperLink too. The revocation stands even if
    the SuperLink cannot be reached; the audit entry then says the node is still registered
    (``supernode_unregistered: false``), for the operator to remove by hand.
    """
    site = service.revoke_site(session, site_id, reason=body.reason)
    details: dict[str, object] = {"reason": body.reason}
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
    return SitePublic.model_validate(site)
