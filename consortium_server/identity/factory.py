"""Build the token verifier the settings ask for (one verification path, two issuers)."""

from __future__ import annotations

from consortium_server.identity.local_issuer import LocalIssuer
from consortium_server.identity.verifier import TokenVerifier
from consortium_server.settings import ServerSettings

__all__ = ["build_local_issuer", "build_verifier"]


def build_local_issuer(settings: ServerSettings) -> LocalIssuer:
    """The embedded issuer (its key is created in the data dir on first use)."""
    return LocalIssuer.load_or_create(settings.local_key_file(), settings.local_issuer_url())


def build_verifier(settings: ServerSettings, *, local_issuer: LocalIssuer | None) -> TokenVerifier:
    """A verifier for the local issuer or the configured Keycloak realm."""
    identity = settings.identity
    if identity.mode == "local":
        if local_issuer is None:
            raise ValueError("identity.mode=local needs the local issuer")
        return TokenVerifier(
            key_source=local_issuer.key_source(),
            issuer=local_issuer.issuer,
            audience=identity.audience,
            organisation_claim=identity.organisation_claim,
            leeway_s=identity.leeway_s,
            max_lifetime_s=identity.max_token_lifetime_s,
        )
    from consortium_server.identity.keycloak import keycloak_jwks_source, realm_issuer_url

    if not identity.keycloak_url:
        raise ValueError("identity.keycloak_url is required when identity.mode=keycloak")
    return TokenVerifier(
        key_source=keycloak_jwks_source(
            identity.keycloak_url,
            identity.keycloak_realm,
            ttl_s=identity.jwks_cache_s,
            verify_tls=identity.keycloak_verify_tls,
        ),
        issuer=identity.keycloak_issuer
        or realm_issuer_url(identity.keycloak_url, identity.keycloak_realm),
        audience=identity.audience,
        organisation_claim=identity.organisation_claim,
        leeway_s=identity.leeway_s,
        max_lifetime_s=identity.max_token_lifetime_s,
    )
