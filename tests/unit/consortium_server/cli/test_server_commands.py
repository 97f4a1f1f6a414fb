"""`consortium db upgrade|current` and `consortium token` on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from consortium_server.cli import app
from consortium_server.db.migrate import current_revision, head_revision
from consortium_server.db.session import make_engine
from consortium_server.identity.local_issuer import LocalIssuer

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONCORD_DATA_DIR", str(tmp_path))
    return tmp_path


def test_db_upgrade_then_current(data_dir: Path) -> None:
    behind = runner.invoke(app, ["db", "current"])
    assert behind.exit_code == 1
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"revision {head_revision()}" in result.output
    engine = make_engine(f"sqlite:///{data_dir / 'concord.db'}")
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert runner.invoke(app, ["db", "current"]).exit_code == 0


def test_token_is_signed_by_the_local_issuer(data_dir: Path) -> None:
    result = runner.invoke(app, ["token", "--user", "rita", "--role", "researcher", "--org", "Uni"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    issuer = LocalIssuer.load_or_create(
        data_dir / "issuer.pem", "http://127.0.0.1:8600/realms/local"
    )
    from consortium_server.identity.verifier import TokenVerifier

    principal = TokenVerifier(
        key_source=issuer.key_source(), issuer=issuer.issuer, audience="concord-api"
    ).verify(token)
    assert principal.subject == "rita"
    assert principal.organisation == "Uni"


def test_token_refuses_unknown_roles(data_dir: Path) -> None:
    result = runner.invoke(app, ["token", "--user", "x", "--role", "superuser"])
    assert result.exit_code == 1
    assert "unknown role" in result.output


def test_token_refused_outside_development(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCORD_ENVIRONMENT", "production")
    result = runner.invoke(app, ["token", "--user", "x", "--role", "researcher"])
    assert result.exit_code == 1
    assert (
        "invalid server settings" in result.output or "only with the local issuer" in result.output
    )
