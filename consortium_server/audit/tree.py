"""The audit log's Merkle tree as stored subtree hashes: heads and proofs in O(log n) reads.

``audit_nodes`` holds the hash of every *perfect* subtree above the leaves: the node at
``(level, idx)`` covers the ``2**level`` leaves from ``idx * 2**level`` (level 0 is
``audit_leaves.leaf_hash``). Appending leaf ``n`` stores the subtrees it completes (one on
average, ``log n`` at most), reading only their left siblings. Any range the RFC 9162
algorithms ask for is at most one perfect subtree per level
(:func:`concord_protocol.audit.merkle.perfect_subtrees`), so a root costs O(log n) node
reads and a proof O(log^2 n), fetched in one query per table. This is the layout of
transparency-dev's tlog tiles with tiles of height one.

The nodes are derived data: the server never signs from them alone. Before signing,
:func:`checked_frontier` checks that the nodes below the latest signed head hash to its
signed root, and the new root is computed from that frontier and the new entries' own
bytes. A damaged node therefore cannot enter a signed head; a proof served from one fails
against the signed roots, which is what clients and witnesses check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from concord_protocol.audit.merkle import (
    EMPTY_ROOT,
    SubtreeHash,
    consistency_path,
    fold_subtrees,
    inclusion_path,
    node_hash,
    perfect_subtrees,
)
from consortium_server.audit.models import AuditLeaf, AuditNode
from consortium_server.errors import DomainError

__all__ = [
    "StoredTree",
    "SubtreeBuilder",
    "checked_frontier",
    "completed_subtrees",
    "frontier_nodes",
]

Node = tuple[int, int]


def completed_subtrees(index: int) -> list[Node]:
    """The perfect subtrees above level 0 that leaf ``index`` completes, bottom up."""
    out: list[Node] = []
    level, position = 0, index
    while position & 1:  # a right child: with its left sibling it completes the parent
        position >>= 1
        level += 1
        out.append((level, position))
    return out


def frontier_nodes(size: int) -> list[Node]:
    """The perfect subtrees of the tree of ``size`` leaves, left to right (its compact
    range from the left edge; empty for the empty tree)."""
    return perfect_subtrees(0, size) if size else []


class SubtreeBuilder:
    """Builds the stored tree in bulk from leaf hashes in index order: :meth:`add` returns
    the ``(level, idx, hash)`` of every subtree the leaf completes (the rows ``audit_nodes``
    holds), keeping only the open subtrees. Migration 0011 keeps its own frozen copy."""

    def __init__(self) -> None:
        self._open: list[tuple[int, bytes]] = []  # (level, hash), left to right
        self._size = 0

    def add(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append the next leaf hash; the subtrees it completes, bottom up."""
        completed: list[tuple[int, int, bytes]] = []
        level, digest, idx = 0, leaf, self._size
        while self._open and self._open[-1][0] == level:
            digest, level, idx = node_hash(self._open.pop()[1], digest), level + 1, idx >> 1
            completed.append((level, idx, digest))
        self._open.append((level, digest))
        self._size += 1
        return completed


def _corrupt(message: str) -> DomainError:
    return DomainError(message, code="audit.log_corrupt")


class StoredTree:
    """Reads subtree hashes from ``audit_nodes`` and ``audit_leaves`` for one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # -- writing --------------------------------------------------------------------------

    def add_leaf(self, index: int, leaf: bytes) -> None:
        """Store the subtrees leaf ``index`` (hash ``leaf``) completes. The caller holds
        the log's write lock (appends are serialised)."""
        completed = completed_subtrees(index)
        if not completed:
            return
        # The left sibling of each completed node, bottom up: (level - 1, 2 * idx).
        siblings = self.nodes([(level - 1, 2 * idx) for level, idx in completed])
        digest = leaf
        for level, idx in completed:
            digest = node_hash(siblings[(level - 1, 2 * idx)], digest)
            self.session.add(AuditNode(level=level, idx=idx, hash=digest))

    # -- reading --------------------------------------------------------------------------

    def nodes(self, wanted: Iterable[Node]) -> dict[Node, bytes]:
        """The hashes of ``wanted`` perfect subtrees (``audit.log_corrupt`` if one is
        missing: the log has a hole or the nodes were not built)."""
        wanted = set(wanted)
        found: dict[Node, bytes] = {}
        leaves = [idx for level, idx in wanted if level == 0]
        if leaves:
            for idx, digest in self.session.execute(
                select(AuditLeaf.index, AuditLeaf.leaf_hash).where(AuditLeaf.index.in_(leaves))
            ):
                found[(0, int(idx))] = bytes(digest)
        by_level: dict[int, list[int]] = {}
        for level, idx in wanted:
            if level > 0:
                by_level.setdefault(level, []).append(idx)
        if by_level:
            # One (level = L AND idx IN (...)) term per level: SQLite scans the whole table
            # for a row-value IN, but searches the primary key for each OR term.
            terms = [
                and_(AuditNode.level == level, AuditNode.idx.in_(ids))
                for level, ids in sorted(by_level.items())
            ]
            for level, idx, digest in self.session.execute(
                select(AuditNode.level, AuditNode.idx, AuditNode.hash).where(or_(*terms))
            ):
                found[(int(level), int(idx))] = bytes(digest)
        missing = wanted - found.keys()
        if missing:
            level, idx = min(missing)
            raise _corrupt(f"The stored tree lacks the subtree at level {level}, index {idx}.")
        return found

    def _hashes_for(self, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The Merkle tree hash of every range, from one fetch of their subtrees."""
        parts = {r: perfect_subtrees(*r) for r in ranges}
        fetched = self.nodes(node for nodes in parts.values() for node in nodes)
        return {r: fold_subtrees([fetched[n] for n in nodes]) for r, nodes in parts.items()}

    def root(self, size: int) -> bytes:
        """Root of the first ``size`` leaves."""
        if size == 0:
            return EMPTY_ROOT
        return self._hashes_for([(0, size)])[(0, size)]

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes]:
        """(audit path of leaf ``index`` in the tree of ``size``, that tree's root)."""
        path, (root,) = self._proof(lambda subtree: inclusion_path(subtree, size, index), size)
        return path, root

    def consistency(self, first: int, second: int) -> tuple[list[bytes], bytes, bytes]:
        """(consistency proof from ``first`` to ``second`` leaves, both roots)."""
        path, (second_root, first_root) = self._proof(
            lambda subtree: consistency_path(subtree, second, first), second, first
        )
        return path, first_root, second_root

    def _proof(
        self, algorithm: Callable[[SubtreeHash], list[bytes]], *sizes: int
    ) -> tuple[list[bytes], list[bytes]]:
        """Run a proof algorithm twice: once to learn which ranges it reads (they depend
        only on the sizes), then on their hashes, fetched in one go with the roots of
        ``sizes``."""
        asked: list[tuple[int, int]] = []

        def record(start: int, end: int) -> bytes:
            asked.append((start, end))
            return b""

        algorithm(record)
        hashes = self._hashes_for([*asked, *((0, n) for n in sizes if n)])
        roots = [hashes[(0, n)] if n else EMPTY_ROOT for n in sizes]
        return algorithm(lambda start, end: hashes[(start, end)]), roots


def checked_frontier(session: Session, size: int, signed_root: bytes) -> list[bytes]:
    """The frontier hashes of the tree of ``size`` leaves, checked against the root the
    server signed for that size (``audit.log_corrupt`` if the stored nodes disagree)."""
    frontier = frontier_nodes(size)
    if not frontier:
        return []
    fetched = StoredTree(session).nodes(frontier)
    hashes = [fetched[node] for node in frontier]
    if fold_subtrees(hashes) != signed_root:
        raise _corrupt(f"The stored tree no longer matches the signed head of size {size}.")
    return hashes
