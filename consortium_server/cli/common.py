"""What every ``consortium`` subcommand shares: client settings, output, error handling."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console

from concord_protocol.client import ApiError, ConsortiumClient

__all__ = ["ClientSettings", "api", "console", "fail", "print_json", "read_document"]

console = Console()
err_console = Console(stderr=True)


class ClientSettings(BaseSettings):
    """Where the CLI finds the server and its token (``CONCORD_API_URL``, ``CONCORD_TOKEN``)."""

    model_config = SettingsConfigDict(env_prefix="CONCORD_", extra="ignore")

    api_url: str = Field(default="http://127.0.0.1:8600")
    token: SecretStr | None = None


class CliState:
    """Options given before the subcommand."""

    api_url: str | None = None
    token: str | None = None
    as_json: bool = False


state = CliState()


def fail(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    """Print an error (and what to do about it) and exit."""
    err_console.print(f"[bold red]error:[/] {message}")
    if hint:
        err_console.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(code)


@contextmanager
def api() -> Iterator[ConsortiumClient]:
    """A client for the configured server; API errors become readable exits."""
    settings = ClientSettings()
    url = state.api_url or settings.api_url
    token = state.token or (settings.token.get_secret_value() if settings.token else None)
    client = ConsortiumClient(url, token)
    try:
        yield client
    except ApiError as exc:
        if exc.code == "connection":
            fail(exc.message, hint="Is the server running? Set --api-url or CONCORD_API_URL.")
        for detail in exc.details:
            field = detail.get("field")
            err_console.print(f"  - {field + ': ' if field else ''}{detail.get('message', detail)}")
        hint = {
            401: "Get a token (`consortium token ...` in development) and pass --token "
            "or set CONCORD_TOKEN.",
            403: "Your token's roles or organisation do not allow this (`consortium whoami`).",
        }.get(exc.status)
        fail(f"{exc.message} [{exc.code}, HTTP {exc.status}]", hint=hint)
    finally:
        client.close()


def read_document(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from ``path`` (``-`` for stdin)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML/JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"{path} must hold a mapping (key: value pairs) at the top level")
    return data


def print_json(data: Any) -> None:
    """Machine-readable output for ``--json``."""
    console.print_json(json.dumps(data, default=str))
