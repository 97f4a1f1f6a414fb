"""ServerSettings: the one place the consortium server reads its configuration.

Built in the entry point (``consortium server``, ``create_app``), never at import. Values
come from arguments, then ``CONCORD_*`` environment variables (nested sections with ``__``,
e.g. ``CONCORD_DATABASE__URL``), then files in ``secrets_dir`` (Kubernetes secrets), then
the defaults below, which are the embedded single-machine defaults.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from concord_protocol.audit.cosignatures import DEFAULT_LOG_ID
from concord_protocol.policy.shipped import shipped_policies

__all__ = [
    "ApiSettings",
    "AuditSettings",
    "DatabaseSettings",
    "Environment",
    "FederationSettings",
    "IdentitySettings",
    "PolicySettings",
    "ServerSettings",
    "StudySettings",
]

PLACEHOLDER_SECRETS = frozenset({"", "change-me", "changeme", "secret", "password", "dev"})


class Environment(StrEnum):
    """Where the server runs. Only ``development`` accepts placeholder secrets."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class DatabaseSettings(BaseModel):
    """Database connection. Empty ``url`` means the embedded SQLite file in ``data_dir``."""

    url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://concord@db/concord. "
        "Empty: sqlite file <data_dir>/concord.db.",
    )
    echo: bool = Field(default=False, description="Log every SQL statement (debugging only).")
    pool_size: int = Field(default=5, ge=1, le=100, description="PostgreSQL pool size.")
    auto_migrate: bool = Field(
        default=True,
        description="Run Alembic migrations at start-up. Turn off where a Job runs them.",
    )


class IdentitySettings(BaseModel):
    """How bearer tokens are verified: the built-in local issuer or a Keycloak realm."""

    mode: Literal["local", "keycloak"] = Field(
        default="local", description="`local`: the server's own issuer (development only)."
    )
    audience: str = Field(default="concord-api", description="Required `aud` of access tokens.")
    organisation_claim: str = Field(
        default="organisation", description="Token claim naming the caller's organisation."
    )
    leeway_s: int = Field(default=30, ge=0, le=300, description="Clock skew allowed on exp/nbf.")
    refused_sign_in_window_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Refused sign-ins are aggregated per window of this many seconds.",
    )
    refused_sign_in_entries: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="Refused sign-ins written one by one per window (the first of each "
        "source and code); the rest are counted into one summary entry per window.",
    )
    refused_sign_in_sources: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Distinct (source, code) counters per window; beyond, one `other` bucket.",
    )
    max_token_lifetime_s: int = Field(
        default=86_400,
        ge=60,
        le=30 * 86_400,
        description="Longest lifetime (exp - iat) of an accepted access token: a token minted "
        "to last longer is refused, whoever signed it (Keycloak's default is 300 s).",
    )
    jwks_cache_s: int = Field(default=300, ge=0, description="How long the JWKS is cached.")
    local_realm: str = Field(default="local", description="Realm name of the local issuer.")
    local_key_file: Path | None = Field(
        default=None, description="Local issuer signing key (PEM). Empty: <data_dir>/issuer.pem."
    )
    keycloak_url: str | None = Field(
        default=None, description="Keycloak base URL, e.g. https://keycloak.example.org."
    )
    keycloak_realm: str = Field(default="consortium", description="Keycloak realm name.")
    keycloak_issuer: str | None = Field(
        default=None,
        description="Expected `iss` when Keycloak's public URL differs from keycloak_url; "
        "empty: <keycloak_url>/realms/<realm>.",
    )
    keycloak_verify_tls: bool = Field(
        default=True, description="Verify Keycloak's certificate (false is refused in production)."
    )


class ApiSettings(BaseModel):
    """HTTP listener and request limits."""

    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8600, ge=1, le=65535, description="TCP port.")
    public_url: str | None = Field(
        default=None, description="URL clients use; empty: http://<host>:<port>."
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_key_body_bytes: int = Field(
        default=64 * 1_048_576,
        ge=1024,
        description="Largest body on the study-key relay (sealed CKKS keys, ~175 KB per site) "
        "and on the released-model upload (8 bytes per parameter).",
    )


class StudySettings(BaseModel):
    """Study lifecycle limits."""

    approval_window_days: int = Field(
        default=30, ge=1, le=365, description="Days sites have to decide before a study expires."
    )


class PolicySettings(BaseModel):
    """Data-use policies (Cedar) and who belongs to the consortium."""

    directory: Path | None = Field(
        default=None,
        description="Policy directory seeded as version 1 at first start (schema.cedarschema "
        "and consortium/*.cedar). Empty: the policies/ shipped with Concord.",
    )
    member_organisations: list[str] = Field(
        default_factory=list,
        description="Organisations whose researchers may submit studies, besides the "
        "organisations of enrolled sites.",
    )


class FederationSettings(BaseModel):
    """How the server reaches the Flower SuperLink that runs studies."""

    superlink_address: str | None = Field(
        default=None,
        description="host:port of the SuperLink (its Control API). Empty: runs are disabled.",
    )
    root_certificates: Path | None = Field(
        default=None, description="CA certificate of the SuperLink's TLS (PEM)."
    )
    client_certificate: Path | None = Field(
        default=None,
        description="This server's client certificate (PEM, signed by the federation CA) for "
        "the SuperLink's Control listener, which requires one (mutual TLS).",
    )
    client_private_key: Path | None = Field(
        default=None, description="Private key (PEM) of federation.client_certificate."
    )
    insecure: bool = Field(
        default=False,
        description="Plain gRPC to the SuperLink (tests on loopback only; refused in production).",
    )
    app_dir: Path | None = Field(
        default=None, description="The Flower app bundle directory. Empty: the installed one."
    )
    serverapp_token_file: Path | None = Field(
        default=None,
        description="The federation token the ServerApp authenticates with on the internal "
        "API (the SuperLink's pod mounts the same secret as CONCORD_SERVERAPP_TOKEN_FILE). "
        "Empty in development: <data_dir>/serverapp-token, created on first start.",
    )
    register_supernodes: bool = Field(
        default=True,
        description="Register an enrolled site's SuperNode key with the SuperLink (and "
        "unregister it when the site is revoked). Off: the operator runs `flwr supernode "
        "register` by hand.",
    )
    resume_on_start: bool = Field(
        default=True,
        description="Restart the run of a study whose ServerApp went silent (a crash of the "
        "SuperLink or of its pod), from the round after the last recorded one.",
    )
    run_liveness_s: float = Field(
        default=30.0,
        ge=5,
        le=3600,
        description="A running study's ServerApp that has not been heard from (heartbeat or "
        "report) for this long is presumed gone, and its run is restarted.",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Restarts of a study's run without a round recorded in between before "
        "the study is failed.",
    )


class AuditSettings(BaseModel):
    """The tamper-evident audit log."""

    witness_quorum: int = Field(
        default=2, ge=1, le=100, description="Site cosignatures that make a head witnessed."
    )
    head_key_file: Path | None = Field(
        default=None,
        description="Ed25519 key signing tree heads (PEM). Empty: <data_dir>/audit-head-key.pem.",
    )
    log_id: str = Field(
        default=DEFAULT_LOG_ID,
        min_length=1,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="The log's identity, bound into every cosignature (printable ASCII, no "
        "spaces): name it for your consortium, e.g. `concord.example.org/audit`.",
    )


class ServerSettings(BaseSettings):
    """Configuration of one consortium server."""

    model_config = SettingsConfigDict(
        env_prefix="CONCORD_",
        env_nested_delimiter="__",
        extra="forbid",
        secrets_dir=None,
    )

    environment: Environment = Field(default=Environment.DEVELOPMENT)
    data_dir: Path = Field(
        default=Path(".concord/server"), description="Where the embedded database and keys live."
    )
    log_level: str = Field(default="INFO", description="Application log level.")
    log_json: bool = Field(default=True, description="Structured JSON logs on stderr.")
    database: DatabaseSettings = DatabaseSettings()
    identity: IdentitySettings = IdentitySettings()
    api: ApiSettings = ApiSettings()
    studies: StudySettings = StudySettings()
    audit: AuditSettings = AuditSettings()
    policy: PolicySettings = PolicySettings()
    federation: FederationSettings = FederationSettings()

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.environment is Environment.DEVELOPMENT:
            return self
        problems: list[str] = []
        if self.identity.mode == "local":
            problems.append(
                "identity.mode=local is for development; set CONCORD_IDENTITY__MODE=keycloak"
            )
        if self.identity.mode == "keycloak" and not self.identity.keycloak_url:
            problems.append("identity.keycloak_url is required")
        url = self.database.url.get_secret_value() if self.database.url else ""
        if not url.startswith("postgresql"):
            problems.append("database.url must name PostgreSQL in production")
        elif any(f":{p}@" in url for p in PLACEHOLDER_SECRETS if p):
            problems.append("database.url carries a placeholder password")
        if self.federation.superlink_address and self.federation.serverapp_token_file is None:
            problems.append(
                "federation.serverapp_token_file is required with a SuperLink (the same "
                "secret the SuperLink's pod mounts)"
            )
        problems += _transport_problems(self)
        if problems:
            raise ValueError("unsafe production settings:\n- " + "\n- ".join(problems))
        return self

    # Derived values -----------------------------------------------------------------

    def database_url(self) -> str:
        """The SQLAlchemy URL in force (the embedded SQLite file when none is set)."""
        if self.database.url is not None and self.database.url.get_secret_value():
            return self.database.url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'concord.db').resolve()}"

    def public_url(self) -> str:
        """Base URL clients reach this server at."""
        return (self.api.public_url or f"http://{self.api.host}:{self.api.port}").rstrip("/")

    def local_issuer_url(self) -> str:
        """Issuer (``iss``) of tokens minted by the local issuer."""
        return f"{self.public_url()}/realms/{self.identity.local_realm}"

    def policy_directory(self) -> Path:
        """The policy directory seeded at first start."""
        return self.policy.directory or shipped_policies()

    def serverapp_token_file(self) -> Path:
        """Path of the federation token (the ServerApp's credential on the internal API)."""
        return self.federation.serverapp_token_file or self.data_dir / "serverapp-token"

    def audit_head_key_file(self) -> Path:
        """Path of the tree-head signing key."""
        return self.audit.head_key_file or self.data_dir / "audit-head-key.pem"

    def local_key_file(self) -> Path:
        """Path of the local issuer's signing key."""
        return self.identity.local_key_file or self.data_dir / "issuer.pem"


def _is_https(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() == "https" and bool(parts.hostname)


def _transport_problems(settings: ServerSettings) -> list[str]:
    """What production refuses on the wire: plain gRPC or HTTP, TLS verification off, no CA.

    Each problem names the setting, its variable and the fix (docs/operator.md lists them).
    """
    problems: list[str] = []
    identity, federation, api = settings.identity, settings.federation, settings.api
    if federation.insecure:
        problems.append(
            "federation.insecure=true sends studies to the SuperLink without TLS; set "
            "CONCORD_FEDERATION__INSECURE=false and CONCORD_FEDERATION__ROOT_CERTIFICATES to "
            "the SuperLink's CA certificate"
        )
    if federation.superlink_address and federation.root_certificates is None:
        problems.append(
            "federation.root_certificates is required with a SuperLink (its TLS is checked "
            "against it); set CONCORD_FEDERATION__ROOT_CERTIFICATES to the CA certificate (PEM)"
        )
    if not identity.keycloak_verify_tls:
        problems.append(
            "identity.keycloak_verify_tls=false accepts any certificate for Keycloak; set "
            "CONCORD_IDENTITY__KEYCLOAK_VERIFY_TLS=true"
        )
    if (
        identity.mode == "keycloak"
        and identity.keycloak_url
        and not _is_https(identity.keycloak_url)
    ):
        problems.append(
            f"identity.keycloak_url {identity.keycloak_url!r} is not https://; set "
            "CONCORD_IDENTITY__KEYCLOAK_URL to Keycloak's https:// URL"
        )
    if identity.keycloak_issuer and not _is_https(identity.keycloak_issuer):
        problems.append(
            f"identity.keycloak_issuer {identity.keycloak_issuer!r} is not https://; set "
            "CONCORD_IDENTITY__KEYCLOAK_ISSUER to the realm's https:// issuer (or leave it empty)"
        )
    if api.public_url and not _is_https(api.public_url):
        problems.append(
            f"api.public_url {api.public_url!r} is not https://; set CONCORD_API__PUBLIC_URL to "
            "the https:// URL clients and sites use (TLS at the ingress)"
        )
    return problems


def load_settings(secrets_dir: Path | None = None) -> ServerSettings:
    """Build settings from the environment (and ``secrets_dir`` files when given)."""
    if secrets_dir is not None:
        return ServerSettings(_secrets_dir=secrets_dir)
    return ServerSettings()
