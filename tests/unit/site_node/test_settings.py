"""SiteSettings: development by default; production refuses plain HTTP, the static
development token, and a SuperNode started without TLS or without the consortium CA, at
start-up, naming each setting and its fix (the validator, and the processes' exit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from site_node.settings import Environment, SiteSettings, UnsafeSettingsError

BIN = Path(sys.executable).parent
SAFE = {
    "environment": "production",
    "api_url": "https://concord.example.org",
    "token_url": "https://login.example.org",
    "client_id": "site-hospital-a",
    "client_secret": "from-the-secret",
}


@pytest.fixture(autouse=True)
def _no_site_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONCORD_SITE_"):
            monkeypatch.delenv(name)


def test_development_is_the_default_and_keeps_its_shortcuts() -> None:
    settings = SiteSettings(token="dev-token")  # type: ignore[arg-type]
    assert settings.environment is Environment.DEVELOPMENT
    assert settings.api_url.startswith("http://")
    settings.check_supernode_args(["--superlink", "127.0.0.1:9092", "--insecure"])


def test_the_largest_dp_physical_batch_is_unset_or_at_least_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert SiteSettings().dp_max_physical_batch is None  # each batch at once
    monkeypatch.setenv("CONCORD_SITE_DP_MAX_PHYSICAL_BATCH", "32")
    assert SiteSettings().dp_max_physical_batch == 32
    monkeypatch.setenv("CONCORD_SITE_DP_MAX_PHYSICAL_BATCH", "0")
    with pytest.raises(ValidationError, match="dp_max_physical_batch"):
        SiteSettings()


def test_production_accepts_https_and_client_credentials() -> None:
    settings = SiteSettings(**SAFE)  # type: ignore[arg-type]
    assert settings.environment is Environment.PRODUCTION
    assert settings.dp_secure_noise  # on unless turned off (which production refuses)


@pytest.mark.parametrize(
    ("override", "setting", "fix"),
    [
        ({"api_url": "http://concord.example.org"}, "api_url", "CONCORD_SITE_API_URL"),
        ({"api_url": "concord.example.org"}, "api_url", "CONCORD_SITE_API_URL"),
        ({"token_url": "http://keycloak:8080"}, "token_url", "CONCORD_SITE_TOKEN_URL"),
        ({"token": "a-static-token"}, "static development token", "unset CONCORD_SITE_TOKEN"),
        ({"dp_secure_noise": False}, "dp_secure_noise is off", "CONCORD_SITE_DP_SECURE_NOISE"),
    ],
    ids=["http-api", "no-scheme-api", "http-token-url", "static-token", "plain-dp-noise"],
)
def test_production_refuses_plain_http_and_the_development_token(
    override: dict[str, str], setting: str, fix: str
) -> None:
    with pytest.raises(ValidationError) as info:
        SiteSettings(**{**SAFE, **override})  # type: ignore[arg-type]
    message = str(info.value)
    assert "unsafe production settings" in message
    assert setting in message
    assert fix in message


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--superlink", "fl:9092", "--insecure"], "--insecure connects to the SuperLink"),
        (["--superlink", "fl:9092"], "--root-certificates is missing"),
        (["--superlink", "fl:9092", "--root-certificates", "/nonexistent/ca.crt"], "readable"),
        (["--superlink", "fl:9092", "--root-certificates"], "do not parse"),
        (["--superlink", "fl:9092", "--insec"], "--insecure connects to the SuperLink"),
        (["--superlink", "fl:9092", "--root-certificates=/nonexistent/ca.crt"], "readable"),
    ],
    ids=[
        "insecure",
        "no-ca",
        "missing-ca-file",
        "ca-without-path",
        "insecure-abbreviated",
        "missing-ca-equals",
    ],
)
def test_production_refuses_a_supernode_without_tls_or_ca(args: list[str], problem: str) -> None:
    settings = SiteSettings(**SAFE)  # type: ignore[arg-type]
    with pytest.raises(UnsafeSettingsError) as info:
        settings.check_supernode_args(args)
    assert info.value.code == "settings.unsafe_production"
    assert problem in info.value.message
    assert "consortium CA" in info.value.message  # ... and the fix


def test_production_accepts_a_supernode_with_tls_and_its_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = SiteSettings(**SAFE)  # type: ignore[arg-type]
    settings.check_supernode_args(["--superlink", "fl:9092", "--root-certificates", str(ca)])
    settings.check_supernode_args(["--superlink", "fl:9092", f"--root-certificates={ca}"])


def _site_node(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONCORD_SITE_")}
    return subprocess.run(
        [str(BIN / "site-node"), *args],
        env={**base, "COLUMNS": "200", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_agent_process_refuses_to_start_in_production_over_http(tmp_path: Path) -> None:
    done = _site_node(
        ["run", "--once"],
        {
            "CONCORD_SITE_ENVIRONMENT": "production",
            "CONCORD_SITE_SITE_ID": "hospital-a",
            "CONCORD_SITE_STATE_DIR": str(tmp_path / "state"),
            "CONCORD_SITE_API_URL": "http://concord.example.org",
            "CONCORD_SITE_TOKEN": "a-static-token",
        },
        tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unsafe production settings" in done.stderr
    assert "CONCORD_SITE_API_URL" in done.stderr
    assert "unset CONCORD_SITE_TOKEN" in done.stderr
    assert "a-static-token" not in done.stderr  # values are not echoed
    assert not (tmp_path / "state").exists()  # nothing ran


def test_the_supernode_process_refuses_to_start_without_tls(tmp_path: Path) -> None:
    done = _site_node(
        ["supernode", "--no-warm", "--", "--superlink", "fl.example.org:9092", "--insecure"],
        {
            "CONCORD_SITE_ENVIRONMENT": "production",
            "CONCORD_SITE_API_URL": "https://concord.example.org",
            "CONCORD_SITE_STATE_DIR": str(tmp_path / "state"),
        },
        tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "settings.unsafe_production" in done.stderr
    assert "--insecure connects to the SuperLink without TLS" in done.stderr
    assert "--root-certificates is missing" in done.stderr
    assert not (tmp_path / "state").exists()  # flower-supernode was never started


def test_the_client_secret_can_come_from_a_mounted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("from-the-volume\n")  # as `kubectl create secret --from-file` leaves it
    monkeypatch.setenv("CONCORD_SITE_CLIENT_SECRET_FILE", str(secret))
    fields = {k: v for k, v in SAFE.items() if k != "client_secret"}
    settings = SiteSettings(**fields)  # type: ignore[arg-type]
    assert settings.client_secret is not None
    assert settings.client_secret.get_secret_value() == "from-the-volume"


@pytest.mark.parametrize(
    ("content", "both", "message"),
    [
        (None, False, "cannot be read"),
        ("  \n", False, "is empty"),
        ("from-the-volume", True, "both set"),
    ],
    ids=["missing", "empty", "both"],
)
def test_a_client_secret_file_that_cannot_serve_is_refused(
    tmp_path: Path, content: str | None, both: bool, message: str
) -> None:
    secret = tmp_path / "client-secret"
    if content is not None:
        secret.write_text(content)
    fields = {k: v for k, v in SAFE.items() if both or k != "client_secret"}
    with pytest.raises(ValidationError, match=message):
        SiteSettings(client_secret_file=secret, **fields)  # type: ignore[arg-type]
