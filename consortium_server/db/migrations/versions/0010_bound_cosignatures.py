"""Cosignatures version 2: bound to the log's identity, the head's key and the head's time.

``audit_cosignatures`` gains ``log_id``, ``key_id`` and ``head_timestamp`` (NULL for the
version 1 cosignatures stored before: they still verify, but count towards no quorum).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from consortium_server.db.base import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_cosignatures") as batch:
        batch.add_column(sa.Column("log_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("head_timestamp", UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_cosignatures") as batch:
        batch.drop_column("head_timestamp")
        batch.drop_column("key_id")
        batch.drop_column("log_id")
