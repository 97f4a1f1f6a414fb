"""Rendering a :class:`~consortium_server.reports.rows.ComplianceReport`: HTML (Jinja2),
PDF (WeasyPrint), CSV (one section per file) and JSON.

HTML and PDF come from the same template (``templates/compliance.html``) with the style
sheet (``static/report.css``) inlined and the chart embedded as a ``data:`` URI, so a page
is one self-contained response and WeasyPrint never fetches anything: its URL fetcher
allows no protocol but ``data:``.

CSV cells that a spreadsheet would run as a formula (starting with ``= + - @``, tab or
carriage return) are prefixed with ``'``: report fields include free text (reasons) that
people outside the compliance office typed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from consortium_server.reports.charts import epsilon_chart_data_uri
from consortium_server.reports.rows import ComplianceReport

__all__ = [
    "CSV_COLUMNS",
    "JSON_FORMAT",
    "CsvSection",
    "render_csv",
    "render_html",
    "render_json",
    "render_pdf",
]

#: ``format`` field of the JSON export.
JSON_FORMAT = "concord.compliance_report.v1"


class CsvSection(StrEnum):
    """Which table a CSV export holds (``?format=csv&section=...``)."""

    ACTIVITY = "activity"
    LIFECYCLE = "lifecycle"
    APPROVALS = "approvals"
    ROUNDS = "rounds"
    BUDGET = "budget"
    CONTRIBUTIONS = "contributions"


#: The header row of each CSV section.
CSV_COLUMNS: dict[CsvSection, tuple[str, ...]] = {
    CsvSection.ACTIVITY: (
        "index",
        "at",
        "actor",
        "organisation",
        "roles",
        "action",
        "object_type",
        "object_id",
        "outcome",
        "purpose",
        "policy_decision",
        "contract_hash",
        "summary",
    ),
    CsvSection.LIFECYCLE: (
        "study_id",
        "title",
        "at",
        "from_state",
        "to_state",
        "actor",
        "organisation",
        "reason",
        "audit_index",
    ),
    CsvSection.APPROVALS: (
        "study_id",
        "site_id",
        "decision",
        "decided_by",
        "decided_at",
        "reason",
        "contract_hash",
        "matches_contract",
    ),
    CsvSection.ROUNDS: (
        "study_id",
        "round",
        "at",
        "participants",
        "samples",
        "epsilon",
        "ciphertext_digests",
        "audit_index",
        "evaluation",
    ),
    CsvSection.BUDGET: (
        "dataset_id",
        "site_id",
        "epsilon_cap",
        "epsilon_spent",
        "epsilon_reserved",
        "epsilon_remaining",
        "epsilon_charged",
        "epsilon_audited",
        "reconciled",
        "delta_cap",
        "delta_spent",
        "delta_reserved",
    ),
    CsvSection.CONTRIBUTIONS: (
        "site_id",
        "display_name",
        "studies",
        "rounds",
        "samples",
        "epsilon",
        "datasets",
    ),
}

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# --------------------------------------------------------------------------- formatting


def fmt_time(value: datetime | None) -> str:
    """``2026-05-01 12:00:03 UTC`` (empty for None)."""
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_decimal(value: Decimal | float | None) -> str:
    """A decimal without trailing zeros (``3``, ``1.25``, ``0.00001``)."""
    if value is None:
        return ""
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    text = format(amount.normalize(), "f")
    return text


def fmt_hash(value: str | None, length: int = 12) -> str:
    """The first ``length`` hex digits and an ellipsis."""
    if not value:
        return ""
    return value if len(value) <= length else value[:length] + "…"


# --------------------------------------------------------------------------- HTML and PDF


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("consortium_server.reports", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = fmt_time
    env.filters["eps"] = fmt_decimal
    env.filters["short"] = fmt_hash
    return env


@cache
def _stylesheet() -> str:
    return (
        resources.files("consortium_server.reports")
        .joinpath("static/report.css")
        .read_text(encoding="utf-8")
    )


def render_html(
    report: ComplianceReport, *, for_pdf: bool = False, chart_uri: str | None = None
) -> str:
    """The report page. ``for_pdf`` leaves out the filter form and the download links.

    ``chart_uri`` (a ``data:`` URI) is drawn from the report when not given.
    """
    if chart_uri is None:
        chart_uri = epsilon_chart_data_uri(report.budgets)
    template = _environment().get_template("compliance.html")
    return template.render(
        report=report,
        filters=report.filters,
        chart_uri=chart_uri,
        for_pdf=for_pdf,
        stylesheet=_stylesheet(),
        verify_command=_verify_command(report),
    )


def _verify_command(report: ComplianceReport) -> str:
    key = report.head.server_public_key if report.head else "<server public key>"
    return (
        f"consortium audit verify --file audit-export.json --server-key {key} "
        "--site-keys site-keys.json --quorum 2"
    )


def render_pdf(report: ComplianceReport) -> bytes:
    """The report as a PDF (WeasyPrint), with the report's metadata in the PDF info."""
    from weasyprint import HTML  # imported late: loading pango takes a while
    from weasyprint.urls import URLFetcher

    html = render_html(report, for_pdf=True)
    # Only data: URIs (the chart); anything else in the page would be refused, not fetched.
    fetcher = URLFetcher(allowed_protocols={"data"}, allow_redirects=False, timeout=1)
    pdf = HTML(string=html, base_url=None, url_fetcher=fetcher).write_pdf()
    if not isinstance(pdf, bytes):
        raise TypeError("WeasyPrint returned no PDF bytes")
    return pdf


# --------------------------------------------------------------------------- CSV and JSON


def _cell(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, datetime):
        text = value.isoformat().replace("+00:00", "Z")
    elif isinstance(value, Decimal | float):
        text = fmt_decimal(value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = ";".join(_cell(v) for v in value)
    elif isinstance(value, dict):
        text = ";".join(f"{k}={_cell(v)}" for k, v in value.items())
    else:
        text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _rows(report: ComplianceReport, section: CsvSection) -> Iterable[Sequence[Any]]:
    if section is CsvSection.ACTIVITY:
        for row in report.activity:
            yield [getattr(row, column) for column in CSV_COLUMNS[section]]
    elif section is CsvSection.LIFECYCLE:
        for study in report.lifecycles:
            for event in study.events:
                yield [
                    study.study_id,
                    study.title,
                    event.at,
                    event.from_state,
                    event.to_state,
                    event.actor,
                    event.organisation,
                    event.reason,
                    event.audit_index,
                ]
    elif section is CsvSection.APPROVALS:
        for study in report.lifecycles:
            for approval in study.approvals:
                yield [
                    study.study_id,
                    approval.site_id,
                    approval.decision,
                    approval.decided_by,
                    approval.decided_at,
                    approval.reason,
                    approval.contract_hash,
                    approval.matches_contract,
                ]
    elif section is CsvSection.ROUNDS:
        for study in report.lifecycles:
            for record in study.rounds:
                yield [
                    study.study_id,
                    record.round,
                    record.at,
                    record.participants,
                    record.samples,
                    record.epsilon,
                    record.digests,
                    record.audit_index,
                    record.evaluation,
                ]
    elif section is CsvSection.BUDGET:
        for budget in report.budgets:
            yield [getattr(budget, column) for column in CSV_COLUMNS[section]]
    else:
        for site in report.contributions:
            yield [getattr(site, column) for column in CSV_COLUMNS[section]]


def render_csv(report: ComplianceReport, section: CsvSection = CsvSection.ACTIVITY) -> str:
    """One section of the report as CSV (RFC 4180, header row first, CRLF line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS[section])
    for row in _rows(report, section):
        writer.writerow([_cell(value) for value in row])
    return buffer.getvalue()


def render_json(report: ComplianceReport) -> str:
    """The whole report as JSON: ``{"format": "concord.compliance_report.v1", ...}``.

    Amounts are decimal strings and times ISO 8601 UTC, as in the ledger's own views.
    """
    data = report.model_dump(mode="json", exclude={"study_choices", "dataset_choices"})
    return json.dumps({"format": JSON_FORMAT, **data}, indent=2, ensure_ascii=False)
