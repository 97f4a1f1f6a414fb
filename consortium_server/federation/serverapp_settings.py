"""ServerAppSettings: how the ServerApp reaches the consortium server's internal API.

The ServerApp runs in a process the SuperLink starts (in the SuperLink's pod, with the
SuperLink's environment), not in the API's process. It reads ``CONCORD_SERVERAPP_*``
variables, built once when a run starts (never at import):

* ``CONCORD_SERVERAPP_API_URL``: the consortium server's base URL as the SuperLink's pod
  reaches it (the chart sets the API Service);
* ``CONCORD_SERVERAPP_TOKEN_FILE``: the federation token (the same Secret the API mounts);
* ``CONCORD_SERVERAPP_CA_FILE``: CA bundle for an ``https://`` API URL (empty: system CAs);
* ``CONCORD_SERVERAPP_RETRY_S``: how long to keep retrying while the server is down before
  the run gives up (the server restarts it from its last recorded round);
* ``CONCORD_SERVERAPP_HEARTBEAT_S``: how often the ServerApp says it is alive.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServerAppSettings"]


class ServerAppSettings(BaseSettings):
    """Configuration of the ServerApp's calls to the consortium server."""

    model_config = SettingsConfigDict(env_prefix="CONCORD_SERVERAPP_", extra="forbid")

    api_url: str = Field(description="Base URL of the consortium server, e.g. http://api:8600.")
    token_file: Path = Field(description="File holding the federation token.")
    ca_file: Path | None = Field(default=None, description="CA bundle for an https API URL.")
    retry_s: float = Field(
        default=900.0, gt=0, description="Keep retrying an unreachable server this long."
    )
    heartbeat_s: float = Field(default=2.0, gt=0, le=60, description="Heartbeat interval.")

    def token(self) -> SecretStr:
        """The federation token (read from :attr:`token_file`, surrounding space removed)."""
        value = self.token_file.read_text(encoding="utf-8").strip()
        if not value:
            raise ValueError(f"the federation token file {self.token_file} is empty")
        return SecretStr(value)
