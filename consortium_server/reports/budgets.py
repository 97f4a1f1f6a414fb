"""The privacy-budget section of the report: per dataset, the ledger's figures beside
epsilon spent over time as the audited rounds tell it.

A round's entry carries the study's cumulative epsilon on each dataset, because the site's
accountant composes rounds (RDP/PRV) far more tightly than a sum would; each round's
increase is the difference to the previous round of the same study, and increases add
across studies (basic composition, as the ledger does). The audited total is then set
against what the ledger charged the same studies: ``DatasetBudget.reconciled`` must hold,
since every charge follows a round, and a mismatch is a finding for the report's reader.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.budgets import service as ledger
from consortium_server.datasets.models import Dataset
from consortium_server.reports.rounds import AuditedRound
from consortium_server.reports.rows import BudgetLineRow, BudgetPoint, DatasetBudget, ReportFilters
from consortium_server.reports.selection import datasets_of, selected_studies
from consortium_server.studies.models import Study

__all__ = ["budgets_by_dataset"]


def _increases(rounds: Iterable[AuditedRound]) -> list[tuple[AuditedRound, str, Decimal]]:
    """(round, dataset, epsilon added by this round) from cumulative per-study values."""
    last: dict[tuple[str, str], Decimal] = {}
    result = []
    for record in sorted(rounds, key=lambda r: (r.at, r.index)):
        for dataset, total in record.epsilon.items():
            key = (record.study_id, dataset)
            increase = max(Decimal(0), total - last.get(key, Decimal(0)))
            last[key] = max(total, last.get(key, Decimal(0)))
            result.append((record, dataset, increase))
    return result


def budgets_by_dataset(
    session: Session, filters: ReportFilters, *, rounds: list[AuditedRound]
) -> list[DatasetBudget]:
    """Ledger totals, per-study lines and epsilon spent over time, per selected dataset.

    The series is cumulative over every audited round of the selected studies; the time
    range clips it (the first point then carries what was spent before ``since``).
    """
    selected = selected_studies(session, filters)
    query = select(Dataset).order_by(Dataset.id)
    if filters.dataset_id is not None:
        query = query.where(Dataset.id == filters.dataset_id)
    datasets = list(session.scalars(query))
    if filters.study_id is not None:
        study = session.get(Study, filters.study_id)
        used = set(datasets_of(study)) if study is not None else set()
        datasets = [d for d in datasets if d.id in used]
    chosen = [r for r in rounds if selected is None or r.study_id in selected]
    increases = _increases(chosen)
    result = []
    for dataset in datasets:
        view = ledger.show(session, dataset.id)
        running = Decimal(0)
        points: list[BudgetPoint] = []
        before = Decimal(0)
        for record, name, increase in increases:
            if name != dataset.id:
                continue
            running += increase
            if filters.since is not None and record.at < filters.since:
                before = running
                continue
            if filters.until is not None and record.at >= filters.until:
                continue
            points.append(
                BudgetPoint(
                    at=record.at,
                    epsilon_spent=running,
                    study_id=record.study_id,
                    round=record.round,
                )
            )
        if filters.since is not None and (points or before):
            points.insert(
                0, BudgetPoint(at=filters.since, epsilon_spent=before, study_id=None, round=None)
            )
        lines = [
            BudgetLineRow(
                study_id=line.study_id,
                epsilon_reserved=line.epsilon_reserved,
                epsilon_charged=line.epsilon_charged,
                epsilon_released=line.epsilon_released,
                charges=line.charges,
                reserved_at=line.reserved_at,
                last_charged_at=line.last_charged_at,
                released_at=line.released_at,
            )
            for line in view.lines
            if selected is None or line.study_id in selected
        ]
        ledger_spent = sum((line.epsilon_charged for line in lines), Decimal(0))
        result.append(
            DatasetBudget(
                dataset_id=dataset.id,
                site_id=dataset.site_id,
                title=dataset.title,
                epsilon_cap=view.epsilon_cap,
                epsilon_spent=view.epsilon_spent,
                epsilon_reserved=view.epsilon_reserved,
                epsilon_remaining=view.epsilon_remaining,
                delta_cap=view.delta_cap,
                delta_spent=view.delta_spent,
                delta_reserved=view.delta_reserved,
                epsilon_charged=ledger_spent,
                epsilon_audited=running,
                reconciled=running == ledger_spent,
                lines=lines,
                series=points,
            )
        )
    return result
