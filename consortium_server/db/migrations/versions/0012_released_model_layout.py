"""Released model layouts: ``release_models`` gains ``layout``.

The parameter layout the uploading site sends with the model bytes (input shape, class
count, each parameter's name and shape in vector order; see
:class:`concord_protocol.release.ModelLayout`), from which the server writes the released
model as a safetensors file. Models uploaded before have none (NULL): their raw bytes are
still served, the file is not (``release.layout_missing``).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("release_models") as batch:
        batch.add_column(
            sa.Column(
                "layout",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("release_models") as batch:
        batch.drop_column("layout")
