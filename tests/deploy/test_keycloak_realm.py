"""The Keycloak realm export carries what the server verifies: realm roles, the audience,
and per-site client-credentials clients with role site_node and an organisation claim."""

from __future__ import annotations

import json
from typing import Any

import pytest

from concord_protocol.principals import Role
from consortium_server.settings import IdentitySettings
from tests.deploy.charts import REPO

REALM_FILE = REPO / "deploy" / "keycloak" / "consortium-realm.json"


@pytest.fixture(scope="module")
def realm() -> dict[str, Any]:
    return json.loads(REALM_FILE.read_text())


def _mappers(client: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [m for m in client.get("protocolMappers", []) if m["protocolMapper"] == kind]


def test_realm_roles_are_the_servers_roles(realm: dict[str, Any]) -> None:
    assert realm["realm"] == IdentitySettings().keycloak_realm
    assert {r["name"] for r in realm["roles"]["realm"]} == {r.value for r in Role}


def test_token_clients_add_the_api_audience(realm: dict[str, Any]) -> None:
    audience = IdentitySettings().audience
    clients = [c for c in realm["clients"] if not c.get("bearerOnly")]
    assert clients
    for client in clients:
        mappers = _mappers(client, "oidc-audience-mapper")
        assert [m["config"]["included.custom.audience"] for m in mappers] == [audience]
        assert mappers[0]["config"]["access.token.claim"] == "true"


def test_site_clients_are_service_accounts_with_an_organisation(realm: dict[str, Any]) -> None:
    claim = IdentitySettings().organisation_claim
    sites = [c for c in realm["clients"] if c["clientId"].startswith("site-")]
    assert sites
    users = {u.get("serviceAccountClientId"): u for u in realm["users"]}
    for client in sites:
        assert client["serviceAccountsEnabled"] is True
        assert client["publicClient"] is False
        assert client["standardFlowEnabled"] is False
        assert client["directAccessGrantsEnabled"] is False
        (organisation,) = _mappers(client, "oidc-hardcoded-claim-mapper")
        assert organisation["config"]["claim.name"] == claim
        assert organisation["config"]["access.token.claim"] == "true"
        assert users[client["clientId"]]["realmRoles"] == [Role.SITE_NODE.value]
