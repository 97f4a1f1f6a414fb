"""Request and response bodies of the dataset catalogue."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from concord_protocol.canonical import hashable_problem
from concord_protocol.contract import Purpose
from consortium_server.schemas import Slug, StrictModel

__all__ = ["DatasetPublic", "DatasetPublish", "Modality", "Task"]

Modality = Literal["tabular", "image", "volume"]
Task = Literal["binary_classification", "multiclass_classification", "segmentation"]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
MAX_SUMMARY_BYTES = 16_384


MAX_SUMMARY_DEPTH = 8


class DatasetPublish(StrictModel):
    """What a site publishes about a local dataset: metadata only, never records."""

    id: Slug = Field(description="Catalogue id, unique in the consortium, e.g. `bc-hospital-a`.")
    site_id: Slug = Field(description="The publishing site.")
    title: ShortText
    description: Annotated[str, StringConstraints(max_length=5000)] = ""
    modality: Modality
    task: Task
    record_count: int = Field(ge=1, le=1_000_000_000)
    feature_summary: dict[str, Any] = Field(
        default_factory=dict,
        description="Non-identifying schema summary: feature names, image shape, label counts.",
    )
    allowed_purposes: list[Purpose] = Field(min_length=1)
    epsilon_budget: float = Field(gt=0, le=1000, description="Lifetime epsilon across studies.")
    delta_budget: float = Field(gt=0, lt=1, description="Lifetime delta across studies.")
    max_epsilon_per_study: float = Field(gt=0, le=1000, description="Largest epsilon per study.")
    requires_encryption: bool = Field(default=True, description="Studies must use CKKS.")
    controller: ShortText = Field(description="GDPR Art. 30: the data controller.")
    data_categories: list[ShortText] = Field(
        min_length=1, description="GDPR Art. 30: categories of personal data."
    )
    legal_basis: ShortText = Field(description="GDPR Art. 6/9 basis, e.g. `Art. 9(2)(j)`.")
    retention: ShortText = Field(description="GDPR Art. 30: retention period.")

    @field_validator("feature_summary")
    @classmethod
    def _summary_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = hashable_problem(value, max_depth=MAX_SUMMARY_DEPTH)
        if problem is not None:
            raise ValueError(f"feature_summary {problem}")
        if len(json.dumps(value)) > MAX_SUMMARY_BYTES:
            raise ValueError(f"feature_summary must be under {MAX_SUMMARY_BYTES} bytes of JSON")
        return value

    @model_validator(mode="after")
    def _per_study_within_lifetime(self) -> Self:
        if self.max_epsilon_per_study > self.epsilon_budget:
            raise ValueError("max_epsilon_per_study cannot exceed epsilon_budget")
        return self


class DatasetPublic(BaseModel):
    """A catalogue entry as researchers see it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    site_id: str
    title: str
    description: str
    modality: str
    task: str
    record_count: int
    feature_summary: dict[str, Any]
    allowed_purposes: list[str]
    epsilon_budget: float
    delta_budget: float
    max_epsilon_per_study: float
    requires_encryption: bool
    controller: str
    data_categories: list[str]
    legal_basis: str
    retention: str
    published_by: str
    published_at: datetime
