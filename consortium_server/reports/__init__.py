"""Compliance reports: who did what, study lifecycles, privacy budgets, site contributions,
and the signed tree head they rest on; as web pages, PDF, CSV and JSON (``/reports``).

``service`` builds the report from its sections (``activity``, ``lifecycles``, ``budgets``,
``contributions``, ``head``), which read the audit log's rounds through ``rounds`` and the
studies the filters select through ``selection``; ``rows`` holds the report as plain data.
``charts`` draws epsilon over time, ``render`` turns a report into HTML/PDF/CSV/JSON,
``router`` serves it to compliance officers and records every view and download in the
audit log.
"""

from __future__ import annotations

from consortium_server.reports.rounds import ROUND_ACTION
from consortium_server.reports.rows import ComplianceReport, ReportFilters
from consortium_server.reports.service import build_report

__all__ = ["ROUND_ACTION", "ComplianceReport", "ReportFilters", "build_report"]
