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


# --- production refuses insecure transport ---------------------------------------------

SAFE_PRODUCTION: dict[str, object] = {
    "environment": "production",
    "database": {"url": "postgresql+psycopg://concord:Xk9-long-random@db/concord"},
    "identity": {"mode": "keycloak", "keycloak_url": "https://kc.example.org"},
}


def _production(**sections: dict[str, object]) -> ServerSettings:
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SAFE_PRODUCTION.items()}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section}  # type: ignore[dict-item]
    return ServerSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sections", "setting", "fix"),
    [
        (
            {"federation": {"insecure": True}},
            "federation.insecure=true",
            "CONCORD_FEDERATION__INSECURE=false",
        ),
        (
            {
                "federation": {
                    "superlink_address": "superlink:9093",
                    "serverapp_token_file": "/run/token",
                }
            },
            "federation.root_certificates is required",
            "CONCORD_FEDERATION__ROOT_CERTIFICATES",
        ),
        (
            {"identity": {"keycloak_verify_tls": False}},
            "identity.keycloak_verify_tls=false",
            "CONCORD_IDENTITY__KEYCLOAK_VERIFY_TLS=true",
        ),
        (
            {"identity": {"keycloak_url": "http://keycloak:8080"}},
            "identity.keycloak_url 'http://keycloak:8080' is not https://",
            "CONCORD_IDENTITY__KEYCLOAK_URL",
        ),
        (
            {"identity": {"keycloak_issuer": "http://login.example.org/realms/consortium"}},
            "identity.keycloak_issuer",
            "CONCORD_IDENTITY__KEYCLOAK_ISSUER",
        ),
        (
            {"api": {"public_url": "http://concord.example.org"}},
            "api.public_url 'http://concord.example.org' is not https://",
            "CONCORD_API__PUBLIC_URL",
        ),
    ],
    ids=["insecure", "no-ca", "verify-off", "http-keycloak", "http-issuer", "http-public-url"],
)
def test_production_refuses_insecure_transport(
    sections: dict[str, dict[str, object]], setting: str, fix: str
) -> None:
    with pytest.raises(ValidationError) as info:
        _production(**sections)
    message = str(info.value)
    assert setting in message  # names the setting ...
    assert fix in message  # ... and the fix


def test_production_accepts_tls_everywhere(tmp_path: Path) -> None:
    settings = _production(
        identity={"keycloak_issuer": "https://login.example.org/realms/consortium"},
        api={"public_url": "https://concord.example.org"},
        federation={
            "superlink_address": "superlink:9093",
            "root_certificates": str(tmp_path / "ca.pem"),
            "serverapp_token_file": str(tmp_path / "token"),
        },
    )
    assert settings.federation.insecure is False


def test_development_keeps_its_shortcuts() -> None:
    settings = ServerSettings(
        federation={"insecure": True, "superlink_address": "127.0.0.1:9093"},  # type: ignore[arg-type]
        identity={"keycloak_verify_tls": False, "keycloak_url": "http://127.0.0.1:8080"},  # type: ignore[arg-type]
    )
    assert settings.federation.insecure is True


def test_the_server_process_exits_with_every_problem_and_its_fix(tmp_path: Path) -> None:
    """`consortium server` in production with insecure transport: exit 1 before serving,
    every problem on stderr with the variable to change, and no secret echoed."""
    import os
    import subprocess
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONCORD_")},
        "CONCORD_ENVIRONMENT": "production",
        "CONCORD_DATA_DIR": str(tmp_path),
        "CONCORD_DATABASE__URL": "postgresql+psycopg://concord:Xk9-long-random@db/concord",
        "CONCORD_IDENTITY__MODE": "keycloak",
        "CONCORD_IDENTITY__KEYCLOAK_URL": "http://keycloak:8080",
        "CONCORD_IDENTITY__KEYCLOAK_VERIFY_TLS": "false",
        "CONCORD_FEDERATION__INSECURE": "true",
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "consortium"), "server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "unsafe production settings" in output
    for fix in (
        "CONCORD_FEDERATION__INSECURE=false",
        "CONCORD_IDENTITY__KEYCLOAK_VERIFY_TLS=true",
        "CONCORD_IDENTITY__KEYCLOAK_URL",
    ):
        assert fix in output
    assert "Xk9-long-random" not in output  # the input values are not echoed
    assert "Uvicorn running" not in output
