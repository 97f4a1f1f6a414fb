"""Fixtures for the audit-log tests: sessions, a signer, entries, witnesses, tampering."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.heads import encode_public_key
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.db.session import make_sessionmaker
from site_node.agent.cosigner import Witness
from tests.support.audit import BASE_TIME, make_entry

__all__ = ["BASE_TIME", "make_entry"]

AUDIT_TABLES = ("audit_leaves", "audit_nodes", "audit_tree_heads", "audit_cosignatures")


@pytest.fixture
def session_factory(db_engine: Engine) -> sessionmaker[Session]:
    """Session factory on the test's database (SQLite or PostgreSQL)."""
    return make_sessionmaker(db_engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session; tests commit where they mean to."""
    with session_factory() as s:
        yield s


@pytest.fixture
def audit_log() -> AuditLog:
    """The log service (quorum of two witnesses)."""
    return AuditLog(witness_quorum=2)


@pytest.fixture
def signer() -> TreeHeadSigner:
    """A tree-head signer with a fresh key."""
    return TreeHeadSigner.generate()


@pytest.fixture
def append_entries(audit_log: AuditLog, session: Session) -> Callable[[int], list[int]]:
    """Append ``count`` entries (committed); returns their indices."""

    def _append(count: int) -> list[int]:
        start = audit_log.size(session=session)
        indices = [
            audit_log.append(make_entry(start + i), session=session).index for i in range(count)
        ]
        session.commit()
        return indices

    return _append


class SiteWitness:
    """A site's witness plus the site's public key (as the sites table holds it)."""

    def __init__(self, site_id: str, state_file: Path, signer: TreeHeadSigner) -> None:
        self.site_id = site_id
        self.key = Ed25519PrivateKey.generate()
        self.public_key_b64 = encode_public_key(self.key.public_key())
        self.state_file = state_file
        self._server_key = signer.public_key

    def witness(self) -> Witness:
        """A fresh Witness object on the same state file (a restart)."""
        return Witness(self.state_file, self.site_id, self.key, self._server_key)


@pytest.fixture
def make_site(tmp_path: Path, signer: TreeHeadSigner) -> Callable[[str], SiteWitness]:
    """Create a site witness with its own key and state file."""

    def _make(site_id: str) -> SiteWitness:
        return SiteWitness(site_id, tmp_path / site_id / "witness.json", signer)

    return _make


def build_witnessed_log(
    session: Session,
    audit_log: AuditLog,
    signer: TreeHeadSigner,
    sites: list[SiteWitness],
    head_sizes: tuple[int, ...],
) -> None:
    """Append entries up to the last of ``head_sizes``; at each size sign a head and have
    every site witness cosign it (with the consistency proof from its last head). Commits."""
    from consortium_server.audit.cosignatures import record_cosignature

    for n in range(max(head_sizes)):
        audit_log.append(make_entry(n), session=session)
        if n + 1 not in head_sizes:
            continue
        session.commit()
        head = signer.sign_latest(session)
        for site in sites:
            last = site.witness().last_head
            proof = (
                audit_log.prove_consistency(last.tree_size, head.tree_size, session=session).path
                if last
                else []
            )
            cosig = site.witness().cosign(head, proof)
            record_cosignature(session, cosig, site_public_key=site.public_key_b64)
        session.commit()


def rebuild_nodes(engine: Engine) -> None:
    """Recompute ``audit_nodes`` from the leaves as they now are (in index order, holes
    closed up): what an attacker who rewrote leaves does next so that the stored tree
    agrees with them. Needs the append-only triggers disabled."""
    from consortium_server.audit.tree import SubtreeBuilder

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_nodes"))
        leaves = conn.execute(text('SELECT leaf_hash FROM audit_leaves ORDER BY "index"'))
        builder = SubtreeBuilder()
        for (leaf,) in leaves.all():
            for level, idx, digest in builder.add(bytes(leaf)):
                conn.execute(
                    text("INSERT INTO audit_nodes (level, idx, hash) VALUES (:l, :i, :h)"),
                    {"l": level, "i": idx, "h": digest},
                )


@contextmanager
def append_only_triggers_disabled(engine: Engine) -> Iterator[None]:
    """What an attacker with database superuser rights does first (restored afterwards,
    since PostgreSQL tests share one database)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in AUDIT_TABLES:
                conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only"))
        try:
            yield
        finally:
            with engine.begin() as conn:
                for table in AUDIT_TABLES:
                    conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER {table}_append_only"))
        return
    with engine.begin() as conn:
        for table in AUDIT_TABLES:
            for action in ("update", "delete"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{action}"))
    yield
