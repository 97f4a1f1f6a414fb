"""Fixtures for the identity unit tests: local issuers with EC keys (fast to generate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium_server.identity import LocalIssuer

ISSUER = "http://concord.test/realms/concord"


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("identity-keys")


@pytest.fixture(scope="module")
def issuer_key_file(key_dir: Path) -> Path:
    """PEM file of the trusted issuer's private key (for hand-crafted tokens)."""
    return key_dir / "issuer.pem"


@pytest.fixture(scope="module")
def issuer(issuer_key_file: Path) -> LocalIssuer:
    """The issuer the verifier under test trusts."""
    return LocalIssuer.load_or_create(issuer_key_file, ISSUER, key_type="EC")


@pytest.fixture(scope="module")
def other_issuer(key_dir: Path) -> LocalIssuer:
    """Same issuer name, different key: a forger, or the issuer after a key rotation."""
    return LocalIssuer.load_or_create(key_dir / "other.pem", ISSUER, key_type="EC")
