"""SiteSettings: the one place a site node reads its configuration.

Values come from arguments, ``CONCORD_SITE_*`` environment variables (nested with ``__``),
then files in a secrets dir, then these defaults.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SiteSettings"]


class SiteSettings(BaseSettings):
    """Configuration of one hospital's site node."""

    model_config = SettingsConfigDict(
        env_prefix="CONCORD_SITE_", env_nested_delimiter="__", extra="forbid"
    )

    site_id: str | None = Field(default=None, description="This site's id in the consortium.")
    organisation: str | None = Field(default=None, description="Organisation name (tokens).")
    state_dir: Path = Field(
        default=Path(".concord/site"),
        description="Keys, witness state and accountant state (keep it on a persistent volume).",
    )
    api_url: str = Field(default="http://127.0.0.1:8600", description="Consortium server URL.")
    token_url: str | None = Field(
        default=None, description="OIDC server base URL for client credentials (Keycloak)."
    )
    realm: str = Field(default="consortium", description="OIDC realm.")
    client_id: str | None = Field(default=None, description="This site's OIDC client id.")
    client_secret: SecretStr | None = Field(default=None, description="Its client secret.")
    datasets_file: Path | None = Field(
        default=None, description="YAML list of local datasets (see docs/hospital-it.md)."
    )
    token: SecretStr | None = Field(
        default=None,
        description=(
            "Static bearer token for development only; with token_url, client_id and "
            "client_secret set the agent uses client credentials instead."
        ),
    )
    poll_interval_s: float = Field(
        default=15.0, gt=0, le=3600, description="Seconds between two passes of the site agent."
    )
    server_head_key: str | None = Field(
        default=None,
        description=(
            "Base64 raw Ed25519 key of the consortium's audit tree heads (from the operator). "
            "Unset: the agent trusts the first key it sees and pins it in state_dir."
        ),
    )

    def keys_dir(self) -> Path:
        """Where the site's private keys live."""
        return self.state_dir / "keys"
