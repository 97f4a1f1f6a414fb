"""The compliance report in a real browser: Debian's Chromium driven by Playwright.

The server runs in-process under uvicorn on a free port (SQLite, local issuer); the
consortium and its history are built through the API plus rounds appended to the audit
log. The browser authenticates the way the page is documented to: every request of the
browser context carries ``Authorization: Bearer <token>`` (``extra_http_headers``).

Screenshots go to ``docs/images/`` when ``CONCORD_WRITE_SCREENSHOTS=1`` (that is how the
pictures in ``docs/compliance.md`` are made), otherwise to the test's tmp directory.
Chromium comes from Debian (``scripts/ensure-chromium.sh``); ``playwright install`` is never
used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright
from sqlalchemy import select

from concord_protocol.audit.entries import AuditEntry
from consortium_server.audit.models import AuditLeaf
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People
from tests.unit.consortium_server.reports.world import ReportWorld, populate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1360, "height": 900}


@dataclass
class LiveServer:
    """A running server: its base URL, the app, token minting, the populated world."""

    url: str
    app: FastAPI
    people: People
    world: ReportWorld


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """The consortium server under uvicorn in a thread, with a populated consortium."""
    port = _free_port()
    settings = ServerSettings(
        data_dir=tmp_path / "server",
        database={"url": f"sqlite:///{tmp_path / 'concord.db'}", "auto_migrate": True},
        policy={"member_organisations": ["University of Leiden"]},
        log_json=True,
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"

    def mint(**claims: Any) -> str:
        return str(app.state.local_issuer.mint(audience="concord-api", **claims))

    people = People(mint=mint)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            world = populate(client, people, app)
        yield LiveServer(url, app, people, world)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, launched by Playwright."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Chromium is not installed: run `bash scripts/ensure-chromium.sh`")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: docs/images when asked to write them, else tmp."""
    if os.environ.get("CONCORD_WRITE_SCREENSHOTS") == "1":
        return REPO / "docs" / "images"
    return tmp_path / "screenshots"


def _open(browser: Browser, headers: dict[str, str]) -> Page:
    context = browser.new_context(
        extra_http_headers=headers,
        accept_downloads=True,
        viewport=VIEWPORT,
    )
    return context.new_page()


def _pdf_text(pdf: Path) -> str | None:
    """The PDF's text with pdftotext (poppler), or None where it is not installed."""
    tool = shutil.which("pdftotext")
    if tool is None:
        return None
    done = subprocess.run([tool, "-layout", str(pdf), "-"], capture_output=True, check=True)
    return done.stdout.decode("utf-8")


def _report_entries(app: FastAPI) -> list[AuditEntry]:
    with app.state.sessionmaker() as session:
        rows = session.scalars(
            select(AuditLeaf).where(AuditLeaf.action.like("report.%")).order_by(AuditLeaf.index)
        ).all()
        return [AuditEntry.from_canonical_bytes(bytes(row.entry)) for row in rows]


def test_compliance_officer_reads_filters_and_downloads(
    live_server: LiveServer, browser: Browser, shots: Path, tmp_path: Path
) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    world = live_server.world
    main_id = world.main_study["id"]
    page = _open(browser, live_server.people.compliance)

    response = page.goto(f"{live_server.url}/reports/compliance")
    assert response is not None
    assert response.status == 200
    assert page.locator("h1").inner_text() == "Concord compliance report"
    everything = page.locator("#activity-table tr.activity-row").count()
    assert everything >= 20
    assert page.locator("#lifecycles article.study").count() == 3
    chart = page.locator("#epsilon-chart")
    assert chart.is_visible()
    assert page.evaluate("document.getElementById('epsilon-chart').naturalWidth") > 300
    assert "✔ yes" in page.locator("#head-witnessed").inner_text()
    page.locator("#head").screenshot(path=str(shots / "compliance-head.png"))

    # Filter by study through the form, as a person would.
    page.select_option("#filter-study", main_id)
    with page.expect_navigation():
        page.click("#apply-filters")
    assert f"study={main_id}" in page.url
    assert main_id in page.locator("#scope").inner_text()
    rows = page.locator("#activity-table tr.activity-row")
    assert 0 < rows.count() < everything
    objects = set(rows.evaluate_all("rows => rows.map(r => r.dataset.object)"))
    assert objects == {f"study:{main_id}"}
    actions = rows.evaluate_all("rows => rows.map(r => r.dataset.action)")
    assert actions.count("round.completed") == 3
    assert page.locator("#lifecycles article.study").count() == 1
    assert world.main_title in page.locator("#lifecycles").inner_text()
    assert "Tumour grading pilot" not in page.locator("#lifecycles").inner_text()
    budget_rows = page.locator("#budget-table tr.budget-row")
    assert budget_rows.count() == 3
    assert budget_rows.first.locator("td").nth(3).inner_text() == "3.4"  # ledger: both studies
    assert page.locator("#epsilon-chart").is_visible()
    assert page.evaluate("document.getElementById('epsilon-chart').complete")
    page.screenshot(path=str(shots / "compliance-report.png"), full_page=True)
    page.locator("#budget").screenshot(path=str(shots / "compliance-budget.png"))
    page.locator("#filters").screenshot(path=str(shots / "compliance-filters.png"))

    # Download the PDF of the filtered report, with the same header.
    with page.expect_download() as download_info:
        page.click("#download-pdf")
    download = download_info.value
    assert download.suggested_filename.startswith("concord-compliance-")
    assert download.suggested_filename.endswith(".pdf")
    pdf = tmp_path / "report.pdf"
    download.save_as(pdf)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(data) > 20_000  # pages of tables and an embedded PNG chart
    text = _pdf_text(pdf)
    if text is not None:
        assert world.main_title in text
        assert "Tumour grading pilot" not in text

    entries = _report_entries(live_server.app)
    viewed = [e for e in entries if e.action == "report.viewed"]
    downloaded = [e for e in entries if e.action == "report.downloaded"]
    assert [e.actor.subject for e in viewed] == ["carla-compliance", "carla-compliance"]
    assert viewed[1].details["filters"] == {"study": main_id}
    assert len(downloaded) == 1
    assert downloaded[0].details["format"] == "pdf"
    assert downloaded[0].details["sha256"] == hashlib.sha256(data).hexdigest()


def test_researcher_gets_403(live_server: LiveServer, browser: Browser) -> None:
    page = _open(browser, live_server.people.researcher)
    response = page.goto(f"{live_server.url}/reports/compliance")
    assert response is not None
    assert response.status == 403
    assert "auth.forbidden" in page.content()
    response = page.goto(f"{live_server.url}/reports/compliance?format=pdf")
    assert response is not None
    assert response.status == 403
    assert not [e for e in _report_entries(live_server.app) if e.actor.subject == "rita-researcher"]
