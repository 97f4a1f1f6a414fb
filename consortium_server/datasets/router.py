"""/api/v1/datasets: the catalogue (read by members, published by each site)."""

from __future__ import annotations

from fastapi import APIRouter, status

from concord_protocol.contract import Purpose
from concord_protocol.principals import Role
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.datasets import service
from consortium_server.datasets.schemas import DatasetPublic, DatasetPublish

router = APIRouter(prefix="/api/v1/datasets", tags=["catalogue"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.DATA_STEWARD, Role.SITE_NODE)],
)
def publish_dataset(
    body: DatasetPublish, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> DatasetPublic:
    """Publish a dataset's metadata for your own site (data steward or site node)."""
    dataset = service.publish_dataset(session, body, actor=principal)
    audit.record(
        "dataset.published",
        object_type="dataset",
        object_id=dataset.id,
        details={
            "site_id": dataset.site_id,
            "allowed_purposes": list(dataset.allowed_purposes),
            "epsilon_budget": dataset.epsilon_budget,
            "max_epsilon_per_study": dataset.max_epsilon_per_study,
            "requires_encryption": dataset.requires_encryption,
        },
    )
    return DatasetPublic.model_validate(dataset)


@router.get("", dependencies=[ANY_MEMBER])
def list_datasets(
    session: SessionDep,
    _: CurrentPrincipal,
    site_id: str | None = None,
    purpose: Purpose | None = None,
) -> list[DatasetPublic]:
    """The catalogue, optionally filtered by site or allowed purpose."""
    found = service.list_datasets(
        session, site_id=site_id, purpose=purpose.value if purpose else None
    )
    return [DatasetPublic.model_validate(d) for d in found]


@router.get("/{dataset_id}", dependencies=[ANY_MEMBER])
def get_dataset(dataset_id: str, session: SessionDep, _: CurrentPrincipal) -> DatasetPublic:
    """One catalogue entry."""
    return DatasetPublic.model_validate(service.get_dataset(session, dataset_id))
