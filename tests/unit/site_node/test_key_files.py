"""Every secret the site writes (signing, exchange and SuperNode keys, study keys) is born
with mode 0600: with umask 0 and chmod forbidden, the files still come out 0600."""

from __future__ import annotations

from pathlib import Path

from site_node.crypto import generate_study_context
from site_node.crypto.sealing import SiteKeyPair
from site_node.federation.approvals import ApprovalStore
from site_node.key_files import init_site_keys, write_supernode_key
from tests.support.private_files import mode_of, strict_private_writes


def test_site_keys_are_created_0600(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with strict_private_writes():
        init_site_keys(keys)
    for name in ("signing_key.pem", "exchange_key.pem", "supernode"):
        assert mode_of(keys / name) == 0o600, name
    assert mode_of(keys) == 0o700
    SiteKeyPair.load(keys)  # and the site accepts them


def test_a_new_supernode_key_replaces_the_old_one_0600(tmp_path: Path) -> None:
    old_private, _ = write_supernode_key(tmp_path)
    old = old_private.read_bytes()
    with strict_private_writes():
        private, public = write_supernode_key(tmp_path)
    assert private.read_bytes() != old
    assert mode_of(private) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_study_keys_are_stored_0600(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    secret = generate_study_context()
    with strict_private_writes():
        store.save_study_key("study-1", secret, sender_id="hospital-a")
    folder = tmp_path / "federation" / "study-keys"
    assert mode_of(folder / "study-1.ctx") == 0o600
    assert mode_of(folder / "study-1.json") == 0o600
    key = store.study_key("study-1")  # the store's own permission check passes
    assert key is not None
    assert key.secret_context == secret


def test_dropping_a_study_key_removes_it_and_keeps_the_rest(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    store.save_study_key("study-1", generate_study_context(), sender_id="hospital-a")
    store.save_study_key("study-2", generate_study_context(), sender_id="hospital-a")
    assert store.delete_study_key("study-1") is True
    assert store.study_key("study-1") is None
    assert store.study_key("study-2") is not None
    assert store.delete_study_key("study-1") is False  # idempotent
