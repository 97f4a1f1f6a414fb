"""Cosignatures on the server: check a site's cosignature with its registered key, store it,
and say whether a head is witnessed.

The cosigned message and its verification are shared (:mod:`concord_protocol.audit.cosignatures`);
the site's rules for what it cosigns are in :mod:`site_node.agent.cosigner`.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import (
    CLOCK_SKEW,
    DEFAULT_LOG_ID,
    Cosignature,
    verify_cosignature,
)
from concord_protocol.audit.heads import SignedTreeHead, decode_public_key
from concord_protocol.fields import utcnow
from consortium_server.audit.models import AuditCosignature, AuditTreeHead
from consortium_server.errors import ConflictError, InvalidRequestError, NotFoundError

__all__ = ["cosignatures_for", "is_witnessed", "record_cosignature"]


def record_cosignature(
    session: Session,
    cosignature: Cosignature,
    *,
    site_public_key: str,
    log_id: str = DEFAULT_LOG_ID,
) -> Cosignature:
    """Verify a site's cosignature with its registered key (base64 raw) and store it.

    Only version 2 is accepted: bound to this log (``log_id``, else
    ``audit.cosignature_wrong_log``) and to a head the server signed, by its size, root, key
    id and time (``audit.head_not_found``); made no earlier than :data:`CLOCK_SKEW` before
    that head and no later than that after now (``audit.cosignature_time_invalid``).
    Recording the same cosigned head twice is idempotent; a second, different root for
    the same site and size is refused (``audit.cosignature_conflict``). Flushes.
    """
    if cosignature.version != 2:
        raise InvalidRequestError(
            "Only version 2 cosignatures (bound to the log, key and head) are accepted.",
            code="audit.cosignature_invalid",
        )
    if cosignature.log_id != log_id:
        raise InvalidRequestError(
            f"The cosignature names the log {cosignature.log_id!r}; this is {log_id!r}.",
            code="audit.cosignature_wrong_log",
        )
    head_exists = session.scalar(
        select(func.count())
        .select_from(AuditTreeHead)
        .where(
            AuditTreeHead.tree_size == cosignature.tree_size,
            AuditTreeHead.root_hash == cosignature.root_hash,
            AuditTreeHead.key_id == cosignature.key_id,
            AuditTreeHead.timestamp == cosignature.head_timestamp,
        )
    )
    if not head_exists:
        raise NotFoundError(
            f"No signed tree head of size {cosignature.tree_size} with that root, key and time.",
            code="audit.head_not_found",
        )
    assert cosignature.head_timestamp is not None  # version 2
    if not (
        cosignature.head_timestamp - CLOCK_SKEW <= cosignature.timestamp <= utcnow() + CLOCK_SKEW
    ):
        raise InvalidRequestError(
            "A cosignature must be made after the head it cosigns, and not in the future.",
            code="audit.cosignature_time_invalid",
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
        return existing.cosignature()
    row = AuditCosignature(
        site_id=cosignature.site_id,
        tree_size=cosignature.tree_size,
        root_hash=cosignature.root_hash,
        timestamp=cosignature.timestamp,
        signature=cosignature.signature,
        log_id=cosignature.log_id,
        key_id=cosignature.key_id,
        head_timestamp=cosignature.head_timestamp,
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
    return [row.cosignature() for row in rows]


def is_witnessed(head: SignedTreeHead, quorum: int, *, session: Session) -> bool:
    """True if at least ``quorum`` distinct sites cosigned this head's size and root with a
    version 2 cosignature (version 1 ones count towards no quorum).

    Cosignatures were verified when recorded; ``consortium audit verify`` re-checks them.
    """
    if quorum < 1:
        raise ValueError("a quorum of zero would witness every head")
    cosigned = cosignatures_for(head, session=session)
    return len({c.site_id for c in cosigned if c.version == 2}) >= quorum
