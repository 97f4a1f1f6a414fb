"""The stored tree: roots and proofs from stored subtrees are exactly RFC 9162's, for every
size and index, and migration 0011 builds the same subtrees from an existing log."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from concord_protocol.audit.merkle import (
    MerkleAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    perfect_subtrees,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from consortium_server.audit.log import AuditLog, load_leaf_hashes
from consortium_server.audit.models import AuditNode
from consortium_server.audit.tree import StoredTree, completed_subtrees, frontier_nodes
from consortium_server.db.migrate import alembic_config
from tests.support.audit import make_entry

N = 37


@pytest.fixture
def grown(session: Session, audit_log: AuditLog) -> list[bytes]:
    for n in range(N):
        audit_log.append(make_entry(n), session=session)
    session.commit()
    return load_leaf_hashes(session)


def test_roots_and_proofs_from_stored_subtrees_are_rfc_9162s(
    session: Session, audit_log: AuditLog, grown: list[bytes]
) -> None:
    tree = StoredTree(session)
    for size in range(N + 1):
        assert tree.root(size) == root_hash(grown[:size])
        for index in range(size):
            path, root = tree.inclusion(index, size)
            assert path == inclusion_proof(grown[:size], index)
            verify_inclusion(grown[index], index, size, path, root)
        for first in range(size + 1):
            path, first_root, second_root = tree.consistency(first, size)
            assert path == consistency_proof(grown[:size], first)
            if first:
                verify_consistency(first, size, first_root, second_root, path)
    assert audit_log.root(session=session) == root_hash(grown)


def test_each_append_stores_the_subtrees_it_completes(session: Session, grown: list[bytes]) -> None:
    stored = {
        (level, idx) for level, idx in session.execute(select(AuditNode.level, AuditNode.idx))
    }
    expected = {node for index in range(N) for node in completed_subtrees(index)}
    assert stored == expected
    assert len(stored) == N - bin(N).count("1")  # a perfect binary forest: n - popcount(n)
    assert completed_subtrees(7) == [(1, 3), (2, 1), (3, 0)]
    assert completed_subtrees(8) == []


def test_ranges_decompose_into_one_subtree_per_level() -> None:
    assert frontier_nodes(0) == []
    assert frontier_nodes(13) == [(3, 0), (2, 2), (0, 12)]
    assert perfect_subtrees(4, 7) == [(1, 2), (0, 6)]
    with pytest.raises(ValueError, match="not a subtree"):
        perfect_subtrees(3, 7)
    with pytest.raises(ValueError, match="frontier subtrees"):
        MerkleAccumulator.from_frontier(13, [b"x" * 32])


def test_a_proof_reads_a_logarithmic_number_of_rows(session: Session, grown: list[bytes]) -> None:
    """The subtrees a proof needs (what it fetches) grow like log^2 n, not n."""
    queries: list[str] = []
    from sqlalchemy import event

    engine = session.get_bind()
    listener = lambda *args: queries.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        StoredTree(session).inclusion(5, N)
        StoredTree(session).consistency(9, N)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert 0 < len(queries) <= 6  # one per table and proof (plus the first root)


def test_migration_0011_builds_the_same_subtrees_from_an_existing_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    config = alembic_config(engine)
    command.upgrade(config, "0010")
    log = AuditLog()
    with Session(engine) as session:
        for n in range(N):  # a log written before 0011: leaves only
            entry = make_entry(n)
            data = entry.canonical_bytes()
            session.execute(
                text(
                    'INSERT INTO audit_leaves ("index", entry, leaf_hash, action, actor_subject, '
                    "at, created_at) VALUES (:i, :e, :h, :a, :s, :t, :t)"
                ),
                {
                    "i": n,
                    "e": data,
                    "h": leaf_hash(data),
                    "a": entry.action,
                    "s": entry.actor.subject,
                    "t": entry.at.replace(tzinfo=None),
                },
            )
        session.commit()
    command.upgrade(config, "head")
    with Session(engine) as session:
        leaves = load_leaf_hashes(session)
        stored = {(lv, i) for lv, i in session.execute(select(AuditNode.level, AuditNode.idx))}
        assert stored == {node for index in range(N) for node in completed_subtrees(index)}
        assert StoredTree(session).root(N) == root_hash(leaves)
        log.append(make_entry(N), session=session)  # appends go on from the backfill
        session.commit()
        assert StoredTree(session).root(N + 1) == root_hash(load_leaf_hashes(session))
    engine.dispose()
