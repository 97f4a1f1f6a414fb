"""Which run is working on a running study, and when its ServerApp was last heard from.

A running study has one row: its current *attempt* (a random id the server puts in the
Flower run config), the Flower run id once ``flwr run`` returned it, the round the attempt
started at, and ``last_contact_at``, moved by every heartbeat and round report of the
attempt's ServerApp. The ServerApp names its attempt in every call, so the reports of a run
the server gave up on are refused rather than recorded.

A run whose ServerApp has been silent for longer than the liveness window is replaced by a
new attempt from the last recorded round (:func:`replace_stale`): one conditional
``UPDATE``, so with several server replicas exactly one wins, on SQLite and PostgreSQL
alike, and nothing needs to hold a lease. ``restarts`` counts attempts started since the
last recorded round; the run manager gives up on a study that keeps failing to make
progress. Functions take a session and flush; the caller commits.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Integer, String, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from consortium_server.db.base import Base, UTCDateTime, utcnow

__all__ = ["StudyRun", "current_run", "new_attempt", "replace_stale", "silence_attempt", "touch"]


def _attempt_id() -> str:
    return secrets.token_hex(16)


class StudyRun(Base):
    """The attempt now running a study (one row per study that ever ran)."""

    __tablename__ = "study_runs"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    attempt: Mapped[str] = mapped_column(String(64))
    flower_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    start_round: Mapped[int] = mapped_column(Integer)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_contact_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def new_attempt(session: Session, study_id: str, *, start_round: int) -> StudyRun:
    """Start a fresh attempt at ``start_round`` (the first run of a study, or a restart
    decided elsewhere); its ServerApp counts as heard from now."""
    now = utcnow()
    row = session.get(StudyRun, study_id, with_for_update=True)
    if row is None:
        row = StudyRun(study_id=study_id, restarts=0)
        session.add(row)
    row.attempt = _attempt_id()
    row.flower_run_id = None
    row.start_round = start_round
    row.started_at = now
    row.last_contact_at = now
    session.flush()
    return row


def current_run(session: Session, study_id: str) -> StudyRun | None:
    """The study's run row, if it ever ran."""
    return session.get(StudyRun, study_id)


def touch(session: Session, study_id: str, attempt: str, *, progress: bool = False) -> bool:
    """Note that ``attempt``'s ServerApp was heard from; False if it is not the study's
    current attempt (a run the server replaced). ``progress``: a round was recorded, so the
    restart count starts again."""
    values: dict[str, object] = {"last_contact_at": utcnow()}
    if progress:
        values["restarts"] = 0
    result = session.execute(
        update(StudyRun)
        .where(StudyRun.study_id == study_id, StudyRun.attempt == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def replace_stale(
    session: Session,
    study_id: str,
    *,
    seen_attempt: str,
    start_round: int,
    silent_for_s: float,
    now: datetime | None = None,
) -> StudyRun | None:
    """Replace ``seen_attempt`` by a new attempt at ``start_round`` if its ServerApp has been
    silent for ``silent_for_s`` seconds; the new row, or ``None`` if another replica (or a
    late heartbeat) got there first."""
    now = now or utcnow()
    new = _attempt_id()
    result = session.execute(
        update(StudyRun)
        .where(
            StudyRun.study_id == study_id,
            StudyRun.attempt == seen_attempt,
            StudyRun.last_contact_at < now - timedelta(seconds=silent_for_s),
        )
        .values(
            attempt=new,
            flower_run_id=None,
            start_round=start_round,
            restarts=StudyRun.restarts + 1,
            started_at=now,
            last_contact_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(StudyRun, study_id, populate_existing=True)
    assert row is not None
    return row


def silence_attempt(session: Session, study_id: str, attempt: str) -> bool:
    """Mark ``attempt`` as silent since forever (its ServerApp reported that it stopped), so
    the next sweep replaces it without waiting out the liveness window."""
    result = session.execute(
        update(StudyRun)
        .where(StudyRun.study_id == study_id, StudyRun.attempt == attempt)
        .values(last_contact_at=datetime(1970, 1, 1, tzinfo=utcnow().tzinfo))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
