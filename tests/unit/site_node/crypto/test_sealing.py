"""Sealed exchange of the study's secret context, and site key files."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from site_node.crypto import (
    CkksParams,
    ContextError,
    KeyFileError,
    SealedKey,
    SealedKeyError,
    SiteKeyPair,
    ed25519_public_from_b64,
    generate_study_context,
    open_study_key,
    public_context,
    seal_study_key,
    study_key_fingerprint,
    x25519_public_from_b64,
)
from site_node.crypto import sealing as sealing_module

from .conftest import CONTRACT_HASH

STUDY = "study-1"


@pytest.fixture(scope="module")
def sites() -> dict[str, SiteKeyPair]:
    return {name: SiteKeyPair.generate() for name in ("site-a", "site-b", "site-c", "server")}


def _seal(secret: bytes, sites: dict[str, SiteKeyPair], **overrides: object) -> SealedKey:
    args: dict[str, object] = {
        "sender_id": "site-a",
        "sender_signing_key": sites["site-a"].signing_key,
        "recipient_id": "site-b",
        "recipient_exchange_public": sites["site-b"].exchange_public,
        "study_id": STUDY,
        "contract_hash": CONTRACT_HASH,
    }
    args.update(overrides)
    return seal_study_key(secret, **args)  # type: ignore[arg-type]


def _open(sealed: SealedKey, sites: dict[str, SiteKeyPair], **overrides: object) -> bytes:
    args: dict[str, object] = {
        "recipient_exchange_private": sites["site-b"].exchange_key,
        "sender_signing_public": sites["site-a"].signing_public,
        "expected_study_id": STUDY,
        "expected_contract_hash": CONTRACT_HASH,
        "expected_recipient_id": "site-b",
    }
    args.update(overrides)
    return open_study_key(sealed, **args)  # type: ignore[arg-type]


def _refused(code: str, sealed: SealedKey, sites: dict[str, SiteKeyPair], **kw: object) -> None:
    with pytest.raises(SealedKeyError) as exc:
        _open(sealed, sites, **kw)
    assert exc.value.code == code, exc.value


def _flip(data: bytes, index: int = 10) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_round_trip_through_json(secret_ctx: bytes, sites: dict[str, SiteKeyPair]) -> None:
    sealed = _seal(secret_ctx, sites)
    wire = sealed.model_dump_json()
    assert base64.b64encode(sealed.ciphertext).decode() in wire
    received = SealedKey.model_validate_json(wire)
    opened = _open(
        received,
        sites,
        expected_public_context_sha256=hashlib.sha256(public_context(secret_ctx)).hexdigest(),
    )
    assert opened == secret_ctx
    assert received.public_context_sha256 == hashlib.sha256(public_context(secret_ctx)).hexdigest()


def test_sealed_bytes_do_not_contain_the_secret(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair]
) -> None:
    sealed = _seal(secret_ctx, sites)
    assert secret_ctx[100:164] not in sealed.ciphertext
    assert _seal(secret_ctx, sites).ciphertext != sealed.ciphertext  # fresh ephemeral key


def test_addressing_mismatches_are_refused(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair]
) -> None:
    sealed = _seal(secret_ctx, sites)
    _refused("sealed_key.wrong_recipient", sealed, sites, expected_recipient_id="site-c")
    _refused("sealed_key.wrong_study", sealed, sites, expected_study_id="study-2")
    _refused("sealed_key.wrong_contract", sealed, sites, expected_contract_hash="cd" * 32)


@pytest.mark.parametrize(
    "field",
    [
        "ciphertext",
        "nonce",
        "ephemeral_public",
        "public_context_sha256",
        "key_fingerprint",
        "sender_id",
    ],
)
def test_any_altered_field_breaks_the_signature(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair], field: str
) -> None:
    sealed = _seal(secret_ctx, sites)
    value = getattr(sealed, field)
    altered = _flip(value, 5) if isinstance(value, bytes) else value[:-1] + "0"
    if altered == value:
        altered = value[:-1] + "1"
    _refused("sealed_key.bad_signature", sealed.model_copy(update={field: altered}), sites)


def test_redirecting_to_another_recipient_is_refused(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair]
) -> None:
    sealed = _seal(secret_ctx, sites).model_copy(update={"recipient_id": "site-c"})
    _refused(
        "sealed_key.bad_signature",
        sealed,
        sites,
        expected_recipient_id="site-c",
        recipient_exchange_private=sites["site-c"].exchange_key,
    )


def test_replay_into_another_study_is_refused(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair]
) -> None:
    replayed = _seal(secret_ctx, sites).model_copy(
        update={"study_id": "study-2", "contract_hash": "cd" * 32}
    )
    _refused(
        "sealed_key.bad_signature",
        replayed,
        sites,
        expected_study_id="study-2",
        expected_contract_hash="cd" * 32,
    )


def test_server_cannot_substitute_its_own_key(sites: dict[str, SiteKeyPair]) -> None:
    """The server seals a context of its own, claiming to be site-a, signed with its key."""
    server_secret = generate_study_context()
    forged = seal_study_key(
        server_secret,
        sender_id="site-a",
        sender_signing_key=sites["server"].signing_key,
        recipient_id="site-b",
        recipient_exchange_public=sites["site-b"].exchange_public,
        study_id=STUDY,
        contract_hash=CONTRACT_HASH,
    )
    _refused("sealed_key.bad_signature", forged, sites)


def test_sealed_to_the_wrong_exchange_key_fails_to_decrypt(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair]
) -> None:
    sealed = _seal(secret_ctx, sites, recipient_exchange_public=sites["site-c"].exchange_public)
    _refused("sealed_key.decrypt_failed", sealed, sites)
    # ... and site-c, which holds the key, is not the addressee.
    _refused(
        "sealed_key.wrong_recipient",
        sealed,
        sites,
        recipient_exchange_private=sites["site-c"].exchange_key,
        expected_recipient_id="site-c",
    )


def test_public_context_mismatch(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair], monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = _seal(secret_ctx, sites)
    _refused(
        "sealed_key.public_context_mismatch",
        sealed,
        sites,
        expected_public_context_sha256="0" * 64,
    )
    # A sender that signs the hash of another public context than the one it seals.
    other_public = public_context(generate_study_context(CkksParams(global_scale_bits=40)))
    with monkeypatch.context() as patch:
        patch.setattr(sealing_module, "public_context", lambda _secret: other_public)
        lying = _seal(secret_ctx, sites)
    _refused("sealed_key.public_context_mismatch", lying, sites)


def test_key_fingerprint_is_checked(
    secret_ctx: bytes, sites: dict[str, SiteKeyPair], monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = _seal(secret_ctx, sites)
    assert sealed.key_fingerprint == study_key_fingerprint(secret_ctx)
    assert study_key_fingerprint(generate_study_context()) != sealed.key_fingerprint
    with monkeypatch.context() as patch:  # a sender that signs another key's fingerprint
        patch.setattr(sealing_module, "study_key_fingerprint", lambda _secret: "0" * 64)
        lying = _seal(secret_ctx, sites)
    _refused("sealed_key.fingerprint_mismatch", lying, sites)


def test_sealing_needs_a_secret_context(public_ctx: bytes, sites: dict[str, SiteKeyPair]) -> None:
    with pytest.raises(ContextError):
        _seal(public_ctx, sites)


def test_malformed_json_is_refused(secret_ctx: bytes, sites: dict[str, SiteKeyPair]) -> None:
    data = _seal(secret_ctx, sites).model_dump(mode="json")
    for field, value in (("nonce", "!!not base64!!"), ("contract_hash", "xyz"), ("extra", 1)):
        with pytest.raises(ValidationError):
            SealedKey.model_validate({**data, field: value})


def test_key_pair_files(tmp_path: Path) -> None:
    keys = SiteKeyPair.generate()
    directory = tmp_path / "keys"
    keys.save(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("signing_key.pem", "exchange_key.pem"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
        assert (directory / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SiteKeyPair.load(directory)
    assert loaded.signing_public_b64 == keys.signing_public_b64
    assert loaded.exchange_public_b64 == keys.exchange_public_b64
    assert len(base64.b64decode(keys.signing_public_b64)) == 32
    message = b"tree head"
    ed25519_public_from_b64(keys.signing_public_b64).verify(
        loaded.signing_key.sign(message), message
    )
    assert x25519_public_from_b64(keys.exchange_public_b64) == keys.exchange_public

    with pytest.raises(KeyFileError) as exc:
        keys.save(directory)
    assert exc.value.code == "keys.exists"
    keys.save(directory, overwrite=True)

    (directory / "exchange_key.pem").chmod(0o644)
    with pytest.raises(KeyFileError) as exc:
        SiteKeyPair.load(directory)
    assert exc.value.code == "keys.insecure_permissions"
    (directory / "exchange_key.pem").unlink()
    with pytest.raises(KeyFileError) as exc:
        SiteKeyPair.load(directory)
    assert exc.value.code == "keys.missing"


def test_key_files_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    keys = SiteKeyPair.generate()
    keys.save(tmp_path)
    (tmp_path / "signing_key.pem").write_bytes((tmp_path / "exchange_key.pem").read_bytes())
    with pytest.raises(KeyFileError) as exc:
        SiteKeyPair.load(tmp_path)
    assert exc.value.code == "keys.invalid"


def test_b64_public_keys_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        ed25519_public_from_b64(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="base64"):
        x25519_public_from_b64("@@@")
