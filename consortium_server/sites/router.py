"""/api/v1/sites: enrolment (consortium admin) and the public directory of sites."""

from __future__ import annotations

from fastapi import APIRouter, status

from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.identity.principal import Role
from consortium_server.sites import service
from consortium_server.sites.schemas import SiteEnrol, SitePublic, SiteRevoke

router = APIRouter(prefix="/api/v1/sites", tags=["sites"])
ADMIN = require_roles(Role.CONSORTIUM_ADMIN)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def enrol_site(
    body: SiteEnrol, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> SitePublic:
    """Enrol a hospital with its public keys (consortium admin)."""
    site = service.enrol_site(session, body, actor=principal)
    audit.record(
        "site.enrolled",
        object_type="site",
        object_id=site.id,
        details={
            "organisation": site.organisation,
            "signing_public_key": site.signing_public_key,
            "exchange_public_key": site.exchange_public_key,
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
def revoke_site(site_id: str, body: SiteRevoke, session: SessionDep, audit: AuditDep) -> SitePublic:
    """Revoke a site: it can no longer publish, approve or train (consortium admin)."""
    site = service.revoke_site(session, site_id, reason=body.reason)
    audit.record(
        "site.revoked", object_type="site", object_id=site.id, details={"reason": body.reason}
    )
    return SitePublic.model_validate(site)
