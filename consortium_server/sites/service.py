"""Enrolment and lookup of sites. Services take a session and flush; callers commit."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from concord_protocol.principals import Principal
from concord_protocol.site_keys import KeyRotation, PinnedKeys, SignatureError
from consortium_server.db.base import utcnow
from consortium_server.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.sites.models import Site, SiteKeyRotation, SiteStatus
from consortium_server.sites.schemas import SiteEnrol

__all__ = [
    "enrol_site",
    "get_site",
    "key_history",
    "list_sites",
    "revoke_site",
    "rotate_site_keys",
    "site_of_principal",
]


def enrol_site(session: Session, data: SiteEnrol, *, actor: Principal) -> Site:
    """Enrol a hospital. Its id and organisation must both be new."""
    clash = session.scalars(
        select(Site).where(or_(Site.id == data.id, Site.organisation == data.organisation))
    ).first()
    if clash is not None:
        field = "id" if clash.id == data.id else "organisation"
        raise ConflictError(f"A site with this {field} is already enrolled.", code="site.exists")
    site = Site(**data.model_dump(), enrolled_by=actor.subject, status=SiteStatus.ACTIVE)
    session.add(site)
    session.flush()
    return site


def get_site(session: Session, site_id: str) -> Site:
    """The site with ``site_id`` or ``site.not_found``."""
    site = session.get(Site, site_id)
    if site is None:
        raise NotFoundError(f"No site with id {site_id!r}.", code="site.not_found")
    return site


def list_sites(session: Session) -> list[Site]:
    """Every enrolled site, active and revoked, by id."""
    return list(session.scalars(select(Site).order_by(Site.id)))


def revoke_site(session: Session, site_id: str, *, reason: str) -> Site:
    """Revoke a site: it can no longer publish, approve or take part in rounds."""
    site = get_site(session, site_id)
    if site.status is SiteStatus.REVOKED:
        raise ConflictError(f"Site {site_id!r} is already revoked.", code="site.already_revoked")
    site.status = SiteStatus.REVOKED
    site.revoked_at = utcnow()
    site.revoked_reason = reason
    session.flush()
    return site


def site_of_principal(session: Session, principal: Principal) -> Site | None:
    """The site whose organisation the principal belongs to (None if none)."""
    if not principal.organisation:
        return None
    return session.scalars(select(Site).where(Site.organisation == principal.organisation)).first()


def require_own_active_site(session: Session, principal: Principal, site_id: str) -> Site:
    """The site ``site_id``, provided the principal belongs to it and it is active."""
    site = get_site(session, site_id)
    if principal.organisation != site.organisation:
        raise ForbiddenError(f"You do not act for site {site_id!r}.")
    if site.status is SiteStatus.REVOKED:
        raise ForbiddenError(f"Site {site_id!r} has been revoked.", code="auth.site_revoked")
    return site


def rotate_site_keys(
    session: Session, site_id: str, rotation: KeyRotation, *, actor: Principal
) -> SiteKeyRotation:
    """Replace an active site's signing and exchange keys with those of a signed rotation.

    The rotation must chain from the keys the site holds now and be signed by both the old
    and the new key (:meth:`KeyRotation.verify`); the server cannot make one, only relay it.
    Raises ``keys.rotation_invalid`` (409, another site's or from other keys) or
    ``signature.invalid`` (422).
    """
    site = require_own_active_site(session, actor, site_id)
    current = PinnedKeys(site.id, site.signing_public_key, site.exchange_public_key)
    if rotation.site_id != site.id:
        raise ConflictError(
            f"The rotation is for site {rotation.site_id!r}, not {site.id!r}.",
            code="keys.rotation_invalid",
        )
    try:
        new = rotation.verify(current)
    except SignatureError as exc:
        if exc.code == "keys.rotation_invalid":
            raise ConflictError(exc.message, code=exc.code) from None
        raise InvalidRequestError(exc.message, code="signature.invalid") from None
    if new.fingerprint == current.fingerprint:
        raise ConflictError("The rotation keeps the same keys.", code="keys.rotation_invalid")
    seq = len(key_history(session, site.id)) + 1
    record = SiteKeyRotation(
        site_id=site.id,
        seq=seq,
        previous_fingerprint=current.fingerprint,
        fingerprint=new.fingerprint,
        statement=rotation.model_dump_json(),
        recorded_by=actor.subject,
        recorded_at=utcnow(),
    )
    site.signing_public_key = new.signing_public_key
    site.exchange_public_key = new.exchange_public_key
    session.add(record)
    session.flush()
    return record


def key_history(session: Session, site_id: str) -> list[SiteKeyRotation]:
    """A site's key rotations, oldest first."""
    return list(
        session.scalars(
            select(SiteKeyRotation)
            .where(SiteKeyRotation.site_id == site_id)
            .order_by(SiteKeyRotation.seq)
        )
    )
