"""Building the compliance report: activity, study lifecycles, privacy budgets, site
contributions, and the signed tree head the report is built on.

:func:`build_report` reads the audit log (``audit_leaves``, decoded from the hashed bytes,
never from the copied query columns alone), the studies tables, the catalogue and the
privacy-budget ledger, and returns a :class:`~consortium_server.reports.rows.ComplianceReport`:
plain data that :mod:`consortium_server.reports.render` turns into HTML, PDF, CSV and JSON.
It takes ``session`` keyword-only, never commits, and only flushes when it signs a new tree
head. Each section has its own module (``activity``, ``lifecycles``, ``budgets``,
``contributions``, ``head``); this one signs the head and puts them together.

Reports hold aggregates and identifiers only (subjects, organisations, study, dataset and
site ids, counts, epsilons, hashes): never patient data.

Rounds: the ``round.completed`` audit entry
-------------------------------------------
The federation records every finished round as one audit entry; the report reads its
rounds (contributions per site, epsilon spent over time, the rounds of each study) from
these entries only (:mod:`consortium_server.reports.rounds`). Their details are
:class:`~concord_protocol.rounds.RoundAuditDetails`: the round's
:class:`~concord_protocol.rounds.RoundRecord` as the ServerApp reported it (participants,
sample counts, ciphertext digests, ...) and ``charged_epsilon``, what the ledger charged
for the round per dataset: the study's CUMULATIVE epsilon on that dataset after this round
(the site accountant's value, as given to ``budgets.charge_cumulative``).

Epsilon is cumulative per (study, dataset) because the site's accountant composes rounds
far more tightly than a sum; :mod:`consortium_server.reports.budgets` derives each round's
increase from it. Entries whose details are not round details are counted in
``ComplianceReport.malformed_rounds`` and otherwise ignored.

Filters (:class:`~consortium_server.reports.rows.ReportFilters`)
----------------------------------------------------------------
``study`` and ``dataset`` select the studies the report is about (a dataset selects the
studies whose contract uses it); ``user`` selects activity by actor subject; ``since`` /
``until`` bound the activity, the rounds and the chart. Lifecycles always show a selected
study's whole history (half a lifecycle would mislead), and the ledger figures are always
the dataset's current totals.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.datasets.models import Dataset
from consortium_server.db.base import utcnow
from consortium_server.reports.activity import activity
from consortium_server.reports.budgets import budgets_by_dataset
from consortium_server.reports.contributions import contributions_by_site
from consortium_server.reports.head import head_info
from consortium_server.reports.lifecycles import lifecycles
from consortium_server.reports.rounds import load_rounds
from consortium_server.reports.rows import ComplianceReport, ReportFilters
from consortium_server.studies.models import Study

__all__ = ["build_report"]


def build_report(
    *,
    session: Session,
    log: AuditLog,
    signer: TreeHeadSigner,
    filters: ReportFilters,
    generated_by: str,
    activity_limit: int | None = None,
) -> ComplianceReport:
    """Build the compliance report over the log as of its latest signed head.

    The current log is signed first (:meth:`TreeHeadSigner.sign_latest`, which refuses a
    log that fails its integrity check), and everything read from the log is bounded by
    that head's size: the report states exactly which signed head it describes. Flushes
    the new head if one was signed; never commits.
    """
    head = signer.sign_latest(session)
    size = head.tree_size
    rounds, malformed = load_rounds(session, tree_size=size)
    rows, total, by_action, by_actor, corrupt = activity(
        session, filters, tree_size=size, limit=activity_limit
    )
    studies = session.execute(select(Study.id, Study.title).order_by(Study.created_at)).all()
    return ComplianceReport(
        generated_at=utcnow(),
        generated_by=generated_by,
        filters=filters,
        head=head_info(head, log=log, signer=signer, session=session),
        activity=rows,
        activity_total=total,
        activity_by_action=by_action,
        activity_by_actor=by_actor,
        lifecycles=lifecycles(session, filters, rounds=rounds, tree_size=size),
        budgets=budgets_by_dataset(session, filters, rounds=rounds),
        contributions=contributions_by_site(session, filters, rounds=rounds),
        malformed_rounds=malformed,
        corrupt_entries=corrupt,
        study_choices=[(str(i), str(t)) for i, t in studies],
        dataset_choices=list(session.scalars(select(Dataset.id).order_by(Dataset.id))),
    )
