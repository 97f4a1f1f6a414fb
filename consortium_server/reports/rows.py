"""The compliance report as data: its filters and the rows of every section.

Frozen pydantic models with no session and no queries, so that
:mod:`~consortium_server.reports.render`, :mod:`~consortium_server.reports.charts` and the
JSON download depend on these shapes alone, and a test can build a report by hand. The
section modules (``activity``, ``lifecycles``, ``budgets``, ``contributions``, ``head``)
fill them; :func:`~consortium_server.reports.service.build_report` gathers them into one
:class:`ComplianceReport`.

Amounts (epsilon, delta) are exact :class:`~decimal.Decimal` values, written to JSON as
plain decimal strings: a float would round the figures a compliance officer reconciles
against the ledger. Rows hold aggregates and identifiers only, never patient data.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

__all__ = [
    "ActivityRow",
    "Amount",
    "ApprovalRow",
    "BudgetLineRow",
    "BudgetPoint",
    "ComplianceReport",
    "Cosigner",
    "DatasetBudget",
    "HeadInfo",
    "LifecycleEvent",
    "ReportFilters",
    "RoundRow",
    "SiteContribution",
    "StudyLifecycle",
    "amount_or_none",
]


def _plain_decimal(value: Decimal) -> str:
    return format(value, "f")


#: An exact amount (epsilon, delta); JSON: a plain decimal string ("10", "0.00001").
Amount = Annotated[Decimal, PlainSerializer(_plain_decimal, return_type=str, when_used="json")]


class _Model(BaseModel):
    # JSON mode writes Decimals as decimal strings and datetimes as ISO 8601 ("...Z").
    model_config = ConfigDict(frozen=True)


def amount_or_none(value: Any) -> Decimal | None:
    """A finite non-negative Decimal from a number or decimal string, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None


class ReportFilters(_Model):
    """What the report is about; every field optional (nothing set: everything)."""

    study_id: str | None = None
    dataset_id: str | None = None
    user: str | None = Field(default=None, description="Actor subject (OIDC `sub`).")
    since: datetime | None = Field(default=None, description="Inclusive lower bound (UTC).")
    until: datetime | None = Field(default=None, description="Exclusive upper bound (UTC).")

    def query_params(self) -> dict[str, str]:
        """The filters as the report URL's query parameters (``from`` / ``to`` for times)."""
        params: dict[str, str] = {}
        if self.study_id:
            params["study"] = self.study_id
        if self.dataset_id:
            params["dataset"] = self.dataset_id
        if self.user:
            params["user"] = self.user
        if self.since:
            params["from"] = self.since.isoformat().replace("+00:00", "Z")
        if self.until:
            params["to"] = self.until.isoformat().replace("+00:00", "Z")
        return params

    def query_string(self, **extra: str) -> str:
        """``study=...&format=pdf`` (URL-encoded), for links inside the report."""
        return urlencode({**self.query_params(), **extra})

    def describe(self) -> str:
        """One human line: ``study X · dataset Y · user Z · from A · to B`` or ``everything``."""
        parts = [f"{k} {v}" for k, v in self.query_params().items()]
        return " · ".join(parts) if parts else "everything (no filter)"

    @property
    def since_day(self) -> str:
        """``since`` as ``YYYY-MM-DD`` for the form's date field (empty if unset)."""
        return self.since.date().isoformat() if self.since else ""

    @property
    def until_day(self) -> str:
        """The last day inside ``[.., until)`` as ``YYYY-MM-DD`` (empty if unset)."""
        return (self.until - timedelta(microseconds=1)).date().isoformat() if self.until else ""

    def in_range(self, at: datetime) -> bool:
        """True if ``at`` lies in ``[since, until)``."""
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)


class ActivityRow(_Model):
    """One audit entry, as the activity table shows it (ids and a short summary)."""

    index: int
    at: datetime
    actor: str
    organisation: str | None
    roles: list[str]
    action: str
    object_type: str
    object_id: str
    outcome: str
    purpose: str | None
    policy_decision: str | None
    contract_hash: str | None
    summary: str


class ApprovalRow(_Model):
    """A site's decision on a study: who, when, why, and on which contract hash."""

    site_id: str
    decision: str
    decided_by: str
    decided_at: datetime
    reason: str
    contract_hash: str
    matches_contract: bool


class LifecycleEvent(_Model):
    """A lifecycle transition, with the audit entry that records it when one is found."""

    at: datetime
    from_state: str | None
    to_state: str
    actor: str
    organisation: str | None
    reason: str
    audit_index: int | None


class RoundRow(_Model):
    """One completed round of a study (from its ``round.completed`` entry)."""

    round: int
    at: datetime
    participants: list[str]
    samples: int
    epsilon: dict[str, Amount]
    digests: int
    audit_index: int
    #: Accuracy, AUC, noisy test count and noise-sd from the sites' noisy histograms.
    evaluation: dict[str, float] = {}


class StudyLifecycle(_Model):
    """A study's contract facts, approvals, transitions and rounds."""

    study_id: str
    title: str
    owner: str
    owner_organisation: str | None
    purpose: str | None
    state: str
    state_reason: str | None
    contract_hash: str
    datasets: list[str]
    epsilon: Amount | None
    delta: Amount | None
    created_at: datetime
    #: How the study's evaluation is released and what it costs (from the contract).
    evaluation: str = ""
    #: What its sites release without DP (declared public by their stewards).
    public: list[str] = []
    approvals: list[ApprovalRow]
    events: list[LifecycleEvent]
    rounds: list[RoundRow]


class BudgetPoint(_Model):
    """Cumulative epsilon spent on a dataset at ``at`` (after round ``round`` of a study)."""

    at: datetime
    epsilon_spent: Amount
    study_id: str | None
    round: int | None


class BudgetLineRow(_Model):
    """One study's reservation on the dataset (the ledger's line)."""

    study_id: str
    epsilon_reserved: Amount
    epsilon_charged: Amount
    epsilon_released: Amount
    charges: int
    reserved_at: datetime
    last_charged_at: datetime | None
    released_at: datetime | None


class DatasetBudget(_Model):
    """A dataset's privacy budget: the ledger's totals and epsilon spent over time.

    ``epsilon_cap/spent/reserved/remaining`` and ``delta_*`` are the dataset's current
    ledger totals, whatever the filters. ``epsilon_charged`` is what the ledger charged to
    the selected studies and ``epsilon_audited`` what their audited rounds add up to;
    ``reconciled`` says whether the two agree (they must: every charge follows a round).
    """

    dataset_id: str
    site_id: str
    title: str
    epsilon_cap: Amount
    epsilon_spent: Amount
    epsilon_reserved: Amount
    epsilon_remaining: Amount
    delta_cap: Amount
    delta_spent: Amount
    delta_reserved: Amount
    epsilon_charged: Amount
    epsilon_audited: Amount
    reconciled: bool
    lines: list[BudgetLineRow]
    series: list[BudgetPoint]


class SiteContribution(_Model):
    """What a site contributed: rounds, samples and the epsilon charged on its datasets.

    ``samples`` adds, over studies, the largest sample count the site reported in any
    round of that study (the records it contributed, not records times rounds).
    """

    site_id: str
    display_name: str
    studies: list[str]
    rounds: int
    samples: int
    epsilon: Amount
    datasets: list[str]


class Cosigner(_Model):
    """A site witness's cosignature of the report's head, checked with the site's key."""

    site_id: str
    timestamp: datetime
    valid: bool


class HeadInfo(_Model):
    """The signed tree head the report was built on, and how far the log is witnessed."""

    tree_size: int
    root_hash: str
    timestamp: datetime
    key_id: str
    signature: str
    server_public_key: str
    signature_valid: bool
    witnessed: bool
    witness_quorum: int
    cosigners: list[Cosigner]
    latest_witnessed_size: int | None
    latest_witnessed_root: str | None


class ComplianceReport(_Model):
    """Everything one report shows; rendered by :mod:`consortium_server.reports.render`."""

    generated_at: datetime
    generated_by: str
    filters: ReportFilters
    head: HeadInfo | None
    activity: list[ActivityRow]
    activity_total: int
    activity_by_action: dict[str, int]
    activity_by_actor: dict[str, int]
    lifecycles: list[StudyLifecycle]
    budgets: list[DatasetBudget]
    contributions: list[SiteContribution]
    malformed_rounds: int
    corrupt_entries: list[int]
    study_choices: list[tuple[str, str]]
    dataset_choices: list[str]

    @property
    def activity_truncated(self) -> bool:
        """True when the activity table shows fewer rows than matched."""
        return len(self.activity) < self.activity_total
