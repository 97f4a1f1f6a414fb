"""rounds reach the server through its API: run attempts and checkpoints in the database

Revision ID: 0005
Revises: 0004

``study_runs``: the run attempt working on each running study and when its ServerApp was
last heard from (``consortium_server/federation/study_runs.py``); it replaces the run
leases. ``round_checkpoints``: each round's encrypted aggregate, which a restarted run
starts from (``consortium_server/federation/checkpoints.py``); it replaces the records
directory the API and the SuperLink used to share.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import consortium_server.db.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = consortium_server.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "study_runs",
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.String(length=64), nullable=False),
        sa.Column("flower_run_id", sa.Integer(), nullable=True),
        sa.Column("start_round", sa.Integer(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("last_contact_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_runs_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_study_runs")),
    )
    op.create_table(
        "round_checkpoints",
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("total_weight", sa.Float(), nullable=False),
        sa.Column("blobs_sha256", sa.String(length=64), nullable=False),
        sa.Column("blobs", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_round_checkpoints_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("study_id", "round_number", name=op.f("pk_round_checkpoints")),
    )
    op.drop_table("run_leases")


def downgrade() -> None:
    op.create_table(
        "run_leases",
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=False),
        sa.Column("claimed_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_run_leases_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_run_leases")),
    )
    op.drop_table("round_checkpoints")
    op.drop_table("study_runs")
