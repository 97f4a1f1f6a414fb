"""Shared fixtures: databases on both backends.

``db_backend`` runs a test on SQLite and on PostgreSQL. The PostgreSQL tier uses the server
named by ``CONCORD_TEST_POSTGRES_URL`` (``make test`` sets it to the local server at
127.0.0.1:5432); a throwaway database is created for the session and dropped after. If the
variable is set but the server does not answer, the tests fail: the tier is never skipped
silently.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from consortium_server.db.session import make_engine

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

POSTGRES_ADMIN_URL = os.environ.get("CONCORD_TEST_POSTGRES_URL", "")


def _create_schema(engine: Engine) -> None:
    from consortium_server.db.migrate import upgrade_to_head

    upgrade_to_head(engine)


@pytest.fixture(scope="session")
def _postgres_database() -> Iterator[str]:
    if not POSTGRES_ADMIN_URL:
        pytest.fail(
            "CONCORD_TEST_POSTGRES_URL is not set: run the PostgreSQL tier through `make test`, "
            "or deselect it with -m 'not postgres'"
        )
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"concord_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    _create_schema(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    _create_schema(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    """Name of the backend a test runs on: ``sqlite`` or ``postgres``."""
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty, migrated database on the test's backend."""
    if db_backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "concord.db"
        path.write_bytes(template.read_bytes())
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("_postgres_database")
    yield url
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = (
            conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version'"
                )
            )
            .scalars()
            .all()
        )
        if tables:
            conn.execute(
                text(
                    f"TRUNCATE {', '.join(map(repr, tables))} RESTART IDENTITY CASCADE".replace(
                        "'", '"'
                    )
                )
            )
    engine.dispose()


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine on an empty, migrated database (SQLite and PostgreSQL)."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()
