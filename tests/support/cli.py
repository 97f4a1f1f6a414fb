"""Run the `consortium` CLI in process against a TestClient's app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from concord_protocol.client import ConsortiumClient
from consortium_server.cli import app as cli_app

__all__ = ["run_cli"]


def run_cli(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], *args: str
) -> tuple[int, str]:
    """``consortium --token <the headers' token> ARGS``: its exit code and output."""
    import consortium_server.cli.common as common

    transport = client._transport
    original = ConsortiumClient.__init__

    def patched(self: ConsortiumClient, base_url: str, token: object = None, **_: object) -> None:
        original(self, "http://testserver", token, transport=transport)  # type: ignore[arg-type]

    monkeypatch.setattr(common.ConsortiumClient, "__init__", patched)
    result = CliRunner().invoke(
        cli_app, ["--token", headers["Authorization"][7:], *args], catch_exceptions=False
    )
    return result.exit_code, result.output
