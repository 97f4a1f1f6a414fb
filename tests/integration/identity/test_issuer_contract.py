"""One contract for every token issuer Concord trusts, run against each of them.

``TestIssuerContract`` is written once against the :class:`IssuerUnderTest` interface; the
``issuer_factory`` fixture runs it against

* ``local``: the embedded :class:`LocalIssuer` (tokens minted in-process), and
* ``keycloak``: a Keycloak-shaped realm served by the oidc-provider process, with tokens
  obtained over HTTP by :class:`ClientCredentialsTokenSource` (httpx) and keys
  fetched by :func:`keycloak_jwks_source`.

Both must yield identical principals and identical error codes through the one
:class:`TokenVerifier`. Keycloak-only client behaviour (renewal, bad secrets, unreachable
server) is tested at the end.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from keycloak import KeycloakOpenID

from concord_protocol.errors import IdentityProviderError
from concord_protocol.tokens import ClientCredentialsTokenSource
from consortium_server.errors import AuthenticationError, ServiceUnavailableError
from consortium_server.identity import (
    JwksSource,
    LocalIssuer,
    Role,
    TokenVerifier,
    keycloak_issuer,
    keycloak_jwks_source,
)
from tests.support.oidc_provider import OidcClient, OidcProvider

pytestmark = pytest.mark.integration

AUDIENCE = "concord-api"


class IssuerUnderTest(ABC):
    """What the contract needs from an issuer: its name, its keys, and tokens for clients."""

    issuer: str

    @abstractmethod
    def key_source(self) -> JwksSource:
        """Where the verifier gets this issuer's public keys."""

    @abstractmethod
    def token_for(self, client: OidcClient) -> str:
        """A fresh, valid access token for ``client`` (audience ``concord-api``)."""

    @abstractmethod
    def expired_token(self, client: OidcClient) -> str:
        """A correctly signed token for ``client`` that has already expired."""

    def verifier(self, **overrides: Any) -> TokenVerifier:
        """The one verifier, configured for this issuer unless ``overrides`` say otherwise."""
        settings: dict[str, Any] = {
            "key_source": self.key_source(),
            "issuer": self.issuer,
            "audience": AUDIENCE,
        }
        settings.update(overrides)
        return TokenVerifier(**settings)


class LocalIssuerUnderTest(IssuerUnderTest):
    def __init__(self, key_file: Path) -> None:
        self._local = LocalIssuer.load_or_create(
            key_file, "http://127.0.0.1:8000/realms/concord", key_type="EC"
        )
        self.issuer = self._local.issuer

    def key_source(self) -> JwksSource:
        return self._local.key_source()

    def token_for(self, client: OidcClient) -> str:
        return self._mint(client)

    def expired_token(self, client: OidcClient) -> str:
        return self._mint(client, ttl_s=60, now=int(time.time()) - 3600)

    def _mint(self, client: OidcClient, **kwargs: Any) -> str:
        return self._local.mint(
            subject=client.client_id,
            roles=client.roles,
            organisation=client.organisation,
            audience=AUDIENCE,
            client_id=client.client_id,
            **kwargs,
        )


class KeycloakIssuerUnderTest(IssuerUnderTest):
    def __init__(self, provider: OidcProvider) -> None:
        self._provider = provider
        self.issuer = keycloak_issuer(provider.server_url, provider.realm)

    def key_source(self) -> JwksSource:
        return keycloak_jwks_source(self._provider.server_url, self._provider.realm, ttl_s=300)

    def token_source(self, client: OidcClient, **kwargs: Any) -> ClientCredentialsTokenSource:
        return ClientCredentialsTokenSource(
            self._provider.server_url,
            self._provider.realm,
            client.client_id,
            client.client_secret,
            **kwargs,
        )

    def token_for(self, client: OidcClient) -> str:
        return self.token_source(client).token()

    def expired_token(self, client: OidcClient) -> str:
        short_lived = self._provider.clients["short-lived"]
        token = self.token_source(short_lived).token()
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        time.sleep(max(0.0, exp - time.time()) + 0.05)
        return token


@pytest.fixture(params=["local", "keycloak"])
def issuer_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], IssuerUnderTest]:
    """Builds the issuer under test; the provider process starts only for ``keycloak``."""
    if request.param == "local":
        return lambda: LocalIssuerUnderTest(tmp_path / "local-issuer.pem")
    provider: OidcProvider = request.getfixturevalue("oidc_provider")
    return lambda: KeycloakIssuerUnderTest(provider)


def tamper_roles(token: str, roles: list[str]) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"] = {"roles": roles}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def expect_auth_error(verifier: TokenVerifier, token: str, code: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    assert caught.value.code == code
    assert caught.value.status == 401
    assert token not in str(caught.value)
    return caught.value


class TestIssuerContract:
    """Every issuer, through the same verifier, must behave the same way."""

    def test_researcher_token_gives_principal(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        client = realm_clients["researcher-cli"]
        token = under_test.token_for(client)
        principal = under_test.verifier().verify(token)
        assert principal.subject == "researcher-cli"
        assert principal.client_id == "researcher-cli"
        assert principal.roles == frozenset({Role.RESEARCHER})  # offline_access etc. dropped
        assert principal.organisation is None
        assert principal.issuer == under_test.issuer
        assert principal.token_id
        assert principal.expires_at is not None
        assert principal.expires_at > time.time()

    def test_data_steward_token_carries_organisation(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        token = under_test.token_for(realm_clients["steward-hospital-a"])
        principal = under_test.verifier().verify(token)
        assert principal.subject == "steward-hospital-a"
        assert principal.roles == frozenset({Role.DATA_STEWARD})
        assert principal.organisation == "hospital-a"
        assert principal.has(Role.DATA_STEWARD)
        assert not principal.has(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)

    def test_tampered_token_is_invalid(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        token = under_test.token_for(realm_clients["researcher-cli"])
        forged = tamper_roles(token, ["consortium_admin"])
        error = expect_auth_error(under_test.verifier(), forged, "auth.invalid_token")
        assert "signature does not verify" in error.message

    def test_expired_token(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        token = under_test.expired_token(realm_clients["researcher-cli"])
        error = expect_auth_error(under_test.verifier(leeway_s=0), token, "auth.expired_token")
        assert "expired at" in error.message

    def test_token_for_another_issuer_is_invalid(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        token = under_test.token_for(realm_clients["researcher-cli"])
        expected = f"{under_test.issuer.rsplit('/', 1)[0]}/other-realm"
        error = expect_auth_error(under_test.verifier(issuer=expected), token, "auth.invalid_token")
        assert error.message == (
            f"token issuer '{under_test.issuer}' is not the configured issuer '{expected}'"
        )

    def test_token_signed_by_a_foreign_key_is_invalid(
        self, issuer_factory: Callable[[], IssuerUnderTest], tmp_path: Path
    ) -> None:
        under_test = issuer_factory()
        forger = LocalIssuer.load_or_create(
            tmp_path / "forger.pem", under_test.issuer, key_type="EC"
        )
        token = forger.mint(
            subject="mallory", roles=["consortium_admin"], organisation=None, audience=AUDIENCE
        )
        error = expect_auth_error(under_test.verifier(), token, "auth.invalid_token")
        assert "does not publish" in error.message

    def test_wrong_audience_is_invalid(
        self, issuer_factory: Callable[[], IssuerUnderTest], realm_clients: dict[str, OidcClient]
    ) -> None:
        under_test = issuer_factory()
        token = under_test.token_for(realm_clients["researcher-cli"])
        error = expect_auth_error(
            under_test.verifier(audience="billing-api"), token, "auth.invalid_token"
        )
        assert error.message == "token audience does not include 'billing-api'"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class TestKeycloakClient:
    """python-keycloak based helpers against the Keycloak-shaped realm."""

    def test_issuer_is_read_from_discovery(self, oidc_provider: OidcProvider) -> None:
        assert keycloak_issuer(oidc_provider.server_url, "consortium") == oidc_provider.issuer
        assert oidc_provider.issuer == f"{oidc_provider.server_url}/realms/consortium"

    def test_issuer_falls_back_when_unreachable(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}"
        assert keycloak_issuer(url, "consortium") == f"{url}/realms/consortium"

    def test_token_is_reused_then_renewed_before_expiry(
        self, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
    ) -> None:
        client = realm_clients["researcher-cli"]  # 300 s tokens
        clock = FakeClock()
        source = ClientCredentialsTokenSource(
            oidc_provider.server_url,
            "consortium",
            client.client_id,
            client.client_secret,
            renew_margin_s=30,
            clock=clock,
        )
        first = source.token()
        clock.now += 200
        assert source.token() == first
        clock.now += 69  # 269 s: still 31 s left, outside the 30 s margin
        assert source.token() == first
        clock.now += 2  # 271 s: inside the margin
        renewed = source.token()
        assert renewed != first
        verifier = TokenVerifier(
            key_source=keycloak_jwks_source(oidc_provider.server_url, "consortium", ttl_s=60),
            issuer=oidc_provider.issuer,
            audience=AUDIENCE,
        )
        assert verifier.verify(renewed).subject == client.client_id
        assert source.token() == renewed

    def test_bad_client_secret(
        self, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
    ) -> None:
        client = realm_clients["researcher-cli"]
        source = ClientCredentialsTokenSource(
            oidc_provider.server_url, "consortium", client.client_id, "wrong-secret"
        )
        with pytest.raises(IdentityProviderError) as caught:
            source.token()
        assert caught.value.code == "auth.invalid_token"
        assert "researcher-cli" in caught.value.message
        assert "invalid_client" in caught.value.message
        assert "wrong-secret" not in caught.value.message

    def test_unknown_client(self, oidc_provider: OidcProvider) -> None:
        source = ClientCredentialsTokenSource(
            oidc_provider.server_url, "consortium", "nobody", "whatever"
        )
        with pytest.raises(IdentityProviderError) as caught:
            source.token()
        assert caught.value.code == "auth.invalid_token"

    def test_unreachable_server(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}"
        source = ClientCredentialsTokenSource(url, "consortium", "researcher-cli", "secret")
        with pytest.raises(IdentityProviderError) as caught:
            source.token()
        assert caught.value.code == "auth.issuer_unavailable"
        assert "cannot reach" in caught.value.message

    def test_verifier_reports_unreachable_issuer(
        self, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
    ) -> None:
        client = realm_clients["researcher-cli"]
        token = ClientCredentialsTokenSource(
            oidc_provider.server_url, "consortium", client.client_id, client.client_secret
        ).token()
        url = f"http://127.0.0.1:{closed_port()}"
        verifier = TokenVerifier(
            key_source=keycloak_jwks_source(url, "consortium", ttl_s=60),
            issuer=oidc_provider.issuer,
            audience=AUDIENCE,
        )
        with pytest.raises(ServiceUnavailableError) as caught:
            verifier.verify(token)
        assert caught.value.code == "auth.issuer_unavailable"

    def test_unknown_realm(self, oidc_provider: OidcProvider) -> None:
        source = ClientCredentialsTokenSource(oidc_provider.server_url, "no-such-realm", "a", "b")
        with pytest.raises(IdentityProviderError, match="does not exist") as caught:
            source.token()
        assert caught.value.code == "auth.issuer_unavailable"

    def test_realm_public_key_matches_jwks(self, oidc_provider: OidcProvider) -> None:
        # python-keycloak's public_key() reads GET /realms/<realm>: the provider must agree
        # with its own JWKS there, as Keycloak does.
        openid = KeycloakOpenID(
            server_url=oidc_provider.server_url + "/", realm_name="consortium", client_id=""
        )
        der = base64.b64decode(openid.public_key())
        from_realm = serialization.load_der_public_key(der)
        (jwk,) = openid.certs()["keys"]
        from_jwks = jwt.PyJWK(jwk).key
        assert from_realm.public_numbers() == from_jwks.public_numbers()  # type: ignore[union-attr]
