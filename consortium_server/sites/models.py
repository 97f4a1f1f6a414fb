"""ORM model of an enrolled site."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from consortium_server.db.base import Base, UTCDateTime, str_enum, utcnow

__all__ = ["Site", "SiteKeyRotation", "SiteStatus"]


class SiteStatus(StrEnum):
    """Whether a site may take part."""

    ACTIVE = "active"
    REVOKED = "revoked"


class Site(Base):
    """A hospital's site node: its organisation and its public keys (never private ones)."""

    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation: Mapped[str] = mapped_column(String(200), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    contact_email: Mapped[str] = mapped_column(String(320))
    signing_public_key: Mapped[str] = mapped_column(String(64))
    exchange_public_key: Mapped[str] = mapped_column(String(64))
    supernode_public_key: Mapped[str] = mapped_column(Text)
    # The SuperLink's node id for that key, once registered (a uint64, kept as text).
    supernode_node_id: Mapped[str | None] = mapped_column(String(20), nullable=True)
    status: Mapped[SiteStatus] = mapped_column(str_enum(SiteStatus, 16), default=SiteStatus.ACTIVE)
    enrolled_by: Mapped[str] = mapped_column(String(255))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class SiteKeyRotation(Base):
    """A site's signed key rotation (:class:`concord_protocol.site_keys.KeyRotation`), kept
    verbatim so that peers can follow the chain from the keys they pinned. Insert-only."""

    __tablename__ = "site_key_rotations"
    __table_args__ = (UniqueConstraint("site_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    previous_fingerprint: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    statement: Mapped[str] = mapped_column(Text)
    recorded_by: Mapped[str] = mapped_column(String(255))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
