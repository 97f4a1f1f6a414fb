"""SiteSettings: the one place a site node reads its configuration.

Values come from arguments, ``CONCORD_SITE_*`` environment variables (nested with ``__``),
then files in a secrets dir, then these defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from enum import StrEnum
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from site_node.errors import SiteError

__all__ = ["Environment", "SiteSettings", "UnsafeSettingsError"]


class Environment(StrEnum):
    """Where the site node runs. ``production`` refuses plain HTTP, TLS verification off, a
    missing CA and the static development token (docs/hospital-it.md lists each check)."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class UnsafeSettingsError(SiteError):
    """Production refuses how a process was started (``settings.unsafe_production``); the
    message names every problem and its fix."""

    code = "settings.unsafe_production"


class SiteSettings(BaseSettings):
    """Configuration of one hospital's site node."""

    model_config = SettingsConfigDict(
        env_prefix="CONCORD_SITE_", env_nested_delimiter="__", extra="forbid"
    )

    environment: Environment = Field(
        default=Environment.DEVELOPMENT,
        description="`production` (the Helm chart's default) refuses unsafe settings at start.",
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
    client_secret_file: Path | None = Field(
        default=None,
        description="A file holding the client secret (the Helm chart mounts its Secret "
        "there, so the secret is in no process's environment); read once at start. Set "
        "this or client_secret, not both.",
    )
    datasets_file: Path | None = Field(
        default=None, description="YAML list of local datasets (see docs/hospital-it.md)."
    )
    policy_dir: Path | None = Field(
        default=None,
        description="The site's own Cedar policy (a directory; start from policies/sites/). "
        "Every decision at the site evaluates it on top of the consortium's. Unset: the "
        "shipped default (policies/site-default/: encryption required, epsilon at most 10, "
        "at most 100 rounds).",
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
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where the site trains: `auto` (a CUDA GPU when PyTorch sees one, else "
        "the CPU), `cpu`, `cuda` or `cuda:N` (refused at each round when not there).",
    )
    dp_max_physical_batch: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="The most records DP-SGD passes through the network at once: each "
        "Poisson-sampled batch of a contract is split into physical batches of at most this "
        "many (Opacus' BatchMemoryManager), so that a large batch fits in the memory of the "
        "device; the privacy accounting and the trained weights do not change, a step takes "
        "somewhat longer. Unset: each batch at once.",
    )
    dp_secure_noise: bool = Field(
        default=True,
        description="DP-SGD noise robust to floating-point attacks: Opacus' secure_mode "
        "noise (each draw the sum of four Gaussians, halved) from a generator seeded from "
        "the operating system's CSPRNG every round. Production refuses it off.",
    )
    data_cache_max_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        le=2**40,
        description="Bytes of loaded, preprocessed volumes the ClientApp keeps in memory "
        "between loads of a dataset (least recently used out first; 0: none).",
    )
    data_cache_dir: Path | None = Field(
        default=None,
        description="Folder where preprocessed volumes are kept between messages (a "
        "SuperNode runs each message in a new process, so only files outlive one): "
        "derived patient data, keep it at the site like the data. Unset: memory only.",
    )
    data_cache_dir_max_bytes: int = Field(
        default=2**30,
        ge=0,
        le=2**44,
        description="Bytes `data_cache_dir` may hold (least recently used out first).",
    )
    server_head_key: str | None = Field(
        default=None,
        description=(
            "Base64 raw Ed25519 key of the consortium's audit tree heads (from the operator). "
            "Unset: the agent trusts the first key it sees and pins it in state_dir."
        ),
    )
    audit_log_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[!-~]+$",
        description=(
            "The consortium audit log's identity (the server's CONCORD_AUDIT__LOG_ID), bound "
            "into every cosignature. Unset: the agent pins the first one the server names."
        ),
    )

    @model_validator(mode="after")
    def _read_client_secret_file(self) -> Self:
        if self.client_secret_file is None:
            return self
        if self.client_secret is not None:
            raise ValueError(
                "client_secret and client_secret_file are both set; unset one of "
                "CONCORD_SITE_CLIENT_SECRET and CONCORD_SITE_CLIENT_SECRET_FILE"
            )
        try:
            secret = self.client_secret_file.read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"client_secret_file {str(self.client_secret_file)!r} cannot be read "
                f"({exc.strerror}); mount the site's client secret there"
            ) from None
        if not secret:
            raise ValueError(f"client_secret_file {str(self.client_secret_file)!r} is empty")
        self.client_secret = SecretStr(secret)
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.environment is Environment.DEVELOPMENT:
            return self
        problems: list[str] = []
        if not _is_https(self.api_url):
            problems.append(
                f"api_url {self.api_url!r} is not https://; set CONCORD_SITE_API_URL to the "
                "consortium server's https:// URL"
            )
        if self.token_url is not None and not _is_https(self.token_url):
            problems.append(
                f"token_url {self.token_url!r} is not https://; set CONCORD_SITE_TOKEN_URL to "
                "Keycloak's https:// URL"
            )
        if self.token is not None:
            problems.append(
                "token is a static development token; unset CONCORD_SITE_TOKEN and set "
                "CONCORD_SITE_TOKEN_URL, CONCORD_SITE_CLIENT_ID and CONCORD_SITE_CLIENT_SECRET"
            )
        if not self.dp_secure_noise:
            problems.append(
                "dp_secure_noise is off; unset CONCORD_SITE_DP_SECURE_NOISE (production draws "
                "DP noise robust to floating-point attacks)"
            )
        if problems:
            raise ValueError("unsafe production settings:\n- " + "\n- ".join(problems))
        return self

    def keys_dir(self) -> Path:
        """Where the site's private keys live."""
        return self.state_dir / "keys"

    def check_supernode_args(self, args: list[str]) -> None:
        """Refuse, in production, ``flower-supernode`` arguments that turn TLS off or lack
        the CA (``site-node supernode``): raises :class:`UnsafeSettingsError`."""
        if self.environment is Environment.DEVELOPMENT:
            return
        problems = _supernode_problems(args)
        if problems:
            raise UnsafeSettingsError(
                "unsafe production settings:\n- " + "\n- ".join(problems),
                hint="See docs/hospital-it.md, 'Production checks'.",
            )


def _is_https(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() == "https" and bool(parts.hostname)


def _supernode_problems(args: list[str]) -> list[str]:
    """What production refuses in ``flower-supernode``'s arguments (``site-node supernode``):
    ``--insecure`` (plain gRPC, the SuperLink unauthenticated), and a missing or unreadable
    ``--root-certificates`` (the CA the SuperLink's certificate is checked against).

    Flower's own parser reads the arguments, so every spelling it accepts (``--insec``,
    ``--root-certificates=...``) is seen; ``--help`` and ``--version`` are let through.
    """
    if {"-h", "--help", "-V", "--version"} & set(args):
        return []
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    parser.exit_on_error = False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as exc:
        return [
            f"the flower-supernode arguments do not parse ({exc}); fix them, with "
            "--root-certificates <consortium CA (PEM)> and without --insecure"
        ]
    problems: list[str] = []
    if parsed.insecure:
        problems.append(
            "--insecure connects to the SuperLink without TLS; remove it and pass "
            "--root-certificates <consortium CA (PEM)>"
        )
    root = parsed.root_certificates
    if root is None:
        problems.append(
            "--root-certificates is missing; pass --root-certificates <consortium CA (PEM)> "
            "(the Helm chart mounts it from consortium.caCertificate)"
        )
    elif not root or not Path(root).is_file() or not os.access(root, os.R_OK):
        problems.append(
            f"--root-certificates {root!r} is not a readable file; mount the consortium CA "
            "there (consortium.caCertificate or consortium.existingCaConfigMap in the chart)"
        )
    return problems
