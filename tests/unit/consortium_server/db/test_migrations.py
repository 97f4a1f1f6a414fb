"""Migrations build the schema the models describe, on both backends."""

from __future__ import annotations

from sqlalchemy import Engine, inspect

from consortium_server.db.migrate import current_revision, head_revision, schema_drift
from consortium_server.db.models import Base


def test_database_is_at_head(db_engine: Engine) -> None:
    assert current_revision(db_engine) == head_revision()


def test_migrations_match_models(db_engine: Engine) -> None:
    assert schema_drift(db_engine) == []


def test_every_model_table_exists(db_engine: Engine) -> None:
    tables = set(inspect(db_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
