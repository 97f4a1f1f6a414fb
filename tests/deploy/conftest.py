"""Fixtures of the deployment tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the server CONCORD_TEST_POSTGRES_URL names (the
    operator's database), dropped afterwards."""
    admin_url = os.environ.get("CONCORD_TEST_POSTGRES_URL", "")
    if not admin_url:
        pytest.fail("CONCORD_TEST_POSTGRES_URL is not set (the Makefile sets it)")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"concord_helm_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
