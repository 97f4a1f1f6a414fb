"""ORM models of the study key relay: public contexts and sealed keys (never a secret key).

One :class:`StudyKeyRelay` per study (the public context, the key fingerprint and which site
generated the key) and one :class:`SealedStudyKey` per recipient site (the JSON of a
:class:`site_node.crypto.SealedKey`, which the server cannot open). Rows are written once:
a study's key cannot be replaced through the API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from consortium_server.db.base import Base, JSONType, UTCDateTime, utcnow

__all__ = ["SealedStudyKey", "StudyKeyRelay"]


class StudyKeyRelay(Base):
    """A study's public CKKS context, as uploaded by the site that generated the key."""

    __tablename__ = "study_key_relays"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    sender_site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    contract_hash: Mapped[str] = mapped_column(String(64))
    public_context: Mapped[bytes] = mapped_column(LargeBinary)
    public_context_sha256: Mapped[str] = mapped_column(String(64))
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    uploaded_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SealedStudyKey(Base):
    """The study key sealed to one recipient site (opaque to the server)."""

    __tablename__ = "study_sealed_keys"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    recipient_site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    sender_site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    sealed: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
