"""The log in the database (SQLite and PostgreSQL): append, proofs, heads, triggers."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from concord_protocol.audit.heads import verify_tree_head
from concord_protocol.audit.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from concord_protocol.errors import AuditVerificationError
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import DomainError

from .conftest import make_entry


def test_append_returns_dense_indices_and_leaf_hashes(
    audit_log: AuditLog, session: Session
) -> None:
    assert audit_log.size(session=session) == 0
    assert audit_log.root(session=session) == EMPTY_ROOT
    results = [audit_log.append(make_entry(i), session=session) for i in range(5)]
    session.commit()
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    index, digest = results[2]
    assert digest == leaf_hash(make_entry(2).canonical_bytes())
    stored = audit_log.get_entry(index, session=session)
    assert stored.entry == make_entry(2)
    assert stored.entry_bytes == make_entry(2).canonical_bytes()
    with pytest.raises(DomainError) as info:
        audit_log.get_entry(5, session=session)
    assert info.value.code == "audit.entry_not_found"


def test_every_entry_is_proven_against_every_size(
    audit_log: AuditLog, session: Session, append_entries: Callable[[int], list[int]]
) -> None:
    append_entries(13)
    roots = {n: audit_log.root(session=session, size=n) for n in range(14)}
    for n in range(1, 14):
        for i in range(n):
            proof = audit_log.prove_inclusion(i, session=session, tree_size=n)
            assert proof.root == roots[n]
            verify_inclusion(proof.leaf_hash, i, n, proof.path, roots[n])
        for m in range(n + 1):
            c = audit_log.prove_consistency(m, n, session=session)
            verify_consistency(m, n, roots[m], roots[n], c.path)
    with pytest.raises(DomainError) as info:
        audit_log.prove_inclusion(13, session=session)
    assert info.value.code == "audit.invalid_range"
    with pytest.raises(DomainError):
        audit_log.prove_consistency(5, 14, session=session)


def test_sign_latest_signs_once_per_size(
    audit_log: AuditLog,
    session: Session,
    signer: TreeHeadSigner,
    append_entries: Callable[[int], list[int]],
) -> None:
    assert audit_log.latest_head(session=session) is None
    empty = signer.sign_latest(session)
    assert (empty.tree_size, empty.root) == (0, EMPTY_ROOT)
    append_entries(3)
    head = signer.sign_latest(session)
    session.commit()
    verify_tree_head(head, signer.public_key)
    assert head.tree_size == 3
    assert head.root == audit_log.root(session=session)
    assert signer.sign_latest(session) == head  # nothing new: same head
    assert audit_log.latest_head(session=session) == head
    assert audit_log.head_for_size(0, session=session) == empty


def test_signature_covers_size_root_and_time(signer: TreeHeadSigner) -> None:
    head = signer.sign(4, b"\x11" * 32)
    verify_tree_head(head, signer.public_key)
    for change in (
        {"tree_size": 5},
        {"root_hash": "22" * 32},
        {"timestamp": head.timestamp.replace(year=2000)},
    ):
        with pytest.raises(AuditVerificationError) as info:
            verify_tree_head(head.model_copy(update=change), signer.public_key)
        assert info.value.code == "audit.head_signature_invalid"
    with pytest.raises(AuditVerificationError):
        verify_tree_head(head, TreeHeadSigner.generate().public_key)


def test_signing_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit-head-key.pem"
    first = TreeHeadSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TreeHeadSigner.load_or_create(path).key_id == first.key_id
    os.chmod(path, 0o644)
    with pytest.raises(DomainError) as info:
        TreeHeadSigner.load_or_create(path)
    assert info.value.code == "audit.key_invalid"


@pytest.mark.parametrize("table", ["audit_leaves", "audit_tree_heads", "audit_cosignatures"])
def test_triggers_refuse_update_and_delete(
    db_engine: Engine,
    session: Session,
    signer: TreeHeadSigner,
    append_entries: Callable[[int], list[int]],
    table: str,
) -> None:
    append_entries(2)
    signer.sign_latest(session)
    session.commit()
    if table == "audit_cosignatures":
        with db_engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit_cosignatures (site_id, tree_size, root_hash, timestamp, "
                    "signature, created_at) VALUES ('s', 2, :r, :t, 'x', :t)"
                ),
                {"r": "00" * 32, "t": "2025-01-01 00:00:00"},
            )
    column = {"audit_leaves": "action", "audit_tree_heads": "signature"}.get(table, "signature")
    statements = (f"UPDATE {table} SET {column} = 'forged'", f"DELETE FROM {table}")  # noqa: S608
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"), db_engine.begin() as conn:
            conn.execute(text(statement))
    with db_engine.connect() as conn:
        count = f"SELECT COUNT(*) FROM {table}"  # noqa: S608
        assert conn.execute(text(count)).scalar_one() >= 1
