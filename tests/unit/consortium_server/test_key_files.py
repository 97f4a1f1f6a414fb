"""Every secret the server writes (tree-head key, federation token, local issuer key, the
development SuperLink TLS key) is born with mode 0600: with umask 0 and chmod forbidden,
the files still come out 0600."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.federation.federation_token import create_token, load_token
from consortium_server.federation.tls import make_dev_tls
from consortium_server.identity.local_issuer import LocalIssuer
from tests.support.private_files import mode_of, strict_private_writes


def test_tree_head_key_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "audit-head-key.pem"
    with strict_private_writes():
        signer = TreeHeadSigner.load_or_create(path)
    assert mode_of(path) == 0o600
    assert TreeHeadSigner.load_or_create(path).key_id == signer.key_id  # loads, not replaces


def test_federation_token_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "serverapp-token"
    with strict_private_writes():
        token = create_token(path)
    assert mode_of(path) == 0o600
    assert load_token(path).get_secret_value() == token.get_secret_value()
    with pytest.raises(FileExistsError):
        create_token(path)
    assert load_token(path).get_secret_value() == token.get_secret_value()


def test_local_issuer_key_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "issuer.pem"
    with strict_private_writes():
        LocalIssuer.load_or_create(path, "http://127.0.0.1:8600/realms/local")
    assert mode_of(path) == 0o600


def test_development_tls_key_is_created_0600(tmp_path: Path) -> None:
    with strict_private_writes():
        files = make_dev_tls(tmp_path / "tls")
    assert mode_of(files.server_key) == 0o600
