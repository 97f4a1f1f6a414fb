"""ORM models of the audit log: leaves, signed tree heads, witness cosignatures.

All four tables (with ``audit_nodes``, the stored subtree hashes) are insert-only:
migrations 0002 and 0011 add triggers that refuse UPDATE and DELETE on them (SQLite and
PostgreSQL). Any rewrite that gets past the triggers is caught by the signature checks.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from concord_protocol.audit.cosignatures import Cosignature
from concord_protocol.audit.heads import SignedTreeHead
from consortium_server.db.base import Base, UTCDateTime, utcnow

__all__ = ["AuditCosignature", "AuditLeaf", "AuditNode", "AuditTreeHead"]


class AuditLeaf(Base):
    """One log entry: dense zero-based ``index``, canonical entry bytes, leaf hash.

    ``action``, ``actor_subject`` and ``at`` are copies of fields inside ``entry`` for
    report queries; verification checks that they agree with the hashed bytes.
    """

    __tablename__ = "audit_leaves"
    __table_args__ = (
        CheckConstraint('"index" >= 0', name="index_non_negative"),
        Index("ix_audit_leaves_action_at", "action", "at"),
        Index("ix_audit_leaves_actor_subject", "actor_subject"),
    )

    index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    action: Mapped[str] = mapped_column(String(100))
    actor_subject: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditNode(Base):
    """The hash of a perfect subtree above the leaves: ``2**level`` leaves from leaf
    ``idx * 2**level`` (:mod:`consortium_server.audit.tree`). Derived, insert-only."""

    __tablename__ = "audit_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditTreeHead(Base):
    """A tree head signed by the server's Ed25519 key."""

    __tablename__ = "audit_tree_heads"
    __table_args__ = (
        CheckConstraint("tree_size >= 0", name="tree_size_non_negative"),
        Index("ix_audit_tree_heads_tree_size", "tree_size"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger)
    root_hash: Mapped[str] = mapped_column(String(64))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def signed_head(self) -> SignedTreeHead:
        """The head stored in this row."""
        return SignedTreeHead(
            tree_size=self.tree_size,
            root_hash=self.root_hash,
            timestamp=self.timestamp,
            key_id=self.key_id,
            signature=self.signature,
        )


class AuditCosignature(Base):
    """A site witness's Ed25519 cosignature of a tree head (size and root)."""

    __tablename__ = "audit_cosignatures"
    __table_args__ = (
        UniqueConstraint("site_id", "tree_size"),
        Index("ix_audit_cosignatures_tree_size", "tree_size"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(64))
    tree_size: Mapped[int] = mapped_column(BigInteger)
    root_hash: Mapped[str] = mapped_column(String(64))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    signature: Mapped[str] = mapped_column(String(128))
    #: Version 2 binds the log, the head's key and the head's time; NULL on the version 1
    #: cosignatures stored before migration 0010.
    log_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    head_timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def cosignature(self) -> Cosignature:
        """The stored cosignature as signed (version 1 when it carries no binding)."""
        return Cosignature(
            version=1 if self.log_id is None else 2,
            site_id=self.site_id,
            tree_size=self.tree_size,
            root_hash=self.root_hash,
            timestamp=self.timestamp,
            signature=self.signature,
            log_id=self.log_id,
            key_id=self.key_id,
            head_timestamp=self.head_timestamp,
        )
