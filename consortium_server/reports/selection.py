"""Which studies a report's filters select, shared by every section of the report.

A study filter selects that study; a dataset filter selects the studies whose contract
lists the dataset. Every section asks here, and reads a contract's datasets through
:func:`datasets_of`, so that the activity, the lifecycles, the budgets and the
contributions of one report are always about the same studies.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.reports.rows import ReportFilters
from consortium_server.studies.models import Study

__all__ = ["datasets_of", "selected_studies"]


def selected_studies(session: Session, filters: ReportFilters) -> set[str] | None:
    """Study ids the filters select (None: no study/dataset filter, all studies)."""
    if filters.study_id is None and filters.dataset_id is None:
        return None
    selected: set[str] = set()
    for study in session.scalars(select(Study)):
        if filters.study_id is not None and study.id != filters.study_id:
            continue
        if filters.dataset_id is not None and filters.dataset_id not in datasets_of(study):
            continue
        selected.add(study.id)
    return selected


def datasets_of(study: Study) -> list[str]:
    """The dataset ids the study's contract lists (none if it has no such list)."""
    names = (study.contract or {}).get("datasets", [])
    return [str(d) for d in names] if isinstance(names, list) else []
