"""ORM models of the release gate.

* :class:`FinalAggregate` and :class:`FinalAggregateBlob`: the last round's encrypted
  aggregate as the server keeps it after a run (it cannot decrypt it), blob 0 being the
  wire-format header.
* :class:`ReleaseSignoff`: one site's signed statement "the final model I decrypted hashes
  to X" (one per study and site; insert-only).
* :class:`ReleasedModel`: the decrypted model bytes one site uploaded (their SHA-256 equals
  that site's signed-off hash), with the parameter layout it sent (from which the model file
  is written).
* :class:`StudyRelease`: the release itself, with the model card built at that moment.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from consortium_server.db.base import Base, JSONType, UTCDateTime, utcnow

__all__ = [
    "FinalAggregate",
    "FinalAggregateBlob",
    "ReleaseSignoff",
    "ReleasedModel",
    "StudyRelease",
]


class FinalAggregate(Base):
    """The final encrypted aggregate of a completed study (one per study, written once)."""

    __tablename__ = "release_final_aggregates"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    contract_hash: Mapped[str] = mapped_column(String(64))
    round_number: Mapped[int] = mapped_column(Integer)
    scheme: Mapped[str] = mapped_column(String(16))
    num_params: Mapped[int] = mapped_column(Integer)
    total_weight: Mapped[float] = mapped_column(Float)
    digest: Mapped[str] = mapped_column(String(64))
    #: The signed contributions it sums (AggregateManifest JSON), which sites check.
    manifest: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    blobs: Mapped[list[FinalAggregateBlob]] = relationship(
        order_by="FinalAggregateBlob.position", lazy="selectin", cascade="all, delete-orphan"
    )


class FinalAggregateBlob(Base):
    """One blob of the final aggregate (``position`` 0: header; then the chunks)."""

    __tablename__ = "release_final_aggregate_blobs"

    study_id: Mapped[str] = mapped_column(
        ForeignKey("release_final_aggregates.study_id"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ReleaseSignoff(Base):
    """A site's Ed25519-signed statement of the final model hash it decrypted."""

    __tablename__ = "release_signoffs"
    __table_args__ = (UniqueConstraint("study_id", "site_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    contract_hash: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    signed_by: Mapped[str] = mapped_column(String(255))
    signed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReleasedModel(Base):
    """The decrypted final model as one site uploaded it (released only through the gate)."""

    __tablename__ = "release_models"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    num_params: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    #: The parameter layout (:class:`concord_protocol.release.ModelLayout` JSON) the uploader
    #: sent; ``None`` for an upload without one (the raw bytes only, no model file).
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    uploaded_by_site: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    uploaded_by: Mapped[str] = mapped_column(String(255))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StudyRelease(Base):
    """A released study: who released it, when, and its model card as built then."""

    __tablename__ = "release_releases"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]] = mapped_column(JSONType)
    released_by: Mapped[str] = mapped_column(String(255))
    released_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
