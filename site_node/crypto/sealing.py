"""Sealed exchange of a study's CKKS secret context between approved sites (its format:
:mod:`concord_protocol.sealed_key`).

One approved site generates the study context and seals it to every other approved site;
the consortium server relays the sealed bytes and can neither open nor forge them.

Sealing (sender ``S`` to recipient ``R``)::

    e, E      = fresh X25519 key pair (ephemeral)
    shared    = X25519(e, R.exchange_public)
    ad        = canonical JSON {version, study_id, contract_hash, sender_id, recipient_id,
                                public_context_sha256, key_fingerprint, ephemeral_public}
    key       = HKDF-SHA256(shared, salt = E || R.exchange_public, info = label || SHA-256(ad))
    ct        = ChaCha20-Poly1305(key, nonce, secret_context, ad)
    signature = Ed25519(S.signing_key, label || canonical JSON of every field but signature)

Opening checks, in order: the addressing fields are the ones the recipient expects
(recipient, study, contract hash); the signature verifies under the *sender's* enrolled
Ed25519 key (so the server cannot substitute a key of its own); the AEAD opens (any bit
changed fails); the opened context holds a secret key, its public part hashes to the
signed ``public_context_sha256`` and it matches the signed ``key_fingerprint``
(:func:`study_key_fingerprint`, which sites can compare to confirm they share one key).

Site keys: :class:`SiteKeyPair` holds an Ed25519 signing key and an X25519 exchange key.
Public keys travel as base64 of the raw 32 bytes; private keys are PKCS#8 PEM files with
mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from concord_protocol.errors import ContextError
from concord_protocol.private_files import write_private_file
from concord_protocol.sealed_key import (
    SealedKey,
)
from site_node.crypto.ckks import public_context
from site_node.crypto.errors import KeyFileError, SealedKeyError

__all__ = ["SiteKeyPair", "open_study_key", "seal_study_key", "study_key_fingerprint"]

_HKDF_LABEL = b"concord/sealed-study-key/v1/hkdf"
_FINGERPRINT_LABEL = b"concord/study-key-fingerprint/v1\x00"
SIGNING_KEY_FILE = "signing_key.pem"
EXCHANGE_KEY_FILE = "exchange_key.pem"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def study_key_fingerprint(secret_context: bytes) -> str:
    """Public fingerprint of a study's secret context (SHA-256, domain-separated, hex).

    With symmetric CKKS the public context holds only the parameters, so its hash does not
    identify the key; sites compare this fingerprint (e.g. through the server) to confirm
    they all received the same secret context.
    """
    return hashlib.sha256(_FINGERPRINT_LABEL + bytes(secret_context)).hexdigest()


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive_key(shared: bytes, ephemeral: bytes, recipient: bytes, ad: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral + recipient,
        info=_HKDF_LABEL + hashlib.sha256(ad).digest(),
    ).derive(shared)


def seal_study_key(
    secret_context: bytes,
    *,
    sender_id: str,
    sender_signing_key: Ed25519PrivateKey,
    recipient_id: str,
    recipient_exchange_public: X25519PublicKey,
    study_id: str,
    contract_hash: str,
) -> SealedKey:
    """Seal the study's secret context to one recipient site and sign it as the sender.

    ``recipient_exchange_public`` must come from the recipient's enrolment record.
    Raises :class:`~site_node.crypto.errors.ContextError` if ``secret_context`` is not a
    CKKS context with its secret key.
    """
    public_sha = hashlib.sha256(public_context(secret_context)).hexdigest()
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    recipient_raw = _raw_public(recipient_exchange_public)
    nonce = os.urandom(12)
    draft = SealedKey(
        sender_id=sender_id,
        recipient_id=recipient_id,
        study_id=study_id,
        contract_hash=contract_hash,
        public_context_sha256=public_sha,
        key_fingerprint=study_key_fingerprint(secret_context),
        ephemeral_public=ephemeral_public,
        nonce=nonce,
        ciphertext=b"",
        signature=b"",
    )
    ad = draft.associated_data()
    key = _derive_key(
        ephemeral.exchange(recipient_exchange_public), ephemeral_public, recipient_raw, ad
    )
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, bytes(secret_context), ad)
    unsigned = draft.model_copy(update={"ciphertext": ciphertext})
    signature = sender_signing_key.sign(unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature": signature})


def open_study_key(
    sealed: SealedKey,
    *,
    recipient_exchange_private: X25519PrivateKey,
    sender_signing_public: Ed25519PublicKey,
    expected_study_id: str,
    expected_contract_hash: str,
    expected_recipient_id: str,
    expected_public_context_sha256: str | None = None,
) -> bytes:
    """Verify and open a sealed study key; return the secret context bytes.

    ``sender_signing_public`` is the Ed25519 key the *recipient* holds for
    ``sealed.sender_id`` from enrolment (check that the sender is an approved site of the
    study before calling). ``expected_public_context_sha256``, when given, is the hash of
    the public context the server uses for the study. Raises :class:`SealedKeyError`.
    """
    if not isinstance(sealed, SealedKey):
        raise SealedKeyError("not a SealedKey", code="sealed_key.malformed")
    if sealed.recipient_id != expected_recipient_id:
        raise SealedKeyError(
            f"sealed for site {sealed.recipient_id!r}, not for this site",
            code="sealed_key.wrong_recipient",
        )
    if sealed.study_id != expected_study_id:
        raise SealedKeyError(
            f"sealed for study {sealed.study_id!r}, expected {expected_study_id!r}",
            code="sealed_key.wrong_study",
        )
    if sealed.contract_hash != expected_contract_hash:
        raise SealedKeyError(
            "sealed for another contract hash than the one this site approved",
            code="sealed_key.wrong_contract",
        )
    if len(sealed.ephemeral_public) != 32 or len(sealed.nonce) != 12:
        raise SealedKeyError(
            "ephemeral key or nonce has the wrong length", code="sealed_key.malformed"
        )
    try:
        sender_signing_public.verify(sealed.signature, sealed.signed_bytes())
    except InvalidSignature:
        raise SealedKeyError(
            f"signature does not verify under the enrolled key of site {sealed.sender_id!r}",
            code="sealed_key.bad_signature",
        ) from None
    ad = sealed.associated_data()
    recipient_raw = _raw_public(recipient_exchange_private.public_key())
    try:
        ephemeral = X25519PublicKey.from_public_bytes(sealed.ephemeral_public)
        shared = recipient_exchange_private.exchange(ephemeral)
    except ValueError:  # e.g. a low-order point gives an all-zero shared secret
        raise SealedKeyError("ephemeral key is not usable", code="sealed_key.malformed") from None
    key = _derive_key(shared, sealed.ephemeral_public, recipient_raw, ad)
    try:
        secret_context = ChaCha20Poly1305(key).decrypt(sealed.nonce, sealed.ciphertext, ad)
    except InvalidTag:
        raise SealedKeyError(
            "cannot decrypt: not sealed to this site's exchange key, or altered in transit",
            code="sealed_key.decrypt_failed",
        ) from None
    try:
        derived = hashlib.sha256(public_context(secret_context)).hexdigest()
    except ContextError:
        raise SealedKeyError(
            "sealed content is not a CKKS secret context", code="sealed_key.malformed"
        ) from None
    if derived != sealed.public_context_sha256 or (
        expected_public_context_sha256 is not None and derived != expected_public_context_sha256
    ):
        raise SealedKeyError(
            "the secret context does not match the study's public context",
            code="sealed_key.public_context_mismatch",
        )
    if study_key_fingerprint(secret_context) != sealed.key_fingerprint:
        raise SealedKeyError(
            "the secret context does not match the signed key fingerprint",
            code="sealed_key.fingerprint_mismatch",
        )
    return secret_context


@dataclass(frozen=True)
class SiteKeyPair:
    """A site's long-term keys: Ed25519 for signing, X25519 for key exchange."""

    signing_key: Ed25519PrivateKey
    exchange_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> SiteKeyPair:
        """Fresh random keys."""
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def signing_public(self) -> Ed25519PublicKey:
        """The Ed25519 verification key."""
        return self.signing_key.public_key()

    @property
    def exchange_public(self) -> X25519PublicKey:
        """The X25519 public key other sites seal to."""
        return self.exchange_key.public_key()

    @property
    def signing_public_b64(self) -> str:
        """API form of the signing public key (base64 of 32 raw bytes)."""
        return _b64(_raw_public(self.signing_public))

    @property
    def exchange_public_b64(self) -> str:
        """API form of the exchange public key (base64 of 32 raw bytes)."""
        return _b64(_raw_public(self.exchange_public))

    def save(self, directory: Path | str, *, overwrite: bool = False) -> None:
        """Write both private keys as PKCS#8 PEM files with mode 0600.

        Creates ``directory`` (mode 0700) if needed. Refuses to replace existing key files
        unless ``overwrite`` (code ``keys.exists``).
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, key in (
            (SIGNING_KEY_FILE, self.signing_key),
            (EXCHANGE_KEY_FILE, self.exchange_key),
        ):
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(path / name, pem, overwrite=overwrite)

    @classmethod
    def load(cls, directory: Path | str) -> SiteKeyPair:
        """Read the key files written by :meth:`save`.

        Refuses files readable or writable by group or others (``keys.insecure_permissions``),
        missing files (``keys.missing``) and keys of the wrong type (``keys.invalid``).
        """
        path = Path(directory)
        signing = _read_private(path / SIGNING_KEY_FILE)
        exchange = _read_private(path / EXCHANGE_KEY_FILE)
        if not isinstance(signing, Ed25519PrivateKey):
            raise KeyFileError(f"{SIGNING_KEY_FILE} is not an Ed25519 key", code="keys.invalid")
        if not isinstance(exchange, X25519PrivateKey):
            raise KeyFileError(f"{EXCHANGE_KEY_FILE} is not an X25519 key", code="keys.invalid")
        return cls(signing, exchange)


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """A new file of mode 0600 from the start, moved into place atomically (never chmod)."""
    try:
        write_private_file(path, data, overwrite=overwrite)
    except FileExistsError:
        raise KeyFileError(
            f"{path} exists; refusing to overwrite a site key", code="keys.exists"
        ) from None


def _read_private(path: Path) -> Any:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist", code="keys.missing") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}",
            code="keys.insecure_permissions",
        )
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a readable private key", code="keys.invalid") from None
