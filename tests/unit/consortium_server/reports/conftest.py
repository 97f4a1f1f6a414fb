"""Fixtures for report tests: a consortium with studies, rounds, charges and a witnessed head."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.world import People
from tests.unit.consortium_server.reports.world import ReportWorld, populate


@pytest.fixture
def world(client: TestClient, people: People, app: FastAPI) -> ReportWorld:
    """Three hospitals, two approved studies with rounds, one declined study."""
    return populate(client, people, app)
