"""Keycloak (or any Keycloak-shaped OIDC issuer) through python-keycloak 7.

* :func:`keycloak_jwks_source`: the realm's signing keys (``certs``), cached, for the
  :class:`~consortium_server.identity.verifier.TokenVerifier`;
* :func:`keycloak_issuer`: the realm's ``iss`` value;

Concord's local issuer exposes the same realm paths (``/realms/<realm>/protocol/openid-connect
/token`` and ``/certs``), so these work against it as well.

Errors: a connection failure, a server error or a missing realm becomes
``ServiceUnavailableError(code="auth.issuer_unavailable")``; refused client credentials
become ``AuthenticationError("auth.invalid_token")``. Machine tokens (client credentials)
are fetched by :mod:`concord_protocol.tokens`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakConnectionError, KeycloakError

from concord_protocol.tokens import realm_issuer_url
from consortium_server.errors import AuthenticationError, ServiceUnavailableError
from consortium_server.identity.jwks import (
    DEFAULT_MIN_REFRESH_INTERVAL_S,
    CachingJwksSource,
    JwksSource,
)

__all__ = [
    "keycloak_issuer",
    "keycloak_jwks_source",
    "realm_issuer_url",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: OAuth error codes (RFC 6749 section 5.2) that mean "these client credentials are refused".
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})


def _openid(
    server_url: str,
    realm: str,
    *,
    client_id: str = "",
    client_secret: str | None = None,
    verify_tls: bool | str = True,
    timeout_s: int = 10,
) -> KeycloakOpenID:
    # python-keycloak joins paths with urljoin: without the trailing slash a server URL with
    # a path (``https://host/auth``) would lose its last segment.
    return KeycloakOpenID(
        server_url=server_url.rstrip("/") + "/",
        realm_name=realm,
        client_id=client_id,
        client_secret_key=client_secret,
        verify=verify_tls,
        timeout=timeout_s,
    )


def _oauth_error(error: KeycloakError) -> tuple[str | None, str | None]:
    """The ``error`` and ``error_description`` of an OAuth error response, if it has them."""
    body = error.response_body
    if not body:
        return None, None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    code, description = parsed.get("error"), parsed.get("error_description")
    return (
        code if isinstance(code, str) else None,
        description if isinstance(description, str) else None,
    )


def _call(action: str, server_url: str, realm: str, call: Callable[[], _T]) -> _T:
    """Run a python-keycloak call and translate its failures into domain errors."""
    where = f"the identity provider at {server_url} (realm '{realm}')"
    try:
        return call()
    except KeycloakConnectionError as error:
        raise ServiceUnavailableError(
            f"cannot reach {where} to {action}", code="auth.issuer_unavailable"
        ) from error
    except KeycloakError as error:
        status = error.response_code
        code, description = _oauth_error(error)
        detail = ": ".join(part for part in (code, description) if part) or f"HTTP {status}"
        if status == 401 or code in _CREDENTIAL_ERRORS:
            raise AuthenticationError(
                f"{where} refused to {action} ({detail})", code="auth.invalid_token"
            ) from error
        if status == 404:
            raise ServiceUnavailableError(
                f"{where} does not exist (HTTP 404) and cannot {action}; "
                "check the server URL and realm name",
                code="auth.issuer_unavailable",
            ) from error
        if status is not None and 400 <= status < 500:
            # A request the provider understood but rejected (scope, grant type, ...):
            # a configuration problem on our side, reported as an authentication failure.
            raise AuthenticationError(
                f"{where} rejected the request to {action} ({detail})", code="auth.invalid_token"
            ) from error
        raise ServiceUnavailableError(
            f"{where} failed to {action} ({detail})", code="auth.issuer_unavailable"
        ) from error
    except TypeError as error:  # python-keycloak: "Unexpected response type ..."
        raise ServiceUnavailableError(
            f"{where} sent an unexpected response when asked to {action}",
            code="auth.issuer_unavailable",
        ) from error


def keycloak_jwks_source(
    server_url: str,
    realm: str,
    *,
    ttl_s: float,
    verify_tls: bool | str = True,
    timeout_s: int = 10,
    min_refresh_interval_s: float = DEFAULT_MIN_REFRESH_INTERVAL_S,
) -> JwksSource:
    """A cached source of the realm's signing keys (python-keycloak's ``certs()``).

    ``verify_tls`` is True, False, or the path of a CA bundle. Keys are refetched after
    ``ttl_s`` seconds, or earlier (rate-limited) when a token names an unknown key id.
    """
    client = _openid(server_url, realm, verify_tls=verify_tls, timeout_s=timeout_s)

    def fetch() -> dict[str, Any]:
        return _call("fetch its signing keys", server_url, realm, client.certs)

    return CachingJwksSource(fetch, ttl_s, min_refresh_interval_s=min_refresh_interval_s)


def keycloak_issuer(
    server_url: str, realm: str, *, verify_tls: bool | str = True, timeout_s: int = 10
) -> str:
    """The realm's issuer (the ``iss`` its tokens carry).

    Read from the realm's discovery document (``well_known()``) when the provider can be
    reached, since a Keycloak behind a proxy may be configured with another public URL;
    otherwise ``{server_url}/realms/{realm}``.
    """
    fallback = realm_issuer_url(server_url, realm)
    client = _openid(server_url, realm, verify_tls=verify_tls, timeout_s=timeout_s)
    try:
        document = _call("read its discovery document", server_url, realm, client.well_known)
    except (ServiceUnavailableError, AuthenticationError) as error:
        logger.warning("%s; assuming issuer %s", error.public_message(), fallback)
        return fallback
    issuer = document.get("issuer")
    if isinstance(issuer, str) and issuer:
        return issuer
    logger.warning("discovery document of realm %r names no issuer; assuming %s", realm, fallback)
    return fallback
