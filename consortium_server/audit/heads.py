"""Signed tree heads: the server's Ed25519 signature over (size, root, time).

The signed message is the RFC 8785 canonical JSON of::

    {"type": "concord.audit.tree_head.v1", "key_id": ..., "tree_size": ...,
     "root_hash": <hex>, "timestamp": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}

``key_id`` is the SHA-256 (hex) of the raw 32-byte public key. The same message bytes are
built by :func:`tree_head_message` on the server, in site witnesses and in verifiers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.audit.entries import format_utc
from consortium_server.audit.merkle import MerkleAccumulator, leaf_hash, root_hash
from consortium_server.audit.models import AuditLeaf, AuditTreeHead
from consortium_server.canonical import canonical_json
from consortium_server.db.base import utcnow
from consortium_server.errors import DomainError
from consortium_server.schemas import Sha256Hex

__all__ = [
    "TREE_HEAD_TYPE",
    "SignedTreeHead",
    "TreeHeadSigner",
    "decode_public_key",
    "encode_public_key",
    "key_id",
    "tree_head_message",
    "verify_tree_head",
]

TREE_HEAD_TYPE = "concord.audit.tree_head.v1"


def encode_public_key(key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key (the form stored for sites and in exports)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(value: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key; ``audit.key_invalid`` if it is not one."""
    try:
        raw = base64.b64decode(value, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise DomainError("audit.key_invalid", "Not a base64 raw Ed25519 public key.") from exc


def key_id(key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw public key: names the key that signed a head."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


class SignedTreeHead(BaseModel):
    """A tree head and the server's signature over it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tree_size: int = Field(ge=0)
    root_hash: Sha256Hex
    timestamp: datetime
    key_id: Sha256Hex
    signature: str = Field(description="Base64 Ed25519 signature of the canonical message.")

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        format_utc(value)  # refuses naive datetimes
        return value

    @field_serializer("timestamp")
    def _serialise_timestamp(self, value: datetime) -> str:
        return format_utc(value)

    @property
    def root(self) -> bytes:
        """The root hash as bytes."""
        return bytes.fromhex(self.root_hash)

    def message(self) -> bytes:
        """The canonical bytes the server signed."""
        return tree_head_message(self.tree_size, self.root_hash, self.timestamp, self.key_id)

    @classmethod
    def from_row(cls, row: AuditTreeHead) -> Self:
        """The head stored in ``row``."""
        return cls(
            tree_size=row.tree_size,
            root_hash=row.root_hash,
            timestamp=row.timestamp,
            key_id=row.key_id,
            signature=row.signature,
        )


def tree_head_message(tree_size: int, root_hash: str, timestamp: datetime, kid: str) -> bytes:
    """Canonical bytes of a tree head (what the server's key signs)."""
    return canonical_json(
        {
            "type": TREE_HEAD_TYPE,
            "key_id": kid,
            "tree_size": tree_size,
            "root_hash": root_hash,
            "timestamp": format_utc(timestamp),
        }
    )


def verify_tree_head(head: SignedTreeHead, public_key: Ed25519PublicKey) -> None:
    """Check the server's signature on ``head``; ``audit.head_signature_invalid`` if bad."""
    if head.key_id != key_id(public_key):
        raise DomainError(
            "audit.head_signature_invalid", "The tree head names a different signing key."
        )
    try:
        signature = base64.b64decode(head.signature, validate=True)
        public_key.verify(signature, head.message())
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise DomainError(
            "audit.head_signature_invalid", "The tree head signature does not verify."
        ) from exc


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
                    "audit.key_invalid",
                    f"The tree-head key file {path} must not be readable by others "
                    f"(mode {mode:o}); run `chmod 600` on it.",
                )
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise DomainError("audit.key_invalid", f"{path} does not hold an Ed25519 key.")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
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

        Before signing, the stored leaves are checked: indices must be dense, every
        stored head must still match the root of its prefix, and every entry added since
        the latest head must hash to its stored leaf hash. A log that fails either check
        is never signed (``audit.log_corrupt``). Flushes; the caller commits.
        """
        from consortium_server.audit.log import load_leaf_hashes  # avoid an import cycle

        leaves = load_leaf_hashes(session)
        latest = session.scalars(
            select(AuditTreeHead)
            .order_by(AuditTreeHead.tree_size.desc(), AuditTreeHead.id.desc())
            .limit(1)
        ).first()
        _check_heads_match(session, leaves)
        if latest is not None and latest.tree_size == len(leaves):
            return SignedTreeHead.from_row(latest)
        _check_new_entries(session, latest.tree_size if latest is not None else 0)
        head = self.sign(len(leaves), root_hash(leaves))
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


def _check_heads_match(session: Session, leaves: list[bytes]) -> None:
    """Every stored head must be the root of its prefix of ``leaves``."""
    rows = session.execute(
        select(AuditTreeHead.tree_size, AuditTreeHead.root_hash).order_by(AuditTreeHead.tree_size)
    ).all()
    accumulator = MerkleAccumulator()
    for size, root in rows:
        if size > len(leaves):
            raise DomainError(
                "audit.log_corrupt",
                f"A signed head covers {size} leaves; only {len(leaves)} exist.",
            )
        while accumulator.size < size:
            accumulator.append(leaves[accumulator.size])
        if accumulator.root().hex() != root:
            raise DomainError(
                "audit.log_corrupt", f"The leaves no longer match the signed head of size {size}."
            )


def _check_new_entries(session: Session, start: int) -> None:
    """Entries from ``start`` on must hash to their stored leaf hashes."""
    rows = session.execute(
        select(AuditLeaf.index, AuditLeaf.entry, AuditLeaf.leaf_hash).where(
            AuditLeaf.index >= start
        )
    )
    for index, entry, digest in rows:
        if leaf_hash(bytes(entry)) != bytes(digest):
            raise DomainError("audit.log_corrupt", f"Entry {index} does not match its leaf hash.")
