"""Typed FastAPI dependencies: database session, current principal, role requirements.

Routes declare what they need::

    @router.get("/things", dependencies=[require_roles(Role.RESEARCHER)])
    def list_things(session: SessionDep, principal: CurrentPrincipal) -> ...

The session commits when the request succeeds and rolls back when it raises: services
only flush.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.entries import Actor, Outcome
from concord_protocol.principals import Principal, Role
from consortium_server.audit.recorder import AuditRecorder
from consortium_server.errors import AuthenticationError, ForbiddenError
from consortium_server.identity.refusals import RefusedSignIns, Summary
from consortium_server.logs import request_id_var
from consortium_server.settings import ServerSettings

__all__ = [
    "ANY_MEMBER",
    "AuditDep",
    "CurrentPrincipal",
    "SessionDep",
    "SettingsDep",
    "get_session",
    "require_roles",
]


class _Verifier(Protocol):
    def verify(self, token: str) -> Principal: ...


def get_settings(request: Request) -> ServerSettings:
    """The settings the app was built with."""
    settings: ServerSettings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request: committed on success, rolled back on error.

    Used with ``scope="function"``: the commit runs when the route returns, *before* the
    response is sent, so a commit that fails becomes an error response (503 when the
    database is down) and no client is ever told "created" about a write that was lost.
    """
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def current_principal(request: Request) -> Principal:
    """Verify the bearer token of the request and return who is calling.

    A presented token that fails verification is recorded in the audit log as a refused
    sign-in (a request with no token at all is not). Verified once per request: a route
    whose caller was authenticated before its body was read
    (:class:`~consortium_server.api.middleware.LargerLimit`) reuses that principal.
    """
    known: Principal | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError(
            "Send `Authorization: Bearer <token>`.", code="auth.missing_token"
        )
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "Use the Bearer authorization scheme.", code="auth.invalid_token"
            )
        verifier: _Verifier = request.app.state.verifier
        principal = verifier.verify(token.strip())
    except AuthenticationError as exc:
        _record_refused_sign_in(request, exc)
        raise
    if principal.has(Role.SITE_NODE):
        _refuse_revoked_site(request, principal)
    request.state.principal = principal
    return principal


def _refuse_revoked_site(request: Request, principal: Principal) -> None:
    """A revoked site's node credentials reach nothing, reads included: revocation is the
    end of the site's part in the consortium, not of its write access alone."""
    from consortium_server.sites.models import Site, SiteStatus

    if not principal.organisation:
        return
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as session:
        statuses = session.scalars(
            select(Site.status).where(Site.organisation == principal.organisation)
        ).all()
    if statuses and all(s is SiteStatus.REVOKED for s in statuses):
        raise ForbiddenError(
            f"The site of {principal.organisation!r} has been revoked.", code="auth.site_revoked"
        )


def refused_sign_ins(app: Any) -> RefusedSignIns:
    """The app's aggregation of refused sign-ins (made on first use, from its settings)."""
    aggregator: RefusedSignIns | None = getattr(app.state, "refused_sign_ins", None)
    if aggregator is None:
        identity = app.state.settings.identity
        aggregator = RefusedSignIns(
            window_s=identity.refused_sign_in_window_s,
            max_entries=identity.refused_sign_in_entries,
            max_sources=identity.refused_sign_in_sources,
        )
        app.state.refused_sign_ins = aggregator
    return aggregator


def record_refusal_summary(app: Any, summary: Summary) -> None:
    """Write one ``auth.sign_ins_refused`` entry: the refusals a window only counted."""
    factory: sessionmaker[Session] = app.state.sessionmaker
    with factory() as session:
        AuditRecorder(app.state.audit_log, session, principal=None).record(
            "auth.sign_ins_refused",
            object_type="endpoint",
            object_id="*",
            outcome=Outcome.DENIED,
            details=summary.details(),
            actor=Actor(subject="anonymous"),
        )
        session.commit()


def _record_refused_sign_in(request: Request, error: AuthenticationError) -> None:
    """Audit a refused sign-in, in bounded numbers (:mod:`consortium_server.identity.refusals`):
    the first of each source and code per window as its own entry, the rest counted."""
    client = request.client.host if request.client else "unknown"
    decision, summary = refused_sign_ins(request.app).refuse(client, error.code)
    if summary is not None:
        record_refusal_summary(request.app, summary)
    if not decision.write:
        return
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as session:
        AuditRecorder(
            request.app.state.audit_log,
            session,
            principal=None,
            request_id=request_id_var.get(),
        ).record(
            "auth.sign_in_refused",
            object_type="endpoint",
            object_id=f"{request.method} {request.url.path}"[:200],
            outcome=Outcome.DENIED,
            details={
                "code": error.code,
                "reason": error.public_message()[:300],
                "client": client,
                "count": 1,
            },
            actor=Actor(subject="anonymous"),
        )
        session.commit()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_roles(*roles: Role) -> Any:
    """A dependency that admits callers holding any of ``roles`` (403 otherwise)."""
    if not roles:
        raise ValueError("require_roles() with no roles would admit nobody; name at least one")
    allowed = ", ".join(sorted(role.value for role in roles))

    def _check(principal: CurrentPrincipal) -> Principal:
        if not principal.has(*roles):
            raise ForbiddenError(f"This action needs one of the roles: {allowed}.")
        return principal

    check: Callable[..., Principal] = _check
    return Depends(check)


#: Any consortium role at all (a token without a Concord role sees nothing).
ANY_MEMBER = require_roles(*Role)


def get_audit(request: Request, session: SessionDep) -> AuditRecorder:
    """An audit recorder in the request's unit of work, acting as the request's principal."""
    return AuditRecorder(
        request.app.state.audit_log,
        session,
        principal=getattr(request.state, "principal", None),
        request_id=request_id_var.get(),
    )


AuditDep = Annotated[AuditRecorder, Depends(get_audit)]
