"""Request and response bodies of the sites API."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from concord_protocol.site_keys import KeyRotation, site_key_fingerprint
from consortium_server.schemas import Slug, StrictModel
from consortium_server.sites.models import Site, SiteStatus

__all__ = ["KeyRotationPublic", "SiteEnrol", "SitePublic", "SiteRevoke"]

Email = Annotated[
    str,
    StringConstraints(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=320, strip_whitespace=True),
]


def _raw_32_byte_key(value: str, what: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} must be base64") from exc
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 raw bytes (got {len(raw)})")
    return value


class SiteEnrol(StrictModel):
    """What the consortium operator enters to enrol a hospital."""

    id: Slug = Field(description="Short stable id, e.g. `hospital-a`.")
    organisation: Annotated[str, StringConstraints(min_length=2, max_length=200)] = Field(
        description="Organisation name exactly as it appears in the site's tokens."
    )
    display_name: Annotated[str, StringConstraints(min_length=2, max_length=200)]
    contact_email: Email
    signing_public_key: str = Field(description="Ed25519 public key, base64 of 32 raw bytes.")
    exchange_public_key: str = Field(description="X25519 public key, base64 of 32 raw bytes.")
    supernode_public_key: Annotated[str, StringConstraints(max_length=2000)] = Field(
        description="Flower SuperNode public key, OpenSSH format (ecdsa-sha2-nistp256/384/521)."
    )

    @field_validator("signing_public_key")
    @classmethod
    def _signing(cls, value: str) -> str:
        return _raw_32_byte_key(value, "signing_public_key")

    @field_validator("exchange_public_key")
    @classmethod
    def _exchange(cls, value: str) -> str:
        return _raw_32_byte_key(value, "exchange_public_key")

    @field_validator("supernode_public_key")
    @classmethod
    def _supernode(cls, value: str) -> str:
        value = value.strip()
        try:
            key = load_ssh_public_key(value.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # UnsupportedAlgorithm: a well-formed line of a key type cryptography lacks
            # (`ssh-foo AAAA...`), which is no more usable than a malformed one.
            raise ValueError("supernode_public_key is not an OpenSSH public key") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("supernode_public_key must be a NIST EC key (ssh-keygen -t ecdsa)")
        return value


class SiteRevoke(StrictModel):
    """Why a site is being revoked."""

    reason: Annotated[str, StringConstraints(min_length=3, max_length=2000)]


class SitePublic(BaseModel):
    """A site as shown to consortium members (public keys only)."""

    model_config = ConfigDict(from_attributes=True)

    @model_validator(mode="before")
    @classmethod
    def _fingerprint(cls, value: Any) -> Any:
        if isinstance(value, Site):
            fingerprint = site_key_fingerprint(value.signing_public_key, value.exchange_public_key)
            return {c: getattr(value, c) for c in _SITE_COLUMNS} | {"key_fingerprint": fingerprint}
        return value

    id: str
    organisation: str
    display_name: str
    contact_email: str
    signing_public_key: str
    exchange_public_key: str
    key_fingerprint: str = Field(
        description="SHA-256 of the two public keys: compare it with the one the site's IT "
        "reads from `site-node keys fingerprint` before pinning (never trust this copy alone)."
    )
    supernode_public_key: str
    supernode_node_id: str | None = Field(
        default=None,
        description="The SuperLink's node id for the key: set while the key is registered.",
    )
    status: SiteStatus
    enrolled_at: datetime
    enrolled_by: str
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class KeyRotationPublic(BaseModel):
    """One recorded key rotation: the signed statement, verbatim, and when it was recorded."""

    seq: int
    previous_fingerprint: str
    fingerprint: str
    rotation: KeyRotation
    recorded_by: str
    recorded_at: datetime


_SITE_COLUMNS = (
    "id",
    "organisation",
    "display_name",
    "contact_email",
    "signing_public_key",
    "exchange_public_key",
    "supernode_public_key",
    "supernode_node_id",
    "status",
    "enrolled_at",
    "enrolled_by",
    "revoked_at",
    "revoked_reason",
)
