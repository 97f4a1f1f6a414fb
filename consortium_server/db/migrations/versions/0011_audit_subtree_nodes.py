"""Stored subtree hashes: ``audit_nodes`` makes heads and proofs cost O(log n) reads.

Creates ``audit_nodes (level, idx, hash)`` (see :mod:`consortium_server.audit.tree`),
fills it from the existing leaves in one streaming pass, and makes it append-only like the
other audit tables (triggers as in migration 0002).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from concord_protocol.audit.merkle import node_hash

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "audit_nodes"
_BATCH = 5000


def _backfill() -> None:
    bind = op.get_bind()
    nodes = sa.table(
        _TABLE,
        sa.column("level", sa.SmallInteger),
        sa.column("idx", sa.BigInteger),
        sa.column("hash", sa.LargeBinary),
    )
    stack: list[tuple[int, bytes]] = []  # (level, hash) of the open perfect subtrees
    pending: list[dict[str, object]] = []
    rows = bind.execute(sa.text('SELECT "index", leaf_hash FROM audit_leaves ORDER BY "index"'))
    for position, (index, leaf) in enumerate(rows):
        if index != position:
            raise RuntimeError(f"audit_leaves has a hole at {position}: repair before upgrading")
        level, digest, idx = 0, bytes(leaf), int(index)
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            digest, level, idx = node_hash(left, digest), level + 1, idx >> 1
            pending.append({"level": level, "idx": idx, "hash": digest})
        stack.append((level, digest))
        if len(pending) >= _BATCH:
            op.bulk_insert(nodes, pending)
            pending = []
    if pending:
        op.bulk_insert(nodes, pending)


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("idx", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_audit_nodes")),
    )
    _backfill()
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            f"CREATE TRIGGER {_TABLE}_append_only BEFORE UPDATE OR DELETE ON {_TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
        )
    elif dialect == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {_TABLE}_no_{action.lower()} BEFORE {action} ON {_TABLE} "
                f"BEGIN SELECT RAISE(ABORT, '{_TABLE} is append-only: {action} refused'); END"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_append_only ON {_TABLE}")
    elif dialect == "sqlite":
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_no_{action}")
    op.drop_table(_TABLE)
