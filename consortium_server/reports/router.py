"""/reports: compliance report pages and downloads for compliance officers (and admins).

``GET /reports/compliance`` returns the report as an HTML page; ``?format=pdf|csv|json``
returns it as a download (``Content-Disposition: attachment``). Filters are query
parameters, so every link in the page (filter form, download links) is a plain GET:

``study``    study id
``dataset``  dataset id
``user``     actor subject (OIDC ``sub``)
``from``     ``YYYY-MM-DD`` or an ISO 8601 time (inclusive; a time without zone is UTC)
``to``       ``YYYY-MM-DD`` (that whole day included) or an ISO 8601 time (exclusive)
``section``  for CSV: ``activity`` (default), ``lifecycle``, ``approvals``, ``rounds``,
             ``budget`` or ``contributions``

Authentication: like every Concord endpoint, the request carries
``Authorization: Bearer <token>``; there are no cookies or sessions. A browser therefore
needs something that adds the header to every request of the page: an authenticating
reverse proxy in production (e.g. oauth2-proxy in front of ``/reports``), Playwright's
``extra_http_headers`` in the browser tests. The page is self-contained (style inlined,
chart as a ``data:`` URI), so it makes no further requests, and its links are relative
query strings that the same header covers.

Every view is recorded as a ``report.viewed`` audit entry and every download as
``report.downloaded``; both name the filters, the tree head the report was built on, and
(for downloads) the SHA-256 of the bytes handed out, so a PDF found later can be matched
to the entry that records who took it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from concord_protocol.principals import Role
from consortium_server.api.deps import AuditDep, CurrentPrincipal, SessionDep, require_roles
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import InvalidRequestError
from consortium_server.reports.render import (
    CsvSection,
    render_csv,
    render_html,
    render_json,
    render_pdf,
)
from consortium_server.reports.rows import ComplianceReport, ReportFilters
from consortium_server.reports.service import build_report

__all__ = ["ReportFormat", "parse_time", "router"]

router = APIRouter(prefix="/reports", tags=["reports"])

#: Rows of the activity table in the page and the PDF (exports hold every match).
PAGE_ACTIVITY_LIMIT = 500

#: The page runs no script and loads nothing: everything it shows is inline.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_NO_STORE = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ReportFormat(StrEnum):
    """What ``GET /reports/compliance`` returns."""

    HTML = "html"
    PDF = "pdf"
    CSV = "csv"
    JSON = "json"


def parse_time(value: str | None, *, name: str, end_of_day: bool = False) -> datetime | None:
    """A filter time: empty -> None; ``YYYY-MM-DD`` -> midnight UTC (the next midnight when
    ``end_of_day``); ISO 8601 -> that instant (UTC if no zone). Anything else: 422."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day, time.min, tzinfo=UTC)
            return moment + timedelta(days=1) if end_of_day else moment
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # overflow: the day after 9999-12-31, say
        raise InvalidRequestError(
            f"`{name}` must be a date (YYYY-MM-DD) or an ISO 8601 time between the years 1 "
            f"and 9999, not {text[:40]!r}.",
            code="request.invalid",
            details=[{"field": f"query.{name}", "message": "not a date or time in range"}],
        ) from exc


def _blank(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def _filters(
    study: str | None,
    dataset: str | None,
    user: str | None,
    since: str | None,
    until: str | None,
) -> ReportFilters:
    filters = ReportFilters(
        study_id=_blank(study),
        dataset_id=_blank(dataset),
        user=_blank(user),
        since=parse_time(since, name="from"),
        until=parse_time(until, name="to", end_of_day=True),
    )
    if filters.since and filters.until and filters.since >= filters.until:
        raise InvalidRequestError("`from` must be before `to`.", code="request.invalid")
    return filters


def _filename(report: ComplianceReport, extension: str) -> str:
    stamp = report.generated_at.strftime("%Y%m%dT%H%M%SZ")
    size = report.head.tree_size if report.head else 0
    return f"concord-compliance-{stamp}-log{size}.{extension}"


@router.get(
    "/compliance",
    dependencies=[require_roles(Role.COMPLIANCE_OFFICER, Role.CONSORTIUM_ADMIN)],
    response_class=HTMLResponse,
    responses={
        200: {
            "content": {
                "text/html": {},
                "application/pdf": {},
                "text/csv": {},
                "application/json": {},
            },
            "description": "The report page, or the report as PDF, CSV or JSON.",
        }
    },
)
def compliance_report(
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    study: Annotated[str | None, Query(max_length=64, description="Study id.")] = None,
    dataset: Annotated[str | None, Query(max_length=64, description="Dataset id.")] = None,
    user: Annotated[str | None, Query(max_length=255, description="Actor subject.")] = None,
    since: Annotated[
        str | None, Query(alias="from", max_length=40, description="Start (date or time).")
    ] = None,
    until: Annotated[
        str | None, Query(alias="to", max_length=40, description="End (date or time).")
    ] = None,
    format: Annotated[ReportFormat, Query()] = ReportFormat.HTML,
    section: Annotated[CsvSection, Query(description="CSV only: which table.")] = (
        CsvSection.ACTIVITY
    ),
) -> Response:
    """The compliance report as a page or a download; recorded in the audit log."""
    filters = _filters(study, dataset, user, since, until)
    log: AuditLog = request.app.state.audit_log
    signer: TreeHeadSigner = request.app.state.tree_head_signer
    report = build_report(
        session=session,
        log=log,
        signer=signer,
        filters=filters,
        generated_by=principal.subject,
        activity_limit=PAGE_ACTIVITY_LIMIT
        if format in (ReportFormat.HTML, ReportFormat.PDF)
        else None,
    )
    body: bytes
    if format is ReportFormat.HTML:
        body = render_html(report).encode("utf-8")
        media_type = "text/html; charset=utf-8"
    elif format is ReportFormat.PDF:
        body = render_pdf(report)
        media_type = "application/pdf"
    elif format is ReportFormat.CSV:
        body = render_csv(report, section).encode("utf-8")
        media_type = "text/csv; charset=utf-8"
    else:
        body = render_json(report).encode("utf-8")
        media_type = "application/json"

    details: dict[str, object] = {
        "report": "compliance",
        "format": format.value,
        "filters": filters.query_params(),
        "tree_size": report.head.tree_size if report.head else 0,
        "root_hash": report.head.root_hash if report.head else None,
        "activity_entries": report.activity_total,
    }
    headers = dict(_NO_STORE)
    if format is ReportFormat.HTML:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        action = "report.viewed"
    else:
        if format is ReportFormat.CSV:
            details["section"] = section.value
        details["sha256"] = hashlib.sha256(body).hexdigest()
        details["bytes"] = len(body)
        extension = f"{section.value}.csv" if format is ReportFormat.CSV else format.value
        headers["Content-Disposition"] = f'attachment; filename="{_filename(report, extension)}"'
        action = "report.downloaded"
    audit.record(action, object_type="report", object_id="compliance", details=details)
    return Response(content=body, media_type=media_type, headers=headers)
