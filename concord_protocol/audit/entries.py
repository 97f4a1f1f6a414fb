"""Audit entries: what HIPAA 164.312(b) reviewers look for, encoded as canonical JSON.

An :class:`AuditEntry` records who (OIDC subject, organisation, roles) did what (action) to
which object, with what outcome, for which purpose, under which policy decision and study
contract, when (UTC) and from where. Its RFC 8785 canonical JSON (:meth:`canonical_bytes`)
is the leaf the Merkle tree hashes, so the actor and the timestamp are covered by every
proof. Both sides decode entries with :meth:`AuditEntry.from_canonical_bytes`, which also
refuses bytes that are not exactly the canonical form.

Never put patient data, tokens or key material into an entry: ``details`` is for ids,
counts, digests and reasons.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

from concord_protocol.canonical import canonical_json
from concord_protocol.fields import Sha256Hex, format_utc, utcnow
from concord_protocol.principals import Principal

__all__ = [
    "ENTRY_FORMAT_VERSION",
    "MAX_ENTRY_BYTES",
    "Actor",
    "AuditEntry",
    "AuditObject",
    "Outcome",
    "PolicyDecision",
    "PolicyRef",
    "format_utc",
]

ENTRY_FORMAT_VERSION = 1
#: Upper bound on one encoded entry; audit entries hold references, never payloads.
MAX_ENTRY_BYTES = 64 * 1024

Text = Annotated[str, StringConstraints(min_length=1, max_length=255)]


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware UTC")
    return value.astimezone(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Outcome(StrEnum):
    """Result of the audited action."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


class PolicyDecision(StrEnum):
    """Decision of the data-use policy engine for the action."""

    ALLOW = "allow"
    DENY = "deny"


class Actor(_Strict):
    """Who acted: the verified OIDC identity (or a named system component)."""

    subject: Text = Field(description="OIDC `sub` of the caller, or e.g. `system:scheduler`.")
    organisation: Text | None = Field(default=None, description="The caller's organisation.")
    roles: tuple[Text, ...] = Field(default=(), description="Realm roles, sorted.")

    @field_validator("roles")
    @classmethod
    def _sorted_roles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))

    @classmethod
    def from_principal(cls, principal: Principal) -> Self:
        """The actor for a verified request principal."""
        return cls(
            subject=principal.subject,
            organisation=principal.organisation,
            roles=tuple(role.value for role in principal.roles),
        )


class AuditObject(_Strict):
    """What was acted upon, e.g. ``{"type": "study", "id": "..."}``."""

    type: Text
    id: Text


class PolicyRef(_Strict):
    """The policy set that decided, by hash, and its decision."""

    set_hash: Sha256Hex
    decision: PolicyDecision


class AuditEntry(_Strict):
    """One compliance audit event. Its canonical JSON is the Merkle leaf."""

    v: Literal[1] = Field(default=1, description="Entry format version.")
    actor: Actor
    action: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")] = Field(
        description="Dotted action name, e.g. `study.approved`.", max_length=100
    )
    object: AuditObject
    outcome: Outcome
    purpose: Text | None = Field(default=None, description="Declared purpose of use.")
    policy: PolicyRef | None = None
    contract_hash: Sha256Hex | None = Field(default=None, description="Study-contract hash.")
    at: datetime = Field(default_factory=utcnow, description="When it happened (UTC).")
    request_id: Text | None = None
    source: Text = Field(description="Emitting component, e.g. `consortium-server/api`.")
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _to_utc(value)

    @field_validator("details")
    @classmethod
    def _json_details(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details must be plain JSON: {exc}") from exc
        if len(encoded) > MAX_ENTRY_BYTES // 2:
            raise ValueError("details are too large for an audit entry")
        # Store the JSON round trip so that the model equals its decoded canonical form.
        decoded: dict[str, Any] = json.loads(encoded)
        return decoded

    @field_serializer("at")
    def _serialise_at(self, value: datetime) -> str:
        return format_utc(value)

    def canonical_bytes(self) -> bytes:
        """The RFC 8785 canonical UTF-8 JSON of this entry: the bytes that are hashed."""
        encoded = canonical_json(self.model_dump(mode="json"))
        if len(encoded) > MAX_ENTRY_BYTES:
            raise ValueError(f"audit entry is larger than {MAX_ENTRY_BYTES} bytes")
        return encoded

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> Self:
        """Decode stored entry bytes; refuse anything that is not exactly canonical."""
        if len(data) > MAX_ENTRY_BYTES:
            raise ValueError("audit entry is too large")
        entry = cls.model_validate_json(data)
        if entry.canonical_bytes() != data:
            raise ValueError("audit entry bytes are not in canonical form")
        return entry
