"""GET /reports/compliance: who may see it, filters, formats, and the audit of every view."""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from concord_protocol.audit.entries import AuditEntry
from consortium_server.audit.models import AuditLeaf
from consortium_server.reports.render import CSV_COLUMNS, CsvSection
from tests.support.world import People
from tests.unit.consortium_server.reports.world import ReportWorld

URL = "/reports/compliance"


def report_entries(app: FastAPI) -> list[AuditEntry]:
    with app.state.sessionmaker() as session:
        rows = session.scalars(
            select(AuditLeaf).where(AuditLeaf.action.like("report.%")).order_by(AuditLeaf.index)
        ).all()
        return [AuditEntry.from_canonical_bytes(bytes(row.entry)) for row in rows]


def test_compliance_officer_and_admin_see_the_page(
    client: TestClient, people: People, world: ReportWorld
) -> None:
    for headers in (people.compliance, people.admin):
        response = client.get(URL, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert world.main_title in response.text
        assert 'id="epsilon-chart"' in response.text


@pytest.mark.parametrize("who", ["researcher", "steward", "node"])
def test_other_roles_get_403(
    client: TestClient, people: People, app: FastAPI, world: ReportWorld, who: str
) -> None:
    headers = {
        "researcher": people.researcher,
        "steward": people.steward("a"),
        "node": people.node("a"),
    }[who]
    for query in ("", "?format=pdf", "?format=csv", "?format=json"):
        response = client.get(URL + query, headers=headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "auth.forbidden"
    assert report_entries(app) == []


def test_no_token_is_401(client: TestClient) -> None:
    response = client.get(URL)
    assert response.status_code == 401


def test_filters(client: TestClient, people: People, world: ReportWorld) -> None:
    main_id = world.main_study["id"]
    response = client.get(URL, params={"study": main_id}, headers=people.compliance)
    assert response.status_code == 200
    assert world.main_title in response.text
    assert "Tumour grading pilot</h3>" not in response.text
    assert f'data-object="study:{main_id}"' in response.text
    assert 'data-object="study:' + world.pilot_study["id"] not in response.text

    rows = client.get(
        URL, params={"user": "steward-b", "format": "csv"}, headers=people.compliance
    ).text
    actors = {row["actor"] for row in csv.DictReader(io.StringIO(rows))}
    assert actors == {"steward-b"}

    data = client.get(
        URL, params={"dataset": "bc-c", "format": "json"}, headers=people.compliance
    ).json()
    assert [b["dataset_id"] for b in data["budgets"]] == ["bc-c"]

    data = client.get(
        URL,
        params={"from": "2000-01-01", "to": "2000-01-31", "format": "json"},
        headers=people.compliance,
    ).json()
    assert data["activity"] == []
    assert data["filters"]["until"] == "2000-02-01T00:00:00Z"  # `to` is a whole day

    # The form submits empty fields: they mean "no filter".
    response = client.get(
        URL,
        params={"study": "", "dataset": "", "user": "", "from": "", "to": ""},
        headers=people.compliance,
    )
    assert response.status_code == 200
    assert "everything (no filter)" in response.text


@pytest.mark.parametrize(
    "params",
    [
        {"from": "yesterday"},
        {"from": "2026-02-01", "to": "2026-01-01"},
        {"format": "docx"},
        {"format": "csv", "section": "patients"},
        {"to": "9999-12-31"},  # the day after is beyond datetime
        {"from": "0001-01-01T00:00:00+05:00"},  # before year 1 in UTC
        {"to": "9999-12-31T23:00:00-05:00"},  # after 9999 in UTC
    ],
)
def test_bad_parameters_are_422(
    client: TestClient, people: People, world: ReportWorld, params: dict[str, str]
) -> None:
    response = client.get(URL, params=params, headers=people.compliance)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "request.invalid"
    assert response.json()["error"]["request_id"]


def test_downloads(client: TestClient, people: People, world: ReportWorld) -> None:
    pdf = client.get(URL, params={"format": "pdf"}, headers=people.compliance)
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-")
    disposition = pdf.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="concord-compliance-')
    assert disposition.endswith('.pdf"')

    for section in CsvSection:
        response = client.get(
            URL, params={"format": "csv", "section": section.value}, headers=people.compliance
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert f'.{section.value}.csv"' in response.headers["content-disposition"]
        header = next(csv.reader(io.StringIO(response.text)))
        assert tuple(header) == CSV_COLUMNS[section]

    data = client.get(URL, params={"format": "json"}, headers=people.compliance).json()
    assert data["format"] == "concord.compliance_report.v1"
    assert {c["site_id"] for c in data["contributions"]} == {
        "hospital-a",
        "hospital-b",
        "hospital-c",
    }


def test_views_and_downloads_are_audited(
    client: TestClient, people: People, app: FastAPI, world: ReportWorld
) -> None:
    main_id = world.main_study["id"]
    client.get(URL, params={"study": main_id}, headers=people.compliance)
    csv_response = client.get(
        URL, params={"study": main_id, "format": "csv", "section": "budget"}, headers=people.admin
    )
    entries = report_entries(app)
    assert [e.action for e in entries] == ["report.viewed", "report.downloaded"]
    viewed, downloaded = entries
    assert viewed.actor.subject == "carla-compliance"
    assert viewed.actor.roles == ("compliance_officer",)
    assert (viewed.object.type, viewed.object.id) == ("report", "compliance")
    details: dict[str, Any] = viewed.details
    assert details["filters"] == {"study": main_id}
    assert details["format"] == "html"
    assert details["tree_size"] > 0
    assert len(details["root_hash"]) == 64
    assert downloaded.actor.subject == "olga-operator"
    assert downloaded.details["format"] == "csv"
    assert downloaded.details["section"] == "budget"
    assert downloaded.details["sha256"] == hashlib.sha256(csv_response.content).hexdigest()
    assert downloaded.details["bytes"] == len(csv_response.content)
    # The second report is built on a head that already covers the first view.
    assert downloaded.details["tree_size"] > viewed.details["tree_size"]
