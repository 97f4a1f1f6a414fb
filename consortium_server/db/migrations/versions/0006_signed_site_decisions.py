"""Signed site decisions and site key rotations.

``study_approvals`` gains the decision time the site signed and its Ed25519 signature;
``site_key_rotations`` keeps each site's signed key rotations, oldest first.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import consortium_server.db.base

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = consortium_server.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "site_key_rotations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("previous_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("recorded_by", sa.String(length=255), nullable=False),
        sa.Column("recorded_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_site_key_rotations_site_id_sites")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site_key_rotations")),
        sa.UniqueConstraint("site_id", "seq", name=op.f("uq_site_key_rotations_site_id")),
    )
    op.create_index(
        op.f("ix_site_key_rotations_site_id"), "site_key_rotations", ["site_id"], unique=False
    )
    with op.batch_alter_table("study_approvals") as batch:
        batch.add_column(sa.Column("signed_at", sa.String(40), nullable=True))
        batch.add_column(sa.Column("signature", sa.String(200), nullable=True))


def downgrade() -> None:
    op.drop_index(op.f("ix_site_key_rotations_site_id"), table_name="site_key_rotations")
    op.drop_table("site_key_rotations")
    with op.batch_alter_table("study_approvals") as batch:
        batch.drop_column("signature")
        batch.drop_column("signed_at")
