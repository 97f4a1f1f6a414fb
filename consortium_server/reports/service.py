"""Compliance report queries: activity, study lifecycles, privacy budgets, site contributions,
and the signed tree head the report is built on.

:func:`build_report` reads the audit log (``audit_leaves``, decoded from the hashed bytes,
never from the copied query columns alone), the studies tables, the catalogue and the
privacy-budget ledger, and returns a :class:`ComplianceReport`: plain data that
:mod:`consortium_server.reports.render` turns into HTML, PDF, CSV and JSON. It takes
``session`` keyword-only, never commits, and only flushes when it signs a new tree head.

Reports hold aggregates and identifiers only (subjects, organisations, study, dataset and
site ids, counts, epsilons, hashes): never patient data.

Rounds: the ``round.completed`` audit entry
-------------------------------------------
The federation records every finished round as one audit entry; the report reads its
rounds (contributions per site, epsilon spent over time, the rounds of each study) from
these entries only::

    action         "round.completed"
    object         {"type": "study", "id": <study id>}
    outcome        "success"
    contract_hash  <the study's contract hash>
    actor          the server ("system:consortium-server")
    at             when the round's results were accepted (UTC)
    details {
      "round":        3,                                  # 1-based round number
      "participants": ["hospital-a", "hospital-b", ...],  # site ids whose update was summed
      "samples":      {"hospital-a": 190, ...},           # samples each site trained on
      "epsilon":      {"bc-a": "1.25", ...},              # per dataset: the study's
                                                          # CUMULATIVE epsilon after this
                                                          # round (the site accountant's
                                                          # value, as given to
                                                          # budgets.charge_cumulative);
                                                          # a number or a decimal string
      "ciphertext_digests": {"hospital-a": "<sha256 hex>", ...}
    }

Also accepted, so that the federation's ``RoundRecord.as_record()`` can be the details as
it is: ``round_number`` for ``round``, ``sample_counts`` for ``samples``,
``site_digests`` for ``ciphertext_digests``, and ``epsilon`` keyed by **site id** (each
site's accountant value then applies to the study's datasets at that site); ``None``
values (nothing reported) are skipped. Other keys are ignored.

Epsilon is cumulative per (study, dataset) because the site's accountant composes rounds
(RDP/PRV) far more tightly than a sum; the report derives each round's increase as the
difference to the previous round of the same study and adds increases across studies
(basic composition, as the ledger does). Entries whose details do not have this shape
are counted in ``ComplianceReport.malformed_rounds`` and otherwise ignored.

Filters (:class:`ReportFilters`)
--------------------------------
``study`` and ``dataset`` select the studies the report is about (a dataset selects the
studies whose contract uses it); ``user`` selects activity by actor subject; ``since`` /
``until`` bound the activity, the rounds and the chart. Lifecycles always show a selected
study's whole history (half a lifecycle would mislead), and the ledger figures are always
the dataset's current totals.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import verify_cosignature
from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.heads import SignedTreeHead, decode_public_key, verify_tree_head
from concord_protocol.audit.merkle import leaf_hash
from concord_protocol.errors import AuditVerificationError
from consortium_server.audit.cosignatures import cosignatures_for, is_witnessed
from consortium_server.audit.log import AuditLog
from consortium_server.audit.models import AuditCosignature, AuditLeaf
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.budgets import service as budgets
from consortium_server.datasets.models import Dataset
from consortium_server.db.base import utcnow
from consortium_server.sites.models import Site
from consortium_server.studies.models import Study

__all__ = [
    "ROUND_ACTION",
    "ActivityRow",
    "ApprovalRow",
    "BudgetLineRow",
    "BudgetPoint",
    "ComplianceReport",
    "Cosigner",
    "DatasetBudget",
    "HeadInfo",
    "LifecycleEvent",
    "ReportFilters",
    "RoundRecord",
    "RoundRow",
    "SiteContribution",
    "StudyLifecycle",
    "activity",
    "budgets_by_dataset",
    "build_report",
    "contributions_by_site",
    "head_info",
    "lifecycles",
    "load_rounds",
]

log = logging.getLogger("concord.reports")

#: The audit action the federation records for every completed round.
ROUND_ACTION = "round.completed"


def _plain_decimal(value: Decimal) -> str:
    return format(value, "f")


#: An exact amount (epsilon, delta); JSON: a plain decimal string ("10", "0.00001").
Amount = Annotated[Decimal, PlainSerializer(_plain_decimal, return_type=str, when_used="json")]


class _Model(BaseModel):
    # JSON mode writes Decimals as decimal strings and datetimes as ISO 8601 ("...Z").
    model_config = ConfigDict(frozen=True)


def _decimal(value: Any) -> Decimal | None:
    """A finite non-negative Decimal from a number or decimal string, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None


# --------------------------------------------------------------------------- filters


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


# --------------------------------------------------------------------------- report data


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


class RoundRecord(_Model):
    """A decoded ``round.completed`` entry."""

    index: int
    at: datetime
    study_id: str
    round: int
    participants: list[str]
    samples: dict[str, int]
    epsilon: dict[str, Amount]
    digests: dict[str, str]


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


# --------------------------------------------------------------------------- reading the log


def _leaves(
    session: Session, *, tree_size: int | None, filters: ReportFilters
) -> Iterable[tuple[int, AuditEntry | None]]:
    """(index, entry) for stored leaves below ``tree_size``; entry None if it is corrupt.

    The indexed query columns narrow the scan (actor, time); every row is then decoded
    from its hashed bytes, and a row whose bytes do not match its leaf hash is reported,
    not shown.
    """
    query = select(AuditLeaf).order_by(AuditLeaf.index)
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    if filters.user:
        query = query.where(AuditLeaf.actor_subject == filters.user)
    if filters.since:
        query = query.where(AuditLeaf.at >= filters.since)
    if filters.until:
        query = query.where(AuditLeaf.at < filters.until)
    for row in session.scalars(query.execution_options(yield_per=500)):
        data = bytes(row.entry)
        if leaf_hash(data) != bytes(row.leaf_hash):
            yield row.index, None
            continue
        try:
            yield row.index, AuditEntry.from_canonical_bytes(data)
        except ValueError:
            yield row.index, None


def _study_of(entry: AuditEntry) -> str | None:
    if entry.object.type == "study":
        return entry.object.id
    value = entry.details.get("study_id")
    return value if isinstance(value, str) else None


def _mentions_dataset(entry: AuditEntry, dataset_id: str) -> bool:
    if entry.object.type == "dataset" and entry.object.id == dataset_id:
        return True
    details = entry.details
    if details.get("dataset_id") == dataset_id:
        return True
    for key in ("datasets", "epsilon"):
        value = details.get(key)
        if isinstance(value, list | dict) and dataset_id in value:
            return True
    return False


def _summary(entry: AuditEntry) -> str:
    """A short, id-only description of ``details`` for the table."""
    details = entry.details
    if entry.action == ROUND_ACTION:
        samples = details.get("samples")
        total = (
            sum(v for v in samples.values() if isinstance(v, int))
            if isinstance(samples, dict)
            else 0
        )
        participants = details.get("participants")
        count = len(participants) if isinstance(participants, list) else 0
        return f"round {details.get('round')}: {count} sites, {total} samples"
    if "from" in details and "to" in details:
        text = f"{details.get('from') or '-'} → {details.get('to')}"
        reason = details.get("reason")
        return f"{text}: {reason}" if reason else text
    parts = []
    for key, value in details.items():
        if isinstance(value, str) and len(value) > 40:  # keys, digests: their start is enough
            parts.append(f"{key}={value[:16]}…")
        elif isinstance(value, str | int | float | bool) or value is None:
            parts.append(f"{key}={value}")
        elif isinstance(value, dict | list):
            parts.append(f"{key}=[{len(value)}]")
    text = ", ".join(parts)
    return text if len(text) <= 160 else text[:157] + "..."


def _selected_studies(session: Session, filters: ReportFilters) -> set[str] | None:
    """Study ids the filters select (None: no study/dataset filter, all studies)."""
    if filters.study_id is None and filters.dataset_id is None:
        return None
    selected: set[str] = set()
    for study in session.scalars(select(Study)):
        if filters.study_id is not None and study.id != filters.study_id:
            continue
        if filters.dataset_id is not None and filters.dataset_id not in _datasets_of(study):
            continue
        selected.add(study.id)
    return selected


def _datasets_of(study: Study) -> list[str]:
    names = (study.contract or {}).get("datasets", [])
    return [str(d) for d in names] if isinstance(names, list) else []


def activity(
    session: Session,
    filters: ReportFilters,
    *,
    tree_size: int | None = None,
    limit: int | None = None,
) -> tuple[list[ActivityRow], int, dict[str, int], dict[str, int], list[int]]:
    """Audit entries matching ``filters`` (below ``tree_size``), newest first.

    Returns ``(rows, total, by_action, by_actor, corrupt_indices)``; ``rows`` holds at
    most ``limit`` entries while the counts cover every match.
    """
    studies = _selected_studies(session, filters)
    rows: list[ActivityRow] = []
    by_action: dict[str, int] = defaultdict(int)
    by_actor: dict[str, int] = defaultdict(int)
    corrupt: list[int] = []
    total = 0
    for index, entry in _leaves(session, tree_size=tree_size, filters=filters):
        if entry is None:
            corrupt.append(index)
            continue
        if studies is not None:
            about_study = _study_of(entry) in studies
            about_dataset = filters.dataset_id is not None and _mentions_dataset(
                entry, filters.dataset_id
            )
            if not (about_study or (filters.study_id is None and about_dataset)):
                continue
        total += 1
        by_action[entry.action] += 1
        by_actor[entry.actor.subject] += 1
        rows.append(
            ActivityRow(
                index=index,
                at=entry.at,
                actor=entry.actor.subject,
                organisation=entry.actor.organisation,
                roles=list(entry.actor.roles),
                action=entry.action,
                object_type=entry.object.type,
                object_id=entry.object.id,
                outcome=entry.outcome.value,
                purpose=entry.purpose,
                policy_decision=entry.policy.decision.value if entry.policy else None,
                contract_hash=entry.contract_hash,
                summary=_summary(entry),
            )
        )
    rows.reverse()
    if limit is not None:
        rows = rows[:limit]
    return (
        rows,
        total,
        dict(sorted(by_action.items(), key=lambda kv: (-kv[1], kv[0]))),
        dict(sorted(by_actor.items(), key=lambda kv: (-kv[1], kv[0]))),
        corrupt,
    )


def _first(details: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in details:
            return details[key]
    return None


def _parse_round(
    index: int, entry: AuditEntry, datasets_at: Mapping[str, Mapping[str, list[str]]]
) -> RoundRecord | None:
    """Decode one ``round.completed`` entry (None if it does not have the shape).

    ``datasets_at`` maps study id -> site id -> the study's datasets at that site, to
    resolve epsilon keyed by site (``RoundRecord.as_record()`` of the federation) to the
    datasets the ledger charges.
    """
    details = entry.details
    number = _first(details, "round", "round_number")
    participants = details.get("participants")
    samples = _first(details, "samples", "sample_counts")
    epsilon = details.get("epsilon")
    digests = _first(details, "ciphertext_digests", "site_digests") or {}
    if (
        entry.object.type != "study"
        or not isinstance(number, int)
        or isinstance(number, bool)
        or not isinstance(participants, list)
        or not all(isinstance(p, str) for p in participants)
        or not isinstance(samples, dict)
        or not isinstance(epsilon, dict)
        or not isinstance(digests, dict)
    ):
        return None
    counts: dict[str, int] = {}
    for site_id, count in samples.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
        counts[str(site_id)] = count
    sites = datasets_at.get(entry.object.id, {})
    spent: dict[str, Decimal] = {}
    for key, value in epsilon.items():
        if value is None:  # the site's accountant reported nothing this round
            continue
        amount = _decimal(value)
        if amount is None:
            return None
        for dataset_id in sites.get(str(key), [str(key)]):
            spent[dataset_id] = max(amount, spent.get(dataset_id, Decimal(0)))
    return RoundRecord(
        index=index,
        at=entry.at,
        study_id=entry.object.id,
        round=number,
        participants=sorted(participants),
        samples=counts,
        epsilon=spent,
        digests={str(k): str(v) for k, v in digests.items()},
    )


def _datasets_by_study_and_site(session: Session) -> dict[str, dict[str, list[str]]]:
    site_of = {str(i): str(s) for i, s in session.execute(select(Dataset.id, Dataset.site_id))}
    result: dict[str, dict[str, list[str]]] = {}
    for study in session.scalars(select(Study)):
        by_site: dict[str, list[str]] = defaultdict(list)
        for dataset_id in _datasets_of(study):
            if dataset_id in site_of:
                by_site[site_of[dataset_id]].append(dataset_id)
        result[study.id] = dict(by_site)
    return result


def load_rounds(session: Session, *, tree_size: int | None = None) -> tuple[list[RoundRecord], int]:
    """Every ``round.completed`` entry below ``tree_size``, decoded, in log order.

    Returns ``(rounds, malformed)``: entries whose details do not have the documented
    shape (or whose bytes do not match their leaf hash) are counted, not returned.
    """
    query = select(AuditLeaf).where(AuditLeaf.action == ROUND_ACTION).order_by(AuditLeaf.index)
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    datasets_at = _datasets_by_study_and_site(session)
    rounds: list[RoundRecord] = []
    malformed = 0
    for row in session.scalars(query):
        data = bytes(row.entry)
        try:
            if leaf_hash(data) != bytes(row.leaf_hash):
                raise ValueError("leaf hash mismatch")
            entry = AuditEntry.from_canonical_bytes(data)
        except ValueError:
            malformed += 1
            continue
        record = _parse_round(row.index, entry, datasets_at)
        if record is None:
            malformed += 1
            continue
        rounds.append(record)
    return rounds, malformed


# --------------------------------------------------------------------------- lifecycles


def _event_indices(
    session: Session, study_ids: set[str], tree_size: int | None
) -> dict[tuple[str, str], list[int]]:
    """(study id, action) -> indices of the audit entries recording that transition."""
    query = select(AuditLeaf.index, AuditLeaf.entry).where(AuditLeaf.action.like("study.%"))
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, data in session.execute(query.order_by(AuditLeaf.index)):
        try:
            entry = AuditEntry.from_canonical_bytes(bytes(data))
        except ValueError:
            continue
        if entry.object.type == "study" and entry.object.id in study_ids:
            found[(entry.object.id, entry.action)].append(index)
    return found


def lifecycles(
    session: Session,
    filters: ReportFilters,
    *,
    rounds: list[RoundRecord],
    tree_size: int | None = None,
) -> list[StudyLifecycle]:
    """Each selected study's approvals, transitions (with their audit entries) and rounds."""
    selected = _selected_studies(session, filters)
    query = select(Study).order_by(Study.created_at, Study.id)
    if selected is not None:
        query = query.where(Study.id.in_(sorted(selected)))
    studies = list(session.scalars(query))
    indices = _event_indices(session, {s.id for s in studies}, tree_size)
    rounds_of: dict[str, list[RoundRecord]] = defaultdict(list)
    for record in rounds:
        rounds_of[record.study_id].append(record)
    result = []
    for study in studies:
        contract = study.contract or {}
        privacy = contract.get("privacy") if isinstance(contract.get("privacy"), dict) else {}
        used: dict[tuple[str, str], int] = defaultdict(int)
        events = []
        for event in study.events:
            key = (study.id, f"study.{event.to_state.value}")
            position = used[key]
            matches = indices.get(key, [])
            used[key] += 1
            events.append(
                LifecycleEvent(
                    at=event.at,
                    from_state=event.from_state.value if event.from_state else None,
                    to_state=event.to_state.value,
                    actor=event.actor_subject,
                    organisation=event.actor_organisation,
                    reason=event.reason,
                    audit_index=matches[position] if position < len(matches) else None,
                )
            )
        result.append(
            StudyLifecycle(
                study_id=study.id,
                title=study.title,
                owner=study.owner_subject,
                owner_organisation=study.owner_organisation,
                purpose=str(contract["purpose"]) if contract.get("purpose") else None,
                state=study.state.value,
                state_reason=study.state_reason,
                contract_hash=study.contract_hash,
                datasets=_datasets_of(study),
                epsilon=_decimal((privacy or {}).get("epsilon")),
                delta=_decimal((privacy or {}).get("delta")),
                created_at=study.created_at,
                approvals=[
                    ApprovalRow(
                        site_id=a.site_id,
                        decision=a.decision.value,
                        decided_by=a.decided_by,
                        decided_at=a.decided_at,
                        reason=a.reason,
                        contract_hash=a.contract_hash,
                        matches_contract=a.contract_hash == study.contract_hash,
                    )
                    for a in study.approvals
                ],
                events=events,
                rounds=[
                    RoundRow(
                        round=r.round,
                        at=r.at,
                        participants=r.participants,
                        samples=sum(r.samples.values()),
                        epsilon=r.epsilon,
                        digests=len(r.digests),
                        audit_index=r.index,
                    )
                    for r in rounds_of.get(study.id, [])
                    if filters.in_range(r.at)
                ],
            )
        )
    return result


# --------------------------------------------------------------------------- budgets


def _increases(rounds: Iterable[RoundRecord]) -> list[tuple[RoundRecord, str, Decimal]]:
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
    session: Session, filters: ReportFilters, *, rounds: list[RoundRecord]
) -> list[DatasetBudget]:
    """Ledger totals, per-study lines and epsilon spent over time, per selected dataset.

    The series is cumulative over every audited round of the selected studies; the time
    range clips it (the first point then carries what was spent before ``since``).
    """
    selected = _selected_studies(session, filters)
    query = select(Dataset).order_by(Dataset.id)
    if filters.dataset_id is not None:
        query = query.where(Dataset.id == filters.dataset_id)
    datasets = list(session.scalars(query))
    if filters.study_id is not None:
        study = session.get(Study, filters.study_id)
        used = set(_datasets_of(study)) if study is not None else set()
        datasets = [d for d in datasets if d.id in used]
    chosen = [r for r in rounds if selected is None or r.study_id in selected]
    increases = _increases(chosen)
    result = []
    for dataset in datasets:
        view = budgets.show(session, dataset.id)
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


# --------------------------------------------------------------------------- contributions


def contributions_by_site(
    session: Session, filters: ReportFilters, *, rounds: list[RoundRecord]
) -> list[SiteContribution]:
    """Per site: studies and rounds taken part in, samples, epsilon charged on its datasets.

    Rounds count within the time range; epsilon is the ledger's charged epsilon on the
    site's datasets for the selected studies.
    """
    selected = _selected_studies(session, filters)
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
            for line in budgets.show(session, dataset_id).lines:
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


# --------------------------------------------------------------------------- the head


def _latest_witnessed(log: AuditLog, session: Session) -> tuple[int, str] | None:
    """(size, root) of the largest head with a quorum of cosignatures, if any."""
    sizes = session.scalars(
        select(AuditCosignature.tree_size).distinct().order_by(AuditCosignature.tree_size.desc())
    ).all()
    for size in sizes:
        head = log.head_for_size(int(size), session=session)
        if head is not None and is_witnessed(head, log.witness_quorum, session=session):
            return head.tree_size, head.root_hash
    return None


def head_info(
    head: SignedTreeHead, *, log: AuditLog, signer: TreeHeadSigner, session: Session
) -> HeadInfo:
    """Describe ``head``: its signature checked with the server key, its cosigners checked
    with the enrolled sites' keys, whether it is witnessed, and the latest witnessed head."""
    try:
        verify_tree_head(head, signer.public_key)
        signature_valid = True
    except AuditVerificationError:
        signature_valid = False
    site_keys: Mapping[str, str] = {
        site.id: site.signing_public_key for site in session.scalars(select(Site))
    }
    cosigners = []
    for cosignature in cosignatures_for(head, session=session):
        key = site_keys.get(cosignature.site_id)
        try:
            valid = key is not None
            if key is not None:
                verify_cosignature(cosignature, decode_public_key(key))
        except AuditVerificationError:
            valid = False
        cosigners.append(
            Cosigner(site_id=cosignature.site_id, timestamp=cosignature.timestamp, valid=valid)
        )
    witnessed = _latest_witnessed(log, session)
    return HeadInfo(
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp=head.timestamp,
        key_id=head.key_id,
        signature=head.signature,
        server_public_key=signer.public_key_b64,
        signature_valid=signature_valid,
        witnessed=is_witnessed(head, log.witness_quorum, session=session),
        witness_quorum=log.witness_quorum,
        cosigners=cosigners,
        latest_witnessed_size=witnessed[0] if witnessed else None,
        latest_witnessed_root=witnessed[1] if witnessed else None,
    )


# --------------------------------------------------------------------------- the report


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
