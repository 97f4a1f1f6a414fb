"""Idempotent submissions: a study remembers the submitter's ``Idempotency-Key``.

``studies`` gains ``idempotency_key`` and ``idempotency_draft_hash`` (NULL for existing
rows) and a unique constraint on ``(owner_subject, idempotency_key)``: the same key from the
same researcher can only ever name one study (NULL keys do not collide).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNIQUE = "uq_studies_owner_subject"


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(128), nullable=True))
        batch.add_column(sa.Column("idempotency_draft_hash", sa.String(64), nullable=True))
        batch.create_unique_constraint(op.f(_UNIQUE), ["owner_subject", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_constraint(op.f(_UNIQUE), type_="unique")
        batch.drop_column("idempotency_draft_hash")
        batch.drop_column("idempotency_key")
