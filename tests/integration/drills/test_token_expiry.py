"""Drill: a site's access token expires mid-study; a revoked site is refused.

Real processes: the Keycloak-shaped test OIDC provider (npm ``oidc-provider``), the
consortium server in ``keycloak`` mode (no clock leeway), and hospital-a's site agent
(``site-node run``) with client credentials whose tokens live 3 seconds. The agent keeps
witnessing new audit heads long after its first token died (a token of the same client
fetched at the start is refused with 401 by then): it renews. Once the operator revokes
the site, the agent's calls are refused with ``auth.site_revoked`` (and so is a fresh token
of the site's own client), and the site no longer cosigns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from concord_protocol.processes import ManagedProcess, flower_env, spawn
from concord_protocol.tokens import ClientCredentialsTokenSource
from site_node.key_files import init_site_keys
from tests.support.drills import PYTHON_BIN, start_server_process, wait_for
from tests.support.oidc_provider import OidcClient, OidcProvider, running_oidc_provider
from tests.support.world import site_enrolment

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

TTL_S = 3
SITE = "hospital-a"
ORG = "Hospital A"
CLIENTS = (
    OidcClient("operator", "operator-secret", roles=["consortium_admin"], organisation="Office"),
    OidcClient("auditor", "auditor-secret", roles=["compliance_officer"], organisation="Office"),
    OidcClient(
        "site-hospital-a",
        "site-secret",
        roles=["site_node"],
        organisation=ORG,
        access_token_ttl=TTL_S,
    ),
)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OidcProvider]:
    with running_oidc_provider(CLIENTS, work_dir=tmp_path / "oidc") as running:
        yield running


@pytest.fixture
def server(provider: OidcProvider, tmp_path: Path) -> Iterator[str]:
    proc, url = start_server_process(
        tmp_path / "server",
        {
            "CONCORD_IDENTITY__MODE": "keycloak",
            "CONCORD_IDENTITY__KEYCLOAK_URL": provider.server_url,
            "CONCORD_IDENTITY__KEYCLOAK_REALM": provider.realm,
            "CONCORD_IDENTITY__LEEWAY_S": "0",
        },
    )
    try:
        yield url
    finally:
        proc.stop()


def _tokens(provider: OidcProvider, client_id: str) -> ClientCredentialsTokenSource:
    client = provider.clients[client_id]
    return ClientCredentialsTokenSource(
        provider.server_url, provider.realm, client.client_id, client.client_secret
    )


class Api:
    def __init__(self, url: str, tokens: ClientCredentialsTokenSource) -> None:
        self.url = url
        self.tokens = tokens

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens.token()}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)


def _start_agent(tmp_path: Path, url: str, provider: OidcProvider) -> ManagedProcess:
    client = provider.clients["site-hospital-a"]
    state = tmp_path / SITE
    env = {
        **flower_env(state / "home"),
        "CONCORD_SITE_SITE_ID": SITE,
        "CONCORD_SITE_ORGANISATION": ORG,
        "CONCORD_SITE_STATE_DIR": str(state),
        "CONCORD_SITE_API_URL": url,
        "CONCORD_SITE_TOKEN_URL": provider.server_url,
        "CONCORD_SITE_REALM": provider.realm,
        "CONCORD_SITE_CLIENT_ID": client.client_id,
        "CONCORD_SITE_CLIENT_SECRET": client.client_secret,
        "CONCORD_SITE_POLL_INTERVAL_S": "1",
    }
    return spawn(
        "agent-hospital-a",
        [str(PYTHON_BIN / "site-node"), "run"],
        env=env,
        log_path=state / "agent.log",
    )


def _agent_events(agent: ManagedProcess) -> list[dict[str, Any]]:
    events = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def test_site_agent_renews_expiring_tokens_and_a_revoked_site_is_refused(
    provider: OidcProvider, server: str, tmp_path: Path
) -> None:
    admin = Api(server, _tokens(provider, "operator"))
    auditor = Api(server, _tokens(provider, "auditor"))
    keys = init_site_keys(tmp_path / SITE / "keys")
    body = site_enrolment(SITE, ORG) | {
        "signing_public_key": keys.signing_public_b64,
        "exchange_public_key": keys.exchange_public_b64,
    }
    assert admin.call("POST", "/api/v1/sites", json=body).status_code == 201
    # A token of the site's client, taken now: it will be long dead when the agent is done.
    stale = _tokens(provider, "site-hospital-a").token()

    def cosigned_by_site(size: int) -> bool:
        head = auditor.call("GET", "/api/v1/audit/heads/latest").json()
        if head["tree_size"] < size:
            return False
        return any(c["site_id"] == SITE for c in head["cosignatures"])

    agent = _start_agent(tmp_path, server, provider)
    try:
        started = time.monotonic()
        # Over several token lifetimes, new audit entries appear (sites enrolled); the agent
        # witnesses each new head, so each time it holds a valid (renewed) token.
        for i in range(4):
            other = f"hospital-x{i}"
            response = admin.call(
                "POST", "/api/v1/sites", json=site_enrolment(other, f"Hospital X{i}")
            )
            assert response.status_code == 201, response.text
            size: int = auditor.call("GET", "/api/v1/audit/heads/latest").json()["tree_size"]
            wait_for(f"{SITE} to cosign head {size}", partial(cosigned_by_site, size), timeout=60)
            time.sleep(TTL_S)
        assert time.monotonic() - started > 3 * TTL_S
        assert agent.alive(), agent.log_tail()
        refused = httpx.get(
            f"{server}/api/v1/audit/heads/latest",
            headers={"Authorization": f"Bearer {stale}"},
            timeout=30,
        )
        assert refused.status_code == 401, refused.text

        # Revocation: the site's calls are refused, the agent's included.
        response = admin.call(
            "POST", f"/api/v1/sites/{SITE}/revoke", json={"reason": "drill: keys compromised"}
        )
        assert response.status_code == 200, response.text
        response = admin.call(
            "POST", "/api/v1/sites", json=site_enrolment("hospital-y", "Hospital Y")
        )
        assert response.status_code == 201, response.text
        size = auditor.call("GET", "/api/v1/audit/heads/latest").json()["tree_size"]

        def agent_refused() -> bool:
            return any(
                e.get("code") == "auth.site_revoked" and e.get("event") == "agent.step_failed"
                for e in _agent_events(agent)
            )

        wait_for("the agent to be refused as revoked", agent_refused, timeout=60)
        head = auditor.call("GET", "/api/v1/audit/heads/latest").json()
        assert head["tree_size"] >= size
        assert not any(c["site_id"] == SITE for c in head["cosignatures"])
        site = Api(server, _tokens(provider, "site-hospital-a"))
        direct = site.call(
            "POST",
            f"/api/v1/audit/heads/{head['tree_size']}/cosignatures",
            json={
                "site_id": SITE,
                "root_hash": head["root_hash"],
                "timestamp": head["timestamp"],
                "signature": "AAAA",
                "log_id": head["log_id"],
                "key_id": head["key_id"],
                "head_timestamp": head["timestamp"],
            },
        )
        assert direct.status_code == 403, direct.text
        assert direct.json()["error"]["code"] == "auth.site_revoked"
    finally:
        agent.stop()
    renewals = [e for e in _agent_events(agent) if e.get("event") == "agent.step_failed"]
    assert all(e.get("code") == "auth.site_revoked" for e in renewals), renewals
