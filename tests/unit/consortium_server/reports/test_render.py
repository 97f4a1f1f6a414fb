"""Rendering a report: HTML with the chart inline, PDF, CSV sections, JSON."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from consortium_server.reports.charts import epsilon_chart_data_uri, epsilon_chart_png
from consortium_server.reports.render import (
    CSV_COLUMNS,
    JSON_FORMAT,
    CsvSection,
    render_csv,
    render_html,
    render_json,
    render_pdf,
)
from consortium_server.reports.rows import ComplianceReport, ReportFilters
from consortium_server.reports.service import build_report
from tests.unit.consortium_server.reports.world import ReportWorld, spent


@pytest.fixture
def built(app: FastAPI, world: ReportWorld) -> ComplianceReport:
    with app.state.sessionmaker() as session:
        report = build_report(
            session=session,
            log=app.state.audit_log,
            signer=app.state.tree_head_signer,
            filters=ReportFilters(),
            generated_by="carla-compliance",
        )
        session.commit()
    return report


def pdf_text(pdf: bytes, report: ComplianceReport, tmp_path: Path) -> str:
    """Text of the PDF with pdftotext (poppler) where installed; otherwise the text of the
    pages WeasyPrint lays out for the same report (what ``render_pdf`` writes)."""
    tool = shutil.which("pdftotext")
    if tool is not None:
        path = tmp_path / "report.pdf"
        path.write_bytes(pdf)
        done = subprocess.run([tool, str(path), "-"], capture_output=True, check=True)
        return done.stdout.decode("utf-8")
    from weasyprint import HTML

    texts: list[str] = []

    def walk(box: Any) -> None:
        if isinstance(getattr(box, "text", None), str):
            texts.append(box.text)
        for child in box.all_children() if hasattr(box, "all_children") else ():
            walk(child)

    for page in HTML(string=render_html(report, for_pdf=True)).render().pages:
        walk(page._page_box)
    return " ".join(texts)


def test_html_is_self_contained_with_the_chart(built: ComplianceReport, world: ReportWorld) -> None:
    html = render_html(built)
    assert "<title>Concord compliance report</title>" in html
    assert world.main_title in html
    assert 'id="filters"' in html
    assert 'id="download-pdf" href="?format=pdf"' in html
    match = re.search(r'id="epsilon-chart" src="data:image/png;base64,([^"]+)"', html)
    assert match is not None
    assert base64.b64decode(match.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    # Nothing to fetch: no external style sheets, scripts or images.
    assert not re.search(r'(src|href)="(https?:|//|/)', html)
    assert "<script" not in html
    # Autoescaped: a reason is text, never markup.
    assert "Cohort overlaps with a running trial." in html


def test_each_study_shows_its_evaluation_cost_what_is_public_and_each_rounds_metrics(
    built: ComplianceReport, world: ReportWorld
) -> None:
    """A compliance officer reads, per study, how its evaluation was released and what it
    cost, what the sites released without DP, and each round's noisy metrics."""
    html = render_html(built)
    main = next(s for s in built.lifecycles if s.title == world.main_title)
    assert main.evaluation.startswith("noisy test-split histogram, one per round trained (3)")
    assert "alone the releases cost epsilon 0.6" in main.evaluation
    assert "record count" in main.public
    assert main.rounds[0].evaluation["accuracy"] == pytest.approx(0.81)
    assert 'class="evaluation-cost"' in html
    assert "Declared public (no DP)" in html
    assert "accuracy 0.810, auc 0.900, noise-sd 12.500" in html
    rounds_csv = list(csv.reader(io.StringIO(render_csv(built, CsvSection.ROUNDS))))
    assert rounds_csv[0][-1] == "evaluation"
    assert "accuracy" in rounds_csv[1][-1]


def test_html_for_pdf_has_no_form(built: ComplianceReport) -> None:
    html = render_html(built, for_pdf=True)
    assert 'id="filters"' not in html
    assert "download-pdf" not in html


def test_filtered_links_keep_the_filters(built: ComplianceReport) -> None:
    filtered = built.model_copy(update={"filters": ReportFilters(study_id="s 1", user="a&b")})
    html = render_html(filtered, chart_uri=None)
    assert 'href="?study=s+1&amp;user=a%26b&amp;format=pdf"' in html


def test_pdf(built: ComplianceReport, world: ReportWorld, tmp_path: Path) -> None:
    pdf = render_pdf(built)
    assert pdf.startswith(b"%PDF-")
    assert pdf.rstrip().endswith(b"%%EOF")
    text = pdf_text(pdf, built, tmp_path)
    assert "Concord compliance report" in text
    assert world.main_title in text
    assert "Tumour grading pilot" in text
    assert built.head is not None
    assert built.head.root_hash in text


def test_csv_sections(built: ComplianceReport, world: ReportWorld) -> None:
    for section in CsvSection:
        rows = list(csv.reader(io.StringIO(render_csv(built, section))))
        assert tuple(rows[0]) == CSV_COLUMNS[section], section
        assert all(len(row) == len(rows[0]) for row in rows), section

    activity = list(csv.DictReader(io.StringIO(render_csv(built))))
    assert len(activity) == built.activity_total
    assert sum(row["action"] == "round.completed" for row in activity) == 5

    budget = {
        row["dataset_id"]: row
        for row in csv.DictReader(io.StringIO(render_csv(built, CsvSection.BUDGET)))
    }
    assert budget["bc-a"]["epsilon_cap"] == "10"
    assert budget["bc-a"]["epsilon_spent"] == str(spent("bc-a"))
    assert budget["bc-a"]["reconciled"] == "true"

    approvals = list(csv.DictReader(io.StringIO(render_csv(built, CsvSection.APPROVALS))))
    declined = [row for row in approvals if row["decision"] == "declined"]
    assert [(row["site_id"], row["decided_by"]) for row in declined] == [
        ("hospital-b", "steward-b")
    ]
    rounds = list(csv.DictReader(io.StringIO(render_csv(built, CsvSection.ROUNDS))))
    assert [row["round"] for row in rounds if row["study_id"] == world.main_study["id"]] == [
        "1",
        "2",
        "3",
    ]
    sites = list(csv.DictReader(io.StringIO(render_csv(built, CsvSection.CONTRIBUTIONS))))
    assert {row["site_id"]: row["samples"] for row in sites}["hospital-c"] == str(2 * 227)


def test_csv_defuses_formulas(built: ComplianceReport) -> None:
    row = built.activity[0].model_copy(update={"summary": '=HYPERLINK("x")', "actor": "@me"})
    report = built.model_copy(update={"activity": [row], "activity_total": 1})
    parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert parsed[0]["summary"] == '\'=HYPERLINK("x")'
    assert parsed[0]["actor"] == "'@me"


def test_json(built: ComplianceReport, world: ReportWorld) -> None:
    data = json.loads(render_json(built))
    assert data["format"] == JSON_FORMAT
    assert data["generated_by"] == "carla-compliance"
    assert data["head"]["tree_size"] == built.head.tree_size if built.head else False
    assert data["head"]["witnessed"] is True
    budget = next(b for b in data["budgets"] if b["dataset_id"] == "bc-a")
    assert budget["epsilon_cap"] == "10"  # plain decimal strings, never 1E+1 or floats
    assert budget["epsilon_spent"] == str(spent("bc-a"))
    assert budget["series"][0]["at"].endswith("Z")
    assert len(data["activity"]) == built.activity_total
    assert "study_choices" not in data
    assert {s["title"] for s in data["lifecycles"]} >= {world.main_title}


def test_chart(built: ComplianceReport) -> None:
    png = epsilon_chart_png(built.budgets)
    assert png is not None
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    empty = [b.model_copy(update={"series": []}) for b in built.budgets]
    assert epsilon_chart_png(empty) is None
    assert epsilon_chart_data_uri(empty) is None
    html = render_html(built.model_copy(update={"budgets": empty}))
    assert 'id="no-chart"' in html
    assert 'id="epsilon-chart"' not in html
