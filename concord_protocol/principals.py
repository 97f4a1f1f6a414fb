"""Who is calling: the verified identity every request carries."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Principal", "Role"]


class Role(StrEnum):
    """Realm roles Concord understands (from the token's ``realm_access.roles``)."""

    RESEARCHER = "researcher"
    DATA_STEWARD = "data_steward"
    SITE_NODE = "site_node"
    COMPLIANCE_OFFICER = "compliance_officer"
    CONSORTIUM_ADMIN = "consortium_admin"


@dataclass(frozen=True)
class Principal:
    """A verified caller.

    ``organisation`` comes from the token's organisation claim; for data stewards and
    site machine identities it names the hospital (the enrolled site's organisation).
    Unknown roles in the token are dropped, never guessed.
    """

    subject: str
    roles: frozenset[Role]
    organisation: str | None
    issuer: str
    client_id: str | None = None
    token_id: str | None = None
    expires_at: int | None = None

    def has(self, *roles: Role) -> bool:
        """True if the principal holds any of ``roles``."""
        return any(role in self.roles for role in roles)
