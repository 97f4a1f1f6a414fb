"""/api/v1/budgets: a dataset's privacy budget (spent, reserved, remaining, per study)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from consortium_server.api.deps import ANY_MEMBER, SessionDep
from consortium_server.budgets import service
from consortium_server.datasets.service import get_dataset

router = APIRouter(prefix="/api/v1/budgets", tags=["budgets"])


@router.get("/{dataset_id}", dependencies=[ANY_MEMBER])
def show(dataset_id: str, session: SessionDep) -> dict[str, Any]:
    """Epsilon and delta of a dataset: lifetime cap, spent, reserved, remaining, and one line
    per study (reserved, charged, released). Amounts are decimal strings."""
    get_dataset(session, dataset_id)
    return service.show(session, dataset_id).as_dict()
