"""Identity: who is calling. Token verification for Keycloak and the embedded local issuer.

One verification path for every issuer: a :class:`TokenVerifier` checks a bearer token
against a :class:`JwksSource` (the local issuer's keys, or Keycloak's cached ``certs``) and
returns a :class:`Principal` with the caller's roles and organisation.

The Keycloak helpers are imported lazily: python-keycloak takes about half a second to import
and most importers of this package (for :class:`Principal`) never need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from concord_protocol.principals import Principal, Role
from consortium_server.identity.jwks import CachingJwksSource, JwksSource, StaticJwksSource
from consortium_server.identity.local_issuer import LocalIssuer, jwk_thumbprint
from consortium_server.identity.verifier import SUPPORTED_ALGORITHMS, TokenVerifier

if TYPE_CHECKING:
    from consortium_server.identity.keycloak import (
        keycloak_issuer,
        keycloak_jwks_source,
        realm_issuer_url,
    )

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "CachingJwksSource",
    "JwksSource",
    "LocalIssuer",
    "Principal",
    "Role",
    "StaticJwksSource",
    "TokenVerifier",
    "jwk_thumbprint",
    "keycloak_issuer",
    "keycloak_jwks_source",
    "realm_issuer_url",
]

_KEYCLOAK_NAMES = frozenset({"keycloak_issuer", "keycloak_jwks_source", "realm_issuer_url"})


def __getattr__(name: str) -> Any:
    if name in _KEYCLOAK_NAMES:
        module = importlib.import_module("consortium_server.identity.keycloak")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
