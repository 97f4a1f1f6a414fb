"""ORM model of a catalogue dataset."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from concord_protocol.policy.facts import DatasetFacts
from consortium_server.db.base import Base, JSONType, UTCDateTime, utcnow

__all__ = ["Dataset"]


class Dataset(Base):
    """Metadata a site publishes about one local dataset, with its privacy budget and GDPR
    Art. 30 record-of-processing fields."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    modality: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(64))
    record_count: Mapped[int] = mapped_column(Integer)
    feature_summary: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    allowed_purposes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    epsilon_budget: Mapped[float] = mapped_column(Float)
    delta_budget: Mapped[float] = mapped_column(Float)
    max_epsilon_per_study: Mapped[float] = mapped_column(Float)
    requires_encryption: Mapped[bool] = mapped_column(Boolean, default=True)
    controller: Mapped[str] = mapped_column(String(200))
    data_categories: Mapped[list[str]] = mapped_column(JSONType, default=list)
    legal_basis: Mapped[str] = mapped_column(String(200))
    retention: Mapped[str] = mapped_column(String(200))
    published_by: Mapped[str] = mapped_column(String(255))
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def facts(self) -> DatasetFacts:
        """What the data-use policy sees of this dataset (the same facts a site builds)."""
        return DatasetFacts(
            id=self.id,
            site_id=self.site_id,
            allowed_purposes=tuple(str(p) for p in self.allowed_purposes),
            max_epsilon_per_study=float(self.max_epsilon_per_study),
            requires_encryption=bool(self.requires_encryption),
        )
