"""Run leases: which consortium server replica follows a study's run.

A study that is ``running`` is followed by exactly one server process (its
:class:`~consortium_server.federation.runs.RunManager`): it reports the rounds, charges the
ledger and finishes the study. With several replicas (the Helm chart runs two) and
restarts, "exactly one" needs a lease in the database: a row per running study naming its
holder and when the lease expires. The holder renews it while it follows the run; a
replica that finds a running study whose lease expired (its holder died) takes it over and
resumes the study. A lease is claimed in the same transaction that moves the study to
``running``, so no other replica can see the study without its holder.

Claiming is one conditional ``UPDATE`` (or an ``INSERT`` for a study without a row), so two
replicas never both win, on SQLite and on PostgreSQL alike. Functions take a session and
flush; the caller commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, String, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from consortium_server.db.base import Base, UTCDateTime, utcnow

__all__ = ["RunLease", "claim", "holder_of", "release", "renew"]


class RunLease(Base):
    """The replica following a running study, until ``expires_at`` unless renewed."""

    __tablename__ = "run_leases"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def claim(
    session: Session, study_id: str, holder: str, *, ttl_s: float, now: datetime | None = None
) -> bool:
    """Take (or keep) the study's lease for ``ttl_s``: True if ``holder`` has it now.

    Succeeds when there is no lease, when ``holder`` already holds it, or when it expired.
    """
    now = now or utcnow()
    expires = now + timedelta(seconds=ttl_s)
    taken = session.execute(
        update(RunLease)
        .where(
            RunLease.study_id == study_id,
            (RunLease.holder == holder) | (RunLease.expires_at < now),
        )
        .values(holder=holder, expires_at=expires, claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount == 1:  # type: ignore[attr-defined]
        return True
    if session.get(RunLease, study_id) is not None:
        return False  # held by another, not expired
    try:
        with session.begin_nested():
            session.add(
                RunLease(study_id=study_id, holder=holder, expires_at=expires, claimed_at=now)
            )
    except IntegrityError:  # another replica inserted it first
        return False
    return True


def renew(
    session: Session, study_id: str, holder: str, *, ttl_s: float, now: datetime | None = None
) -> bool:
    """Extend ``holder``'s lease; False if it holds the lease no more (it expired and was
    taken over: the caller must stop following the run)."""
    now = now or utcnow()
    result = session.execute(
        update(RunLease)
        .where(RunLease.study_id == study_id, RunLease.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release(session: Session, study_id: str, holder: str) -> None:
    """Drop ``holder``'s lease (the study ended); someone else's is left alone."""
    session.execute(
        delete(RunLease)
        .where(RunLease.study_id == study_id, RunLease.holder == holder)
        .execution_options(synchronize_session=False)
    )


def holder_of(session: Session, study_id: str, *, now: datetime | None = None) -> str | None:
    """Who holds the study's lease now (``None``: nobody, or it expired)."""
    now = now or utcnow()
    return session.scalar(
        select(RunLease.holder).where(RunLease.study_id == study_id, RunLease.expires_at >= now)
    )
