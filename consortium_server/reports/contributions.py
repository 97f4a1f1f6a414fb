"""The contributions section of the report: what each site gave the selected studies.

Rounds and studies come from the audited rounds within the time range; samples count the
records a site contributed to a study (its largest count in any round, not records times
rounds); epsilon is what the ledger charged the selected studies on the site's datasets.
With a study or dataset filter, a site with no round, no charge and not holding the
filtered dataset is left out.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.budgets import service as ledger
from consortium_server.datasets.models import Dataset
from consortium_server.reports.rounds import AuditedRound
from consortium_server.reports.rows import ReportFilters, SiteContribution
from consortium_server.reports.selection import selected_studies
from consortium_server.sites.models import Site

__all__ = ["contributions_by_site"]


def contributions_by_site(
    session: Session, filters: ReportFilters, *, rounds: list[AuditedRound]
) -> list[SiteContribution]:
    """Per site: studies and rounds taken part in, samples, epsilon charged on its datasets.

    Rounds count within the time range; epsilon is the ledger's charged epsilon on the
    site's datasets for the selected studies.
    """
    selected = selected_studies(session, filters)
    chosen = [
        r for r in rounds if (selected is None or r.study_id in selected) and filters.in_range(r.at)
    ]
    site_rounds: dict[str, int] = defaultdict(int)
    site_studies: dict[str, set[str]] = defaultdict(set)
    site_samples: dict[tuple[str, str], int] = defaultdict(int)
    for record in chosen:
        for site_id in record.participants:
            site_rounds[site_id] += 1
            site_studies[site_id].add(record.study_id)
        for site_id, count in record.samples.items():
            key = (site_id, record.study_id)
            site_samples[key] = max(site_samples[key], count)
    datasets_of_site: dict[str, list[str]] = defaultdict(list)
    for dataset in session.scalars(select(Dataset).order_by(Dataset.id)):
        datasets_of_site[dataset.site_id].append(dataset.id)
    result = []
    for site in session.scalars(select(Site).order_by(Site.id)):
        epsilon = Decimal(0)
        for dataset_id in datasets_of_site[site.id]:
            for line in ledger.show(session, dataset_id).lines:
                if selected is None or line.study_id in selected:
                    epsilon += line.epsilon_charged
        owns_dataset = filters.dataset_id in datasets_of_site[site.id]
        if selected is not None and not (site.id in site_studies or epsilon or owns_dataset):
            continue
        result.append(
            SiteContribution(
                site_id=site.id,
                display_name=site.display_name,
                studies=sorted(site_studies.get(site.id, set())),
                rounds=site_rounds.get(site.id, 0),
                samples=sum(n for (s, _), n in site_samples.items() if s == site.id),
                epsilon=epsilon,
                datasets=datasets_of_site[site.id],
            )
        )
    return result
