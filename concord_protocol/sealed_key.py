"""The sealed study key's format: what a site sends another through the server.

One approved site seals the study's CKKS secret context to every other approved site
(:mod:`site_node.crypto.sealing` does the sealing and opening). The consortium server
relays the sealed bytes; it checks their shape with :class:`SealedKey` and can neither open
nor forge them. Both sides build the AEAD's associated data and the signed bytes here.
Public keys travel as base64 of the raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator

__all__ = [
    "SEALED_KEY_VERSION",
    "SealedKey",
    "b64decode_key",
    "ed25519_public_from_b64",
    "x25519_public_from_b64",
]

SEALED_KEY_VERSION: Literal[1] = 1
_SIGNATURE_LABEL = b"concord/sealed-study-key/v1/signature\x00"


def _b64_to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


B64Bytes = Annotated[
    bytes,
    PlainValidator(_b64_to_bytes),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


class SealedKey(BaseModel):
    """A study's secret context sealed from one site to another (JSON with base64 fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = SEALED_KEY_VERSION
    sender_id: str = Field(min_length=1, max_length=128)
    recipient_id: str = Field(min_length=1, max_length=128)
    study_id: str = Field(min_length=1, max_length=128)
    contract_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_context_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    ephemeral_public: B64Bytes
    nonce: B64Bytes
    ciphertext: B64Bytes
    signature: B64Bytes

    def associated_data(self) -> bytes:
        """Bytes the AEAD binds: addressing, study, contract and public-context hash."""
        return _canonical(
            {
                "version": self.version,
                "study_id": self.study_id,
                "contract_hash": self.contract_hash,
                "sender_id": self.sender_id,
                "recipient_id": self.recipient_id,
                "public_context_sha256": self.public_context_sha256,
                "key_fingerprint": self.key_fingerprint,
                "ephemeral_public": _b64(self.ephemeral_public),
            }
        )

    def signed_bytes(self) -> bytes:
        """Bytes the sender's Ed25519 signature covers: every field but the signature."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return _SIGNATURE_LABEL + _canonical(body)


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_key(value: str, *, what: str = "public key") -> bytes:
    """Decode a base64 raw 32-byte key; raises ``ValueError`` with a clear message."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 raw bytes, got {len(raw)}")
    return raw


def ed25519_public_from_b64(value: str) -> Ed25519PublicKey:
    """An Ed25519 public key from the API form (base64 of 32 raw bytes)."""
    return Ed25519PublicKey.from_public_bytes(b64decode_key(value, what="Ed25519 public key"))


def x25519_public_from_b64(value: str) -> X25519PublicKey:
    """An X25519 public key from the API form (base64 of 32 raw bytes)."""
    return X25519PublicKey.from_public_bytes(b64decode_key(value, what="X25519 public key"))
