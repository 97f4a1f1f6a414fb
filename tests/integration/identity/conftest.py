"""Fixtures for the identity integration tests: the Keycloak-shaped OIDC provider process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.oidc_provider import OidcClient, OidcProvider, running_oidc_provider

#: The realm's clients: who the tests can get tokens for.
CLIENTS = (
    OidcClient(
        "researcher-cli",
        "researcher-secret",
        roles=["researcher", "offline_access", "uma_authorization"],
    ),
    OidcClient(
        "steward-hospital-a",
        "steward-secret",
        roles=["data_steward"],
        organisation="hospital-a",
    ),
    OidcClient(
        "short-lived",
        "short-secret",
        roles=["researcher"],
        organisation="hospital-b",
        # Whole seconds in the token: 3 s leaves at least 2 s to use it before it expires.
        access_token_ttl=3,
    ),
)


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A running provider for the whole session (started only by tests that ask for it)."""
    with running_oidc_provider(CLIENTS, work_dir=tmp_path_factory.mktemp("oidc-provider")) as p:
        yield p


@pytest.fixture(scope="session")
def realm_clients() -> dict[str, OidcClient]:
    """The provider's clients by id; the local issuer mints the same identities."""
    return {client.client_id: client for client in CLIENTS}
