"""The API behind a Keycloak-shaped realm: tokens from a real OIDC provider process,
obtained with python-keycloak, verified by the server's single verification path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concord_protocol.tokens import ClientCredentialsTokenSource
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.oidc_provider import OidcClient, OidcProvider

pytestmark = pytest.mark.integration


def _settings(provider: OidcProvider, db_url: str, tmp_path: Path, leeway_s: int) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path,
        database={"url": db_url, "auto_migrate": False},  # type: ignore[arg-type]
        identity={  # type: ignore[arg-type]
            "mode": "keycloak",
            "keycloak_url": provider.server_url,
            "keycloak_realm": provider.realm,
            "leeway_s": leeway_s,
        },
    )


@pytest.fixture
def api(oidc_provider: OidcProvider, db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(oidc_provider, db_url, tmp_path, 30))) as client:
        yield client


def _bearer(provider: OidcProvider, client: OidcClient) -> dict[str, str]:
    source = ClientCredentialsTokenSource(
        provider.server_url, provider.realm, client.client_id, client.client_secret
    )
    return {"Authorization": f"Bearer {source.token()}"}


def test_right_role_is_admitted(
    api: TestClient, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
) -> None:
    headers = _bearer(oidc_provider, realm_clients["researcher-cli"])
    me = api.get("/api/v1/me", headers=headers)
    assert me.status_code == 200, me.text
    assert me.json()["roles"] == ["researcher"]
    assert me.json()["issuer"] == oidc_provider.issuer
    assert api.get("/api/v1/studies", headers=headers).status_code == 200


def test_wrong_role_is_forbidden(
    api: TestClient, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
) -> None:
    steward = _bearer(oidc_provider, realm_clients["steward-hospital-a"])
    response = api.post("/api/v1/sites", json={}, headers=steward)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "auth.forbidden"


def test_tampered_token_is_401(
    api: TestClient, oidc_provider: OidcProvider, realm_clients: dict[str, OidcClient]
) -> None:
    token = _bearer(oidc_provider, realm_clients["researcher-cli"])["Authorization"][7:]
    header, payload, signature = token.split(".")
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"] = {"roles": ["consortium_admin"]}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    response = api.get(
        "/api/v1/me", headers={"Authorization": f"Bearer {header}.{forged}.{signature}"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "auth.invalid_token"


def test_expired_token_is_401(
    oidc_provider: OidcProvider,
    realm_clients: dict[str, OidcClient],
    db_url: str,
    tmp_path: Path,
) -> None:
    strict = _settings(oidc_provider, db_url, tmp_path, leeway_s=0)
    with TestClient(create_app(strict)) as api:
        headers = _bearer(oidc_provider, realm_clients["short-lived"])
        assert api.get("/api/v1/me", headers=headers).status_code == 200
        time.sleep(4.1)
        response = api.get("/api/v1/me", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "auth.expired_token"


def test_token_from_another_issuer_is_401(api: TestClient, tmp_path: Path) -> None:
    from consortium_server.identity.local_issuer import LocalIssuer

    stranger = LocalIssuer.load_or_create(
        tmp_path / "k.pem", "http://127.0.0.1:9/realms/consortium"
    )
    token = stranger.mint(
        subject="mallory", roles=["consortium_admin"], organisation=None, audience="concord-api"
    )
    response = api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
