"""Signed tree heads: the server's Ed25519 signature over (size, root, time).

The signed message is the RFC 8785 canonical JSON of::

    {"type": "concord.audit.tree_head.v1", "key_id": ..., "tree_size": ...,
     "root_hash": <hex>, "timestamp": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}

``key_id`` is the SHA-256 (hex) of the raw 32-byte public key. The same message bytes are
built by :func:`tree_head_message` on the server, in site witnesses and in verifiers; the
server's signing key and the storage of heads are in :mod:`consortium_server.audit.signer`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
)

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import AuditVerificationError
from concord_protocol.fields import Sha256Hex, format_utc

__all__ = [
    "TREE_HEAD_TYPE",
    "SignedTreeHead",
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
        raise AuditVerificationError(
            "Not a base64 raw Ed25519 public key.", code="audit.key_invalid"
        ) from exc


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
        raise AuditVerificationError("The tree head names a different signing key.")
    try:
        signature = base64.b64decode(head.signature, validate=True)
        public_key.verify(signature, head.message())
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise AuditVerificationError("The tree head signature does not verify.") from exc
