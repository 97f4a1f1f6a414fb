"""Compliance reports: who did what, study lifecycles, privacy budgets, site contributions,
and the signed tree head they rest on; as web pages, PDF, CSV and JSON (``/reports``).

``service`` builds the report data, ``charts`` draws epsilon over time, ``render`` turns a
report into HTML/PDF/CSV/JSON, ``router`` serves it to compliance officers and records
every view and download in the audit log.
"""

from __future__ import annotations

from consortium_server.reports.service import (
    ROUND_ACTION,
    ComplianceReport,
    ReportFilters,
    build_report,
)

__all__ = ["ROUND_ACTION", "ComplianceReport", "ReportFilters", "build_report"]
