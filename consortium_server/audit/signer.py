"""The server's tree-head key: sign heads of the stored log, after checking the log.

The message format and its verification are shared with sites and third-party verifiers
(:mod:`concord_protocol.audit.heads`); this module holds what only the server does: keep
the Ed25519 key, check that the stored leaves still match every head signed before, and
store the new head.
"""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.heads import (
    SignedTreeHead,
    encode_public_key,
    key_id,
    tree_head_message,
)
from concord_protocol.audit.merkle import MerkleAccumulator, leaf_hash
from concord_protocol.fields import utcnow
from concord_protocol.private_files import write_private_file
from consortium_server.audit.log import AuditLog
from consortium_server.audit.models import AuditLeaf, AuditTreeHead
from consortium_server.audit.tree import StoredTree, checked_frontier
from consortium_server.errors import DomainError

__all__ = ["TreeHeadSigner"]


class TreeHeadSigner:
    """Holds the server's Ed25519 key and signs tree heads."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.key_id: str = key_id(self.public_key)

    @classmethod
    def generate(cls) -> Self:
        """A signer with a fresh key (tests, demos)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Self:
        """Load the PEM (PKCS#8) key at ``path``, creating it with mode 0600 if missing.

        An existing key file readable by group or others is refused.
        """
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise DomainError(
                    f"The tree-head key file {path} must not be readable by others "
                    f"(mode {mode:o}); run `chmod 600` on it.",
                    code="audit.key_invalid",
                )
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise DomainError(f"{path} does not hold an Ed25519 key.", code="audit.key_invalid")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_private_file(path, pem, overwrite=False)
        except FileExistsError:  # another replica created it meanwhile: use that one
            return cls.load_or_create(path)
        return cls(key)

    @property
    def public_key_b64(self) -> str:
        """The public key as base64 raw bytes (published in exports and to sites)."""
        return encode_public_key(self.public_key)

    def sign(
        self, tree_size: int, root: bytes, timestamp: datetime | None = None
    ) -> SignedTreeHead:
        """Sign a head for ``tree_size`` leaves with ``root`` (now, unless given)."""
        when = timestamp or utcnow()
        root_hex = root.hex()
        message = tree_head_message(tree_size, root_hex, when, self.key_id)
        signature = base64.b64encode(self._key.sign(message)).decode("ascii")
        return SignedTreeHead(
            tree_size=tree_size,
            root_hash=root_hex,
            timestamp=when,
            key_id=self.key_id,
            signature=signature,
        )

    def sign_latest(self, session: Session) -> SignedTreeHead:
        """Sign and store a head for the current log, unless the latest head already covers it.

        O(log n + new entries), never a scan of the log: the stored subtrees below the
        latest signed head must hash to its signed root (:func:`checked_frontier`), every
        entry added since must be present, dense and hash to its stored leaf hash, and the
        new root is computed from that frontier and those entries alone (then compared with
        the stored subtrees). A log that fails any check is never signed
        (``audit.log_corrupt``); damage to older entries that leaves the signed tree intact
        is what ``consortium audit verify`` and the witnesses find. Flushes; the caller
        commits.
        """
        size = AuditLog().size(session=session)
        latest = session.scalars(
            select(AuditTreeHead)
            .order_by(AuditTreeHead.tree_size.desc(), AuditTreeHead.id.desc())
            .limit(1)
        ).first()
        signed = latest.tree_size if latest is not None else 0
        if size < signed:
            raise DomainError(
                f"A signed head covers {signed} leaves; only {size} exist.",
                code="audit.log_corrupt",
            )
        frontier = (
            checked_frontier(session, signed, bytes.fromhex(latest.root_hash))
            if latest is not None
            else []
        )
        if latest is not None and signed == size:
            return latest.signed_head()
        accumulator = MerkleAccumulator.from_frontier(signed, frontier)
        for leaf in _new_leaves(session, signed, size):
            accumulator.append(leaf)
        root = accumulator.root()
        if StoredTree(session).root(size) != root:
            raise DomainError(
                f"The stored tree of {size} leaves disagrees with its entries.",
                code="audit.log_corrupt",
            )
        head = self.sign(size, root)
        session.add(
            AuditTreeHead(
                tree_size=head.tree_size,
                root_hash=head.root_hash,
                timestamp=head.timestamp,
                key_id=head.key_id,
                signature=head.signature,
            )
        )
        session.flush()
        return head


def _new_leaves(session: Session, start: int, end: int) -> list[bytes]:
    """Leaf hashes ``[start, end)``, each checked against its entry's bytes and dense."""
    rows = session.execute(
        select(AuditLeaf.index, AuditLeaf.entry, AuditLeaf.leaf_hash)
        .where(AuditLeaf.index >= start, AuditLeaf.index < end)
        .order_by(AuditLeaf.index)
    )
    leaves: list[bytes] = []
    for expected, (index, entry, digest) in enumerate(rows, start=start):
        if index != expected:
            raise DomainError(
                f"Leaf index {index} found where {expected} was expected.",
                code="audit.log_corrupt",
            )
        if leaf_hash(bytes(entry)) != bytes(digest):
            raise DomainError(
                f"Entry {index} does not match its leaf hash.", code="audit.log_corrupt"
            )
        leaves.append(bytes(digest))
    if len(leaves) != end - start:
        raise DomainError(
            f"The log has {len(leaves)} of the entries {start}..{end - 1}.",
            code="audit.log_corrupt",
        )
    return leaves
