"""run leases: which server replica follows a running study

Revision ID: 0003
Revises: 0002

One row per running study: the replica (``holder``) that follows its Flower run and when
its lease expires unless renewed. See ``consortium_server/federation/leases.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import consortium_server.db.base

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_leases",
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column(
            "expires_at", consortium_server.db.base.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "claimed_at", consortium_server.db.base.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_run_leases_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_run_leases")),
    )


def downgrade() -> None:
    op.drop_table("run_leases")
