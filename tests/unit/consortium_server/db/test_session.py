"""The SQLite engine: every transaction takes the write lock and waits for it (bounded),
and a transaction that holds it long is logged for the operator."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from consortium_server.db import session as db_session
from consortium_server.db.session import SQLITE_BUSY_TIMEOUT_MS, make_engine


def test_sqlite_waits_for_the_write_lock_rather_than_failing_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
    holder = sqlite3.connect(tmp_path / "c.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.5, holder.execute, args=("COMMIT",))
    released.start()
    try:
        started = time.monotonic()
        with engine.begin() as conn:  # BEGIN IMMEDIATE: blocks until the holder commits
            conn.execute(text("SELECT 1"))
        assert time.monotonic() - started >= 0.4
    finally:
        released.join()
        holder.close()


def test_a_lock_held_past_the_busy_timeout_is_an_operational_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_session, "SQLITE_BUSY_TIMEOUT_MS", 100)
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    holder = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_long_transaction_is_logged_with_how_long_it_held(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(db_session, "LONG_TRANSACTION_S", 0.2)
    engine = make_engine(db_url)
    with caplog.at_level(logging.WARNING, logger="concord.db"):
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert not [r for r in caplog.records if r.name == "concord.db"]
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            time.sleep(0.3)
    [record] = [r for r in caplog.records if r.name == "concord.db"]
    assert record.event == "db.long_transaction"  # type: ignore[attr-defined]
    assert record.held_s >= 0.3  # type: ignore[attr-defined]
    assert record.outcome == "commit"  # type: ignore[attr-defined]
    engine.dispose()
