"""Keycloak (or any Keycloak-shaped OIDC issuer) through python-keycloak 7.

* :func:`keycloak_jwks_source`: the realm's signing keys (``certs``), cached, for the
  :class:`~consortium_server.identity.verifier.TokenVerifier`;
* :func:`keycloak_issuer`: the realm's ``iss`` value;
* :class:`ClientCredentialsTokenSource`: machine tokens for site agents and the CLI
  (``grant_type=client_credentials``), renewed shortly before they expire.

Concord's local issuer exposes the same realm paths (``/realms/<realm>/protocol/openid-connect
/token`` and ``/certs``), so these work against it as well.

Errors: a connection failure, a server error or a missing realm becomes
``ServiceUnavailableError(code="auth.issuer_unavailable")``; refused client credentials
become ``AuthenticationError("auth.invalid_token")``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakConnectionError, KeycloakError

from consortium_server.errors import AuthenticationError, ServiceUnavailableError
from consortium_server.identity.jwks import (
    DEFAULT_MIN_REFRESH_INTERVAL_S,
    CachingJwksSource,
    JwksSource,
)

__all__ = [
    "ClientCredentialsTokenSource",
    "keycloak_issuer",
    "keycloak_jwks_source",
    "realm_issuer_url",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: OAuth error codes (RFC 6749 section 5.2) that mean "these client credentials are refused".
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})


def realm_issuer_url(server_url: str, realm: str) -> str:
    """Keycloak's issuer for ``realm``: ``{server_url}/realms/{realm}``."""
    return f"{server_url.rstrip('/')}/realms/{realm}"


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
                "auth.invalid_token", f"{where} refused to {action} ({detail})"
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
                "auth.invalid_token", f"{where} rejected the request to {action} ({detail})"
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


class ClientCredentialsTokenSource:
    """Access tokens for a confidential client (``grant_type=client_credentials``).

    :meth:`token` returns a cached token and fetches a new one once the current one is
    within ``renew_margin_s`` seconds of expiry (or half its lifetime, if that is shorter,
    so very short-lived tokens are not refetched on every call). ``clock`` returns Unix
    seconds; inject it in tests. Thread-safe.
    """

    def __init__(
        self,
        server_url: str,
        realm: str,
        client_id: str,
        client_secret: str,
        *,
        renew_margin_s: float = 30,
        clock: Callable[[], float] = time.time,
        verify_tls: bool | str = True,
        timeout_s: int = 10,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        if renew_margin_s < 0:
            raise ValueError(f"renew_margin_s must not be negative, got {renew_margin_s}")
        self._server_url = server_url
        self._realm = realm
        self._client_id = client_id
        self._renew_margin_s = renew_margin_s
        self._clock = clock
        self._client = _openid(
            server_url,
            realm,
            client_id=client_id,
            client_secret=client_secret,
            verify_tls=verify_tls,
            timeout_s=timeout_s,
        )
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0

    @property
    def client_id(self) -> str:
        """The client whose tokens this source fetches."""
        return self._client_id

    def token(self) -> str:
        """A valid access token (the raw JWT, without ``Bearer``), renewed when needed."""
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._token, self._renew_at = self._fetch()
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token (for example after the API answered 401 with it)."""
        with self._lock:
            self._token = None

    def _fetch(self) -> tuple[str, float]:
        """Fetch a token; return it and the clock time at which to renew it."""
        requested_at = self._clock()
        response = _call(
            f"issue a token to client '{self._client_id}'",
            self._server_url,
            self._realm,
            lambda: self._client.token(grant_type="client_credentials"),
        )
        access_token = response.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ServiceUnavailableError(
                f"the identity provider at {self._server_url} returned no access token "
                f"for client '{self._client_id}'",
                code="auth.issuer_unavailable",
            )
        expires_in = response.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            lifetime = max(float(expires_in), 0.0)
        else:
            logger.warning("token response has no expires_in; the token will not be reused")
            lifetime = 0.0
        margin = min(self._renew_margin_s, lifetime / 2)
        # Measured from before the request, so a slow response cannot make us overshoot.
        return access_token, requested_at + lifetime - margin

    def __repr__(self) -> str:
        return (
            f"ClientCredentialsTokenSource(server_url={self._server_url!r}, "
            f"realm={self._realm!r}, client_id={self._client_id!r})"
        )
