"""/api/v1/me, and the local issuer's discovery and key endpoints (Keycloak-shaped paths)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from consortium_server.api.deps import CurrentPrincipal
from consortium_server.errors import NotFoundError
from consortium_server.identity.local_issuer import LocalIssuer

__all__ = ["MePublic", "router"]

router = APIRouter(tags=["identity"])


class MePublic(BaseModel):
    """Who the server thinks you are."""

    subject: str
    roles: list[str]
    organisation: str | None
    issuer: str
    client_id: str | None


@router.get("/api/v1/me")
def me(principal: CurrentPrincipal) -> MePublic:
    """The identity your token carries: check roles and organisation before anything else."""
    return MePublic(
        subject=principal.subject,
        roles=sorted(r.value for r in principal.roles),
        organisation=principal.organisation,
        issuer=principal.issuer,
        client_id=principal.client_id,
    )


def _local_issuer(request: Request, realm: str) -> LocalIssuer:
    issuer: LocalIssuer | None = getattr(request.app.state, "local_issuer", None)
    if issuer is None or not issuer.issuer.endswith(f"/realms/{realm}"):
        raise NotFoundError(f"No local realm {realm!r} on this server.", code="resource.not_found")
    return issuer


@router.get("/realms/{realm}/.well-known/openid-configuration", include_in_schema=False)
def openid_configuration(realm: str, request: Request) -> dict[str, Any]:
    """Discovery document of the local issuer (development mode only)."""
    return _local_issuer(request, realm).openid_configuration()


@router.post("/realms/{realm}/protocol/openid-connect/token", include_in_schema=False)
def token(realm: str, request: Request) -> JSONResponse:
    """The local issuer's token endpoint: it grants nothing over HTTP (RFC 6749 5.2)."""
    _local_issuer(request, realm)
    return JSONResponse(
        status_code=400,
        content={
            "error": "unsupported_grant_type",
            "error_description": "The local development issuer grants no tokens over HTTP; "
            "mint one on the server's machine with `consortium token`, or use Keycloak.",
        },
        headers={"Cache-Control": "no-store"},
    )


@router.get("/realms/{realm}/protocol/openid-connect/certs", include_in_schema=False)
def certs(realm: str, request: Request) -> dict[str, Any]:
    """Public signing keys of the local issuer (development mode only)."""
    return _local_issuer(request, realm).jwks()
