"""Cosignatures on the server: check a site's cosignature with its registered key, store it,
and say whether a head is witnessed.

The cosigned message and its verification are shared (:mod:`concord_protocol.audit.cosignatures`);
the site's rules for what it cosigns are in :mod:`site_node.agent.cosigner`.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import Cosignature, verify_cosignature
from concord_protocol.audit.heads import SignedTreeHead, decode_public_key
from consortium_server.audit.models import AuditCosignature, AuditTreeHead
from consortium_server.errors import ConflictError, NotFoundError

__all__ = ["cosignatures_for", "is_witnessed", "record_cosignature"]


def _to_model(row: AuditCosignature) -> Cosignature:
    return Cosignature(
        site_id=row.site_id,
        tree_size=row.tree_size,
        root_hash=row.root_hash,
        timestamp=row.timestamp,
        signature=row.signature,
    )


def record_cosignature(
    session: Session, cosignature: Cosignature, *, site_public_key: str
) -> Cosignature:
    """Verify a site's cosignature with its registered key (base64 raw) and store it.

    The head (size and root) must be one the server signed (``audit.head_not_found``).
    Recording the same cosigned head twice is idempotent; a second, different root for
    the same site and size is refused (``audit.cosignature_conflict``). Flushes.
    """
    head_exists = session.scalar(
        select(func.count())
        .select_from(AuditTreeHead)
        .where(
            AuditTreeHead.tree_size == cosignature.tree_size,
            AuditTreeHead.root_hash == cosignature.root_hash,
        )
    )
    if not head_exists:
        raise NotFoundError(
            f"No signed tree head of size {cosignature.tree_size} with that root.",
            code="audit.head_not_found",
        )
    verify_cosignature(cosignature, decode_public_key(site_public_key))
    existing = session.scalars(
        select(AuditCosignature).where(
            AuditCosignature.site_id == cosignature.site_id,
            AuditCosignature.tree_size == cosignature.tree_size,
        )
    ).first()
    if existing is not None:
        if existing.root_hash != cosignature.root_hash:
            raise ConflictError(
                "This site already cosigned another root.", code="audit.cosignature_conflict"
            )
        return _to_model(existing)
    row = AuditCosignature(
        site_id=cosignature.site_id,
        tree_size=cosignature.tree_size,
        root_hash=cosignature.root_hash,
        timestamp=cosignature.timestamp,
        signature=cosignature.signature,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:  # a concurrent request stored it first
        raise ConflictError(
            "This site's cosignature for this size was just stored.",
            code="audit.cosignature_conflict",
        ) from exc
    return cosignature


def cosignatures_for(head: SignedTreeHead, *, session: Session) -> list[Cosignature]:
    """Stored cosignatures of exactly this head (size and root), by site id."""
    rows = session.scalars(
        select(AuditCosignature)
        .where(
            AuditCosignature.tree_size == head.tree_size,
            AuditCosignature.root_hash == head.root_hash,
        )
        .order_by(AuditCosignature.site_id)
    ).all()
    return [_to_model(row) for row in rows]


def is_witnessed(head: SignedTreeHead, quorum: int, *, session: Session) -> bool:
    """True if at least ``quorum`` distinct sites cosigned this head's size and root.

    Cosignatures were verified when recorded; ``consortium audit verify`` re-checks them.
    """
    if quorum < 1:
        raise ValueError("a quorum of zero would witness every head")
    return len({c.site_id for c in cosignatures_for(head, session=session)}) >= quorum
