"""sites remember the SuperLink node id of their registered SuperNode key

Revision ID: 0004
Revises: 0003

Enrolment registers the site's SuperNode key with the SuperLink and keeps the node id it
gets; revocation unregisters that node (``consortium_server/federation/supernodes.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("supernode_node_id", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("supernode_node_id")
