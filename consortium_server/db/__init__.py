"""Persistence: declarative base, engine and session handling, Alembic migrations."""
