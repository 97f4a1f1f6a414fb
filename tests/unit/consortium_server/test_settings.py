"""ServerSettings: environment, secrets files, and refusal of unsafe production settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from consortium_server.settings import ServerSettings, load_settings


def test_embedded_defaults(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path)
    assert settings.database_url() == f"sqlite:///{(tmp_path / 'concord.db').resolve()}"
    assert settings.local_issuer_url() == "http://127.0.0.1:8600/realms/local"
    assert settings.local_key_file() == tmp_path / "issuer.pem"


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCORD_API__PORT", "9100")
    monkeypatch.setenv("CONCORD_IDENTITY__AUDIENCE", "other-api")
    settings = load_settings()
    assert settings.api.port == 9100
    assert settings.identity.audience == "other-api"


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError):
        ServerSettings(databse={"url": "sqlite://"})  # type: ignore[call-arg]


def test_secrets_dir_supplies_secrets(tmp_path: Path) -> None:
    (tmp_path / "concord_database").write_text(
        '{"url": "postgresql+psycopg://concord:s3cret-Pw@db/concord"}'
    )
    settings = load_settings(secrets_dir=tmp_path)
    assert settings.database_url().endswith("@db/concord")
    assert "s3cret" not in repr(settings)


def test_production_refuses_development_shortcuts() -> None:
    with pytest.raises(ValidationError) as info:
        ServerSettings(environment="production")  # type: ignore[arg-type]
    message = str(info.value)
    assert "identity.mode=local" in message
    assert "PostgreSQL" in message


def test_production_refuses_placeholder_password() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        ServerSettings(
            environment="production",  # type: ignore[arg-type]
            database={"url": "postgresql+psycopg://concord:change-me@db/concord"},  # type: ignore[arg-type]
            identity={"mode": "keycloak", "keycloak_url": "https://kc.example.org"},  # type: ignore[arg-type]
        )


def test_production_accepts_real_settings() -> None:
    settings = ServerSettings(
        environment="production",  # type: ignore[arg-type]
        database={"url": "postgresql+psycopg://concord:Xk9-long-random@db/concord"},  # type: ignore[arg-type]
        identity={"mode": "keycloak", "keycloak_url": "https://kc.example.org"},  # type: ignore[arg-type]
    )
    assert settings.identity.mode == "keycloak"
