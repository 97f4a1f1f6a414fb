"""The audit log service: append entries, serve entries with proofs, tree heads.

:class:`AuditLog` is one object per application (``app.state.audit_log``); every method
takes the caller's ``session`` (keyword-only), flushes and never commits: the request
boundary (or ``session_scope``) commits, so an audit entry commits atomically with the
change it records.

Roots and proofs come from stored subtree hashes (:mod:`consortium_server.audit.tree`):
O(log n) reads however long the log grows; appends store the subtrees they complete.

Dense indices under concurrency: an append reads ``MAX(index) + 1`` while holding the log's
write lock until its transaction ends. On PostgreSQL that is a transaction-level advisory
lock (``pg_advisory_xact_lock``); on SQLite every write transaction already starts with
``BEGIN IMMEDIATE`` (see :func:`consortium_server.db.session.make_engine`), which
serialises writers. The primary key on ``index`` turns any lapse into an error rather than
a duplicate or a gap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import DEFAULT_LOG_ID
from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.audit.merkle import leaf_hash
from consortium_server.audit.models import AuditLeaf, AuditTreeHead
from consortium_server.audit.tree import StoredTree
from consortium_server.errors import DomainError, InvalidRequestError, NotFoundError

__all__ = [
    "PG_ADVISORY_LOCK_KEY",
    "AppendedEntry",
    "AuditLog",
    "ConsistencyProof",
    "InclusionProof",
    "StoredEntry",
    "load_leaf_hashes",
]

#: Key of the PostgreSQL advisory lock that serialises appends (a stable 63-bit number).
PG_ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"concord.audit_log.append").digest()[:8], "big", signed=True
)


class AppendedEntry(NamedTuple):
    """Where an entry landed: its zero-based index and its RFC 9162 leaf hash.

    A pair: ``index, digest = log.append(entry, session=session)``.
    """

    # The field shadows tuple.index(); callers want the name, and never call the method.
    index: int  # type: ignore[assignment]
    leaf_hash: bytes


@dataclass(frozen=True)
class StoredEntry:
    """An entry as stored: decoded entry, exact bytes, leaf hash."""

    index: int
    entry: AuditEntry
    entry_bytes: bytes
    leaf_hash: bytes
    created_at: datetime


@dataclass(frozen=True)
class InclusionProof:
    """Leaf ``index`` is in the tree of ``tree_size`` leaves whose root is ``root``."""

    index: int
    tree_size: int
    leaf_hash: bytes
    root: bytes
    path: list[bytes]


@dataclass(frozen=True)
class ConsistencyProof:
    """The tree of ``first_size`` leaves is a prefix of the tree of ``second_size``."""

    first_size: int
    second_size: int
    first_root: bytes
    second_root: bytes
    path: list[bytes]


def _corrupt(message: str) -> DomainError:
    return DomainError(message, code="audit.log_corrupt")


def load_leaf_hashes(session: Session, size: int | None = None) -> list[bytes]:
    """Stored leaf hashes in index order (the first ``size`` of them if given).

    Raises ``audit.log_corrupt`` if the indices are not dense from 0: proofs and heads
    are never produced over a log with holes.
    """
    query = select(AuditLeaf.index, AuditLeaf.leaf_hash).order_by(AuditLeaf.index)
    if size is not None:
        query = query.where(AuditLeaf.index < size)
    hashes: list[bytes] = []
    for position, (index, digest) in enumerate(session.execute(query)):
        if index != position:
            raise _corrupt(f"Leaf index {index} found where {position} was expected.")
        hashes.append(bytes(digest))
    if size is not None and len(hashes) != size:
        raise _corrupt(f"The log has {len(hashes)} leaves below index {size}.")
    return hashes


class AuditLog:
    """Append-only Merkle-tree audit log stored in the server database.

    ``witness_quorum`` is the number of distinct site cosignatures that make a tree head
    "witnessed" (see :func:`consortium_server.audit.cosignatures.is_witnessed`); ``log_id``
    the log's identity, which every cosignature binds.
    """

    def __init__(self, *, witness_quorum: int = 2, log_id: str = DEFAULT_LOG_ID) -> None:
        if witness_quorum < 1:
            raise ValueError("witness_quorum must be at least 1")
        self.witness_quorum = witness_quorum
        self.log_id = log_id

    # -- writing -------------------------------------------------------------------------

    def append(self, entry: AuditEntry, *, session: Session) -> AppendedEntry:
        """Append ``entry``; returns its index and leaf hash. Flushes, does not commit.

        The append holds the log's write lock until the caller's transaction ends, so
        commit soon after (as the request boundary does).
        """
        data = entry.canonical_bytes()
        digest = leaf_hash(data)
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(PG_ADVISORY_LOCK_KEY)))
        index = self.size(session=session)
        session.add(
            AuditLeaf(
                index=index,
                entry=data,
                leaf_hash=digest,
                action=entry.action,
                actor_subject=entry.actor.subject,
                at=entry.at,
            )
        )
        StoredTree(session).add_leaf(index, digest)
        session.flush()
        return AppendedEntry(index, digest)

    # -- reading -------------------------------------------------------------------------

    def size(self, *, session: Session) -> int:
        """Number of leaves (one more than the highest index)."""
        highest = session.scalar(select(func.max(AuditLeaf.index)))
        return 0 if highest is None else int(highest) + 1

    def get_entry(self, index: int, *, session: Session) -> StoredEntry:
        """The entry at ``index`` (``audit.entry_not_found`` if there is none)."""
        row = session.get(AuditLeaf, index, populate_existing=True) if index >= 0 else None
        if row is None:
            raise NotFoundError(f"No audit entry {index}.", code="audit.entry_not_found")
        data = bytes(row.entry)
        if leaf_hash(data) != bytes(row.leaf_hash):
            raise _corrupt(f"Entry {index} does not match its leaf hash.")
        try:
            entry = AuditEntry.from_canonical_bytes(data)
        except ValueError as exc:
            raise _corrupt(f"Entry {index} does not decode: {exc}") from exc
        return StoredEntry(index, entry, data, bytes(row.leaf_hash), row.created_at)

    def root(self, *, session: Session, size: int | None = None) -> bytes:
        """Root hash of the first ``size`` leaves (all of them by default); O(log n)."""
        current = self.size(session=session)
        size = current if size is None else size
        if not 0 <= size <= current:
            raise InvalidRequestError(f"No tree of size {size}.", code="audit.invalid_range")
        return StoredTree(session).root(size)

    def prove_inclusion(
        self, index: int, *, session: Session, tree_size: int | None = None
    ) -> InclusionProof:
        """Inclusion proof of leaf ``index`` in the tree of ``tree_size`` (default: all)."""
        current = self.size(session=session)
        size = current if tree_size is None else tree_size
        if not 0 <= index < size <= current:
            raise InvalidRequestError(
                f"Leaf {index} is not inside a tree of size {size} (log size {current}).",
                code="audit.invalid_range",
            )
        tree = StoredTree(session)
        path, root = tree.inclusion(index, size)
        return InclusionProof(
            index=index,
            tree_size=size,
            leaf_hash=tree.nodes([(0, index)])[(0, index)],
            root=root,
            path=path,
        )

    def prove_consistency(
        self, first: int, second: int | None = None, *, session: Session
    ) -> ConsistencyProof:
        """Consistency proof from the tree of ``first`` leaves to ``second`` (default: all)."""
        current = self.size(session=session)
        second_size = current if second is None else second
        if not 0 <= first <= second_size <= current:
            raise InvalidRequestError(
                f"Need 0 <= first ({first}) <= second ({second_size}) <= log size ({current}).",
                code="audit.invalid_range",
            )
        path, first_root, second_root = StoredTree(session).consistency(first, second_size)
        return ConsistencyProof(
            first_size=first,
            second_size=second_size,
            first_root=first_root,
            second_root=second_root,
            path=path,
        )

    def latest_head(self, *, session: Session) -> SignedTreeHead | None:
        """The largest (then most recent) signed tree head, if any."""
        row = session.scalars(
            select(AuditTreeHead)
            .order_by(AuditTreeHead.tree_size.desc(), AuditTreeHead.id.desc())
            .limit(1)
        ).first()
        return None if row is None else row.signed_head()

    def head_for_size(self, tree_size: int, *, session: Session) -> SignedTreeHead | None:
        """The most recent signed head of exactly ``tree_size`` leaves, if any."""
        row = session.scalars(
            select(AuditTreeHead)
            .where(AuditTreeHead.tree_size == tree_size)
            .order_by(AuditTreeHead.id.desc())
            .limit(1)
        ).first()
        return None if row is None else row.signed_head()
