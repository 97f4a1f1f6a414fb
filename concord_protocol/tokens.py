"""OIDC client-credentials tokens for Concord's machine identities (site agents, the CLI).

A :class:`ClientCredentialsTokenSource` asks a Keycloak realm (or any issuer with
Keycloak's paths, such as the consortium server's local issuer) for an access token with
``grant_type=client_credentials`` at ``{server_url}/realms/{realm}/protocol/openid-connect
/token``, sending the client secret in the form body (``client_secret_post``), and reuses it
until shortly before it expires. It speaks plain HTTP (httpx), so a site needs no Keycloak
library.

Errors (:class:`~concord_protocol.errors.IdentityProviderError`): a connection failure, a
server error or a missing realm has code ``auth.issuer_unavailable``; refused credentials
(HTTP 401, or an OAuth ``invalid_client`` / ``unauthorized_client`` / ``invalid_grant``) and
other rejected requests have code ``auth.invalid_token``. Messages never hold the secret.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from concord_protocol.errors import IdentityProviderError

__all__ = ["ClientCredentialsTokenSource", "realm_issuer_url", "token_endpoint"]

logger = logging.getLogger("concord.tokens")

#: OAuth error codes (RFC 6749 section 5.2) that mean "these client credentials are refused".
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})


def realm_issuer_url(server_url: str, realm: str) -> str:
    """Keycloak's issuer for ``realm``: ``{server_url}/realms/{realm}``."""
    return f"{server_url.rstrip('/')}/realms/{realm}"


def token_endpoint(server_url: str, realm: str) -> str:
    """Keycloak's token endpoint of ``realm``."""
    return f"{realm_issuer_url(server_url, realm)}/protocol/openid-connect/token"


def _oauth_error(response: httpx.Response) -> tuple[str | None, str | None]:
    """The ``error`` and ``error_description`` of an OAuth error response, if it has them."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code, description = body.get("error"), body.get("error_description")
    return (
        code if isinstance(code, str) else None,
        description if isinstance(description, str) else None,
    )


class ClientCredentialsTokenSource:
    """Access tokens for a confidential client (``grant_type=client_credentials``).

    :meth:`token` returns a cached token and fetches a new one once the current one is
    within ``renew_margin_s`` seconds of expiry (or half its lifetime, if that is shorter,
    so very short-lived tokens are not refetched on every call). ``clock`` returns Unix
    seconds; inject it in tests. ``verify_tls`` is True, False or a CA bundle path.
    Thread-safe.
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
        timeout_s: float = 10,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        if renew_margin_s < 0:
            raise ValueError(f"renew_margin_s must not be negative, got {renew_margin_s}")
        self._server_url = server_url
        self._realm = realm
        self._client_id = client_id
        self._secret = client_secret
        self._renew_margin_s = renew_margin_s
        self._clock = clock
        self._verify = verify_tls
        self._timeout = timeout_s
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

    def _post(self) -> dict[str, Any]:
        where = f"the identity provider at {self._server_url} (realm '{self._realm}')"
        action = f"issue a token to client '{self._client_id}'"
        try:
            response = httpx.post(
                token_endpoint(self._server_url, self._realm),
                data={
                    "grant_type": "client_credentials",
                    "client_id": self._client_id,
                    "client_secret": self._secret,
                },
                verify=self._verify,
                timeout=self._timeout,
            )
        except httpx.TransportError as error:
            raise IdentityProviderError(
                f"cannot reach {where} to {action}", code="auth.issuer_unavailable"
            ) from error
        if response.is_success:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                return body
            raise IdentityProviderError(
                f"{where} sent an unexpected response when asked to {action}",
                code="auth.issuer_unavailable",
            )
        status = response.status_code
        code, description = _oauth_error(response)
        detail = ": ".join(part for part in (code, description) if part) or f"HTTP {status}"
        if status == 401 or code in _CREDENTIAL_ERRORS:
            raise IdentityProviderError(
                f"{where} refused to {action} ({detail})", code="auth.invalid_token"
            )
        if status == 404:
            raise IdentityProviderError(
                f"{where} does not exist (HTTP 404) and cannot {action}; "
                "check the server URL and realm name",
                code="auth.issuer_unavailable",
            )
        if 400 <= status < 500:
            # A request the provider understood but rejected (scope, grant type, ...):
            # a configuration problem on our side, reported as an authentication failure.
            raise IdentityProviderError(
                f"{where} rejected the request to {action} ({detail})", code="auth.invalid_token"
            )
        raise IdentityProviderError(
            f"{where} failed to {action} ({detail})", code="auth.issuer_unavailable"
        )

    def _fetch(self) -> tuple[str, float]:
        """Fetch a token; return it and the clock time at which to renew it."""
        requested_at = self._clock()
        response = self._post()
        access_token = response.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise IdentityProviderError(
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
