"""ORM models of the privacy-budget ledger: one account per dataset, one line per study
and dataset.

Amounts are integers, so sums are exact on SQLite and PostgreSQL alike: epsilon in units
of 1e-6 (``EPSILON_UNIT``), delta in units of 1e-12 (``DELTA_UNIT``). The service converts
to and from :class:`~decimal.Decimal`. Check constraints hold the ledger invariant in the
database itself: ``spent + reserved <= cap + overspent`` on every account and
``charged - overspent + released <= reserved`` on every line. ``overspent`` is what sites
really spent beyond a study's reservation: the ledger records it rather than losing it, so
an overspent account shows a negative remaining budget until its cap is raised.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from consortium_server.db.base import Base, UTCDateTime, utcnow

__all__ = ["DELTA_UNIT", "EPSILON_UNIT", "BudgetAccount", "BudgetLine"]

#: One stored epsilon unit.
EPSILON_UNIT = Decimal("0.000001")
#: One stored delta unit.
DELTA_UNIT = Decimal("0.000000000001")


class BudgetAccount(Base):
    """A dataset's lifetime privacy budget: caps, what is spent, what is reserved."""

    __tablename__ = "budget_accounts"
    __table_args__ = (
        CheckConstraint(
            "epsilon_spent >= 0 AND epsilon_reserved >= 0 AND epsilon_overspent >= 0 "
            "AND epsilon_spent + epsilon_reserved <= epsilon_cap + epsilon_overspent",
            name="epsilon_within_cap",
        ),
        CheckConstraint(
            "delta_spent >= 0 AND delta_reserved >= 0 "
            "AND delta_spent + delta_reserved <= delta_cap",
            name="delta_within_cap",
        ),
    )

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    epsilon_cap: Mapped[int] = mapped_column(BigInteger)
    epsilon_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Epsilon spent beyond reservations (sum of the lines' overspends).
    epsilon_overspent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    delta_cap: Mapped[int] = mapped_column(BigInteger)
    delta_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class BudgetLine(Base):
    """One study's reservation on one dataset, and what became of it.

    Outstanding (still reserved) = reserved - charged - released. ``released_at`` is set
    when the study completed or was aborted and the unused part went back to the account.
    """

    __tablename__ = "budget_lines"
    __table_args__ = (
        UniqueConstraint("study_id", "dataset_id"),
        CheckConstraint(
            "epsilon_charged >= 0 AND epsilon_released >= 0 AND epsilon_overspent >= 0 "
            "AND epsilon_charged - epsilon_overspent + epsilon_released <= epsilon_reserved",
            name="epsilon_within_reservation",
        ),
        CheckConstraint(
            "delta_charged >= 0 AND delta_released >= 0 "
            "AND delta_charged + delta_released <= delta_reserved",
            name="delta_within_reservation",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key to studies: the ledger is an accounting record keyed by study id.
    study_id: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("budget_accounts.dataset_id"), index=True)
    epsilon_reserved: Mapped[int] = mapped_column(BigInteger)
    epsilon_charged: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_released: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Part of ``epsilon_charged`` beyond the reservation: flags the study, blocks release.
    epsilon_overspent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    delta_reserved: Mapped[int] = mapped_column(BigInteger)
    delta_charged: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_released: Mapped[int] = mapped_column(BigInteger, default=0)
    charges: Mapped[int] = mapped_column(Integer, default=0)
    reserved_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_charged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
