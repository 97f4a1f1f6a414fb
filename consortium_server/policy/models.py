"""ORM model of published policy-set versions (one row per publish; one row active)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from consortium_server.db.base import Base, JSONType, UTCDateTime, utcnow

__all__ = ["PolicyVersion"]


class PolicyVersion(Base):
    """A published consortium policy set: its files, its schema, its hash, who and when.

    Rows are never updated except for the ``active`` flag and who activated them (exactly
    one row is active); publishing adds a row with the next version number, rolling back
    re-activates an old one.
    """

    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    policy_set_hash: Mapped[str] = mapped_column(String(64), index=True)
    #: File name -> Cedar policy text.
    policies: Mapped[dict[str, str]] = mapped_column(JSONType)
    schema_text: Mapped[str] = mapped_column(Text)
    published_by: Mapped[str] = mapped_column(String(255))
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    #: Who made this version active last (the publisher, or whoever rolled back to it).
    activated_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
