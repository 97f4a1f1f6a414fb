"""Engine and session factory. Services flush; the request boundary commits."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "LONG_TRANSACTION_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "make_engine",
    "make_sessionmaker",
    "session_scope",
]

log = logging.getLogger("concord.db")

#: How long a SQLite connection waits for the write lock before the request fails with
#: ``service.unavailable``. Every SQLite transaction takes the lock (``BEGIN IMMEDIATE``),
#: so this bounds how long one slow transaction may hold up all the others. It stays below
#: the API client's 30 s read timeout, so a client sees the 503 (and resends) rather than
#: giving up on a request that is still waiting.
SQLITE_BUSY_TIMEOUT_MS = 20_000

#: A transaction held open longer than this is logged (``db.long_transaction``): on SQLite
#: it blocked every other request for that long.
LONG_TRANSACTION_S = 2.0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def make_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> Engine:
    """Create an engine: SQLite in WAL mode with foreign keys on, or a pooled PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(engine, "connect", _sqlite_pragmas)

        # Serialise writers: BEGIN IMMEDIATE takes the write lock at the start of a
        # transaction instead of failing on upgrade from a read lock.
        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.info["concord_began"] = time.monotonic()

        @event.listens_for(engine, "connect")
        def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        _log_long_transactions(engine)
        return engine
    engine = create_engine(
        url, echo=echo, pool_size=pool_size, pool_pre_ping=True, max_overflow=pool_size
    )

    @event.listens_for(engine, "begin")
    def _mark_begin(conn: Any) -> None:
        conn.info["concord_began"] = time.monotonic()

    _log_long_transactions(engine)
    return engine


def _log_long_transactions(engine: Engine) -> None:
    """Warn about transactions that stayed open longer than :data:`LONG_TRANSACTION_S`."""

    def _ended(conn: Any, outcome: str) -> None:
        began = conn.info.pop("concord_began", None)
        if began is None:
            return
        held = time.monotonic() - began
        if held > LONG_TRANSACTION_S:
            log.warning(
                "long transaction",
                extra={
                    "event": "db.long_transaction",
                    "held_s": round(held, 3),
                    "outcome": outcome,
                },
            )

    event.listen(engine, "commit", lambda conn: _ended(conn, "commit"))
    event.listen(engine, "rollback", lambda conn: _ended(conn, "rollback"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A unit of work outside a request (CLI, background jobs): commit or roll back."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
