"""The federation token: the ServerApp's credential on the server's internal API.

One random secret, in a file the consortium server and the SuperLink's pod both mount (a
Kubernetes Secret; in development the server creates ``<data_dir>/serverapp-token`` on
first start and the demo hands the same file to the SuperLink). It is never put in a Flower
run config: every SuperNode can read a run's config.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import SecretStr

from concord_protocol.private_files import write_private_file
from consortium_server.errors import ServiceUnavailableError

__all__ = ["create_token", "load_or_create_token", "load_token"]


def create_token(path: Path) -> SecretStr:
    """Write a new random token to ``path`` (created with mode 0600, never wider; refuses
    to overwrite a file: :class:`FileExistsError`)."""
    token = secrets.token_urlsafe(32)
    write_private_file(path, (token + "\n").encode("utf-8"), overwrite=False)
    return SecretStr(token)


def load_token(path: Path) -> SecretStr:
    """The token in ``path``; refused if the file is missing, empty, or readable by others."""
    try:
        mode = path.stat().st_mode & 0o777
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServiceUnavailableError(
            f"The federation token file {path} cannot be read: {exc.strerror}."
        ) from exc
    if mode & 0o007:  # group-readable is how Kubernetes mounts a Secret for an fsGroup
        raise ServiceUnavailableError(
            f"The federation token file {path} must not be readable by others (mode {mode:o})."
        )
    if len(value) < 32:
        raise ServiceUnavailableError(f"The federation token in {path} is too short.")
    return SecretStr(value)


def load_or_create_token(path: Path) -> SecretStr:
    """The token in ``path``, created first if there is no file (development)."""
    if not path.exists():
        return create_token(path)
    return load_token(path)
