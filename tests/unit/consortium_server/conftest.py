"""Fixtures for server tests: an app on each database backend and tokens from its issuer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People, build_consortium


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> ServerSettings:
    """Development settings on the test's database, with small limits."""
    return ServerSettings(
        data_dir=tmp_path / "server",
        database={"url": db_url, "auto_migrate": False},  # type: ignore[arg-type]
        api={"max_body_bytes": 64 * 1024},  # type: ignore[arg-type]
        policy={"member_organisations": ["University of Leiden", "University of Ghent"]},  # type: ignore[arg-type]
        log_json=True,
    )


@pytest.fixture
def app(settings: ServerSettings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def people(client: TestClient, app: FastAPI) -> People:
    """Tokens minted by the app's local issuer."""

    def mint(**claims: Any) -> str:
        return str(app.state.local_issuer.mint(audience="concord-api", **claims))

    return People(mint=mint)


@pytest.fixture
def consortium(client: TestClient, people: People) -> People:
    """Three enrolled hospitals with one dataset each."""
    build_consortium(client, people)
    return people
