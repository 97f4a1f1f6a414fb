"""Overspends: the ledger records epsilon spent beyond a reservation instead of refusing it.

``budget_accounts`` and ``budget_lines`` gain ``epsilon_overspent`` (0 for existing rows),
and their check constraints allow exactly that much beyond the cap / the reservation.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACCOUNT_OLD = (
    "epsilon_spent >= 0 AND epsilon_reserved >= 0 AND epsilon_spent + epsilon_reserved <= "
    "epsilon_cap"
)
_ACCOUNT_NEW = (
    "epsilon_spent >= 0 AND epsilon_reserved >= 0 AND epsilon_overspent >= 0 "
    "AND epsilon_spent + epsilon_reserved <= epsilon_cap + epsilon_overspent"
)
_LINE_OLD = (
    "epsilon_charged >= 0 AND epsilon_released >= 0 AND epsilon_charged + epsilon_released "
    "<= epsilon_reserved"
)
_LINE_NEW = (
    "epsilon_charged >= 0 AND epsilon_released >= 0 AND epsilon_overspent >= 0 "
    "AND epsilon_charged - epsilon_overspent + epsilon_released <= epsilon_reserved"
)
_CHECKS = (
    ("budget_accounts", "ck_budget_accounts_epsilon_within_cap", _ACCOUNT_OLD, _ACCOUNT_NEW),
    ("budget_lines", "ck_budget_lines_epsilon_within_reservation", _LINE_OLD, _LINE_NEW),
)


def upgrade() -> None:
    for table, name, _old, new in _CHECKS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("epsilon_overspent", sa.BigInteger(), nullable=False, server_default="0")
            )
            batch.drop_constraint(op.f(name), type_="check")
            batch.create_check_constraint(op.f(name), new)


def downgrade() -> None:
    for table, name, old, _new in _CHECKS:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(name), type_="check")
            batch.create_check_constraint(op.f(name), old)
            batch.drop_column("epsilon_overspent")
