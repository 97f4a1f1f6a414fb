"""Aggregate manifests: the signed contributions each kept aggregate sums.

``round_checkpoints`` and ``release_final_aggregates`` gain ``manifest``: the canonical JSON of the
aggregate's :class:`~concord_protocol.contributions.AggregateManifest`, which sites check
before they train on, evaluate or release an aggregate. Rows from before have none ("").

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("round_checkpoints", "release_final_aggregates"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("manifest", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    for table in ("round_checkpoints", "release_final_aggregates"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("manifest")
