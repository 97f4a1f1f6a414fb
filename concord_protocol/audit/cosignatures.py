"""Cosignatures: a site's Ed25519 signature over a tree head it checked.

A site witness (:mod:`site_node.agent.cosigner`) cosigns a head only if it extends the last
head that site cosigned; the server stores cosignatures
(:mod:`consortium_server.audit.cosignatures`) and a head with a quorum of them is
*witnessed*. Everyone builds the signed bytes with :func:`cosignature_message`: the
canonical JSON of ``{"type": "concord.audit.cosignature.v1", "site_id", "tree_size",
"root_hash", "timestamp"}`` (timestamp: when the site cosigned).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import AuditVerificationError
from concord_protocol.fields import Sha256Hex, format_utc

__all__ = ["COSIGNATURE_TYPE", "Cosignature", "cosignature_message", "verify_cosignature"]

COSIGNATURE_TYPE = "concord.audit.cosignature.v1"


class Cosignature(BaseModel):
    """A site's signature over a tree head's size and root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    tree_size: int = Field(ge=0)
    root_hash: Sha256Hex
    timestamp: datetime
    signature: str = Field(max_length=128, description="Base64 Ed25519 signature.")

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        format_utc(value)  # refuses naive datetimes
        return value

    @field_serializer("timestamp")
    def _serialise_timestamp(self, value: datetime) -> str:
        return format_utc(value)

    def message(self) -> bytes:
        """The canonical bytes the site signed."""
        return cosignature_message(self.site_id, self.tree_size, self.root_hash, self.timestamp)


def cosignature_message(site_id: str, tree_size: int, root_hash: str, timestamp: datetime) -> bytes:
    """Canonical bytes of a cosignature (what the site's key signs)."""
    return canonical_json(
        {
            "type": COSIGNATURE_TYPE,
            "site_id": site_id,
            "tree_size": tree_size,
            "root_hash": root_hash,
            "timestamp": format_utc(timestamp),
        }
    )


def verify_cosignature(cosignature: Cosignature, public_key: Ed25519PublicKey) -> None:
    """Check a site's cosignature; ``audit.cosignature_invalid`` if it does not verify."""
    try:
        signature = base64.b64decode(cosignature.signature, validate=True)
        public_key.verify(signature, cosignature.message())
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise AuditVerificationError(
            "The cosignature does not verify with the site's key.",
            code="audit.cosignature_invalid",
        ) from exc
