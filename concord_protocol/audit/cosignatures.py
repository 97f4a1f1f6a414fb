"""Cosignatures: a site's Ed25519 signature over a tree head it checked.

A site witness (:mod:`site_node.agent.cosigner`) cosigns a head only if it extends the last
head that site cosigned; the server stores cosignatures
(:mod:`consortium_server.audit.cosignatures`) and a head with a quorum of them is
*witnessed*. Everyone builds the signed bytes with :func:`cosignature_message`.

Version 2 (what sites sign now) is the canonical JSON of::

    {"type": "concord.audit.cosignature.v2", "log_id", "key_id", "site_id", "tree_size",
     "root_hash", "head_timestamp", "timestamp"}

``log_id`` names the log (the consortium's audit log, :attr:`AuditExport.log_id`),
``key_id`` the server key that signed the head, ``head_timestamp`` the head's own time, and
``timestamp`` when the site cosigned: so a cosignature cannot be moved to another log, to a
head signed by another key, or to another head of the same size, and a verifier can check
that it was made after the head (:data:`CLOCK_SKEW`). Version 1 signed only ``{type,
site_id, tree_size, root_hash, timestamp}``; such cosignatures still verify (they were
stored before version 2) but never count towards a quorum. ``docs/audit-format.md`` has
the byte-level format and test vectors.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta
from typing import Annotated, Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import AuditVerificationError
from concord_protocol.fields import Sha256Hex, format_utc

__all__ = [
    "CLOCK_SKEW",
    "COSIGNATURE_TYPE",
    "COSIGNATURE_TYPE_V1",
    "DEFAULT_LOG_ID",
    "Cosignature",
    "LogId",
    "cosignature_message",
    "verify_cosignature",
]

COSIGNATURE_TYPE = "concord.audit.cosignature.v2"
COSIGNATURE_TYPE_V1 = "concord.audit.cosignature.v1"

#: The log identity of a server that names none (``CONCORD_AUDIT__LOG_ID``): fine for one
#: consortium, but a deployment should name its own so no cosignature can be replayed
#: against another log.
DEFAULT_LOG_ID = "concord.audit"

#: How far a site's clock may be behind the server's: a cosignature dated more than this
#: before the head it cosigns (or after the moment of verification) is refused.
CLOCK_SKEW = timedelta(minutes=5)

#: A log's identity: printable ASCII without spaces (for example ``concord.example.org/audit``).
LogId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[!-~]+$")]


class Cosignature(BaseModel):
    """A site's signature over a tree head (version 2: bound to the log, key and head)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1, 2] = 2
    site_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    tree_size: int = Field(ge=0)
    root_hash: Sha256Hex
    timestamp: datetime
    signature: str = Field(max_length=128, description="Base64 Ed25519 signature.")
    log_id: LogId | None = None
    key_id: Sha256Hex | None = None
    head_timestamp: datetime | None = None

    @field_validator("timestamp", "head_timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            format_utc(value)  # refuses naive datetimes
        return value

    @model_validator(mode="after")
    def _fields_of_version(self) -> Self:
        bound = (self.log_id, self.key_id, self.head_timestamp)
        if self.version == 2 and any(v is None for v in bound):
            raise ValueError("a version 2 cosignature needs log_id, key_id and head_timestamp")
        if self.version == 1 and any(v is not None for v in bound):
            raise ValueError("a version 1 cosignature has no log_id, key_id or head_timestamp")
        return self

    @field_serializer("timestamp", "head_timestamp")
    def _serialise_timestamp(self, value: datetime | None) -> str | None:
        return None if value is None else format_utc(value)

    def message(self) -> bytes:
        """The canonical bytes the site signed."""
        if self.version == 1:
            return canonical_json(
                {
                    "type": COSIGNATURE_TYPE_V1,
                    "site_id": self.site_id,
                    "tree_size": self.tree_size,
                    "root_hash": self.root_hash,
                    "timestamp": format_utc(self.timestamp),
                }
            )
        assert self.log_id is not None
        assert self.key_id is not None
        assert self.head_timestamp is not None
        return cosignature_message(
            log_id=self.log_id,
            key_id=self.key_id,
            site_id=self.site_id,
            tree_size=self.tree_size,
            root_hash=self.root_hash,
            head_timestamp=self.head_timestamp,
            timestamp=self.timestamp,
        )


def cosignature_message(
    *,
    log_id: str,
    key_id: str,
    site_id: str,
    tree_size: int,
    root_hash: str,
    head_timestamp: datetime,
    timestamp: datetime,
) -> bytes:
    """Canonical bytes of a version 2 cosignature (what the site's key signs)."""
    return canonical_json(
        {
            "type": COSIGNATURE_TYPE,
            "log_id": log_id,
            "key_id": key_id,
            "site_id": site_id,
            "tree_size": tree_size,
            "root_hash": root_hash,
            "head_timestamp": format_utc(head_timestamp),
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
