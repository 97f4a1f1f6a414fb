"""A site's public identity: the fingerprint stewards confirm out of band, and key rotations.

Every site has two long-term public keys, Ed25519 (signing: approvals, sealed study keys,
replies, cosignatures) and X25519 (receiving sealed study keys). The consortium server
publishes them in its site directory, but a site must not believe that directory: a
server that swapped a peer's keys could open and re-seal every study key. So each site
*pins* its peers' keys: hospital IT reads the peer's :func:`site_key_fingerprint` from the
peer itself (phone, letter, a meeting: ``site-node keys fingerprint`` there) and confirms it
when pinning (``site-node peers pin <site-id> <fingerprint>``). The fingerprint covers both
keys, so one value is compared.

A site that changes its keys publishes a :class:`KeyRotation`: the new keys, signed by the
key they replace *and* by the new key (proof that the site holds it). A peer accepts the
change only along an unbroken chain of rotations from the key it pinned
(:func:`follow_rotations`); the server, which can relay rotations but not sign them,
cannot insert one. Rotations are audited on the server, so key history is in the log.

Both roles compute these bytes here; this module imports neither role.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import ConcordError
from concord_protocol.fields import Sha256Hex, Slug
from concord_protocol.sealed_key import B64Bytes, b64decode_key, ed25519_public_from_b64

__all__ = [
    "KEY_ROTATION_VERSION",
    "KeyRotation",
    "PinnedKeys",
    "SignatureError",
    "follow_rotations",
    "format_fingerprint",
    "parse_fingerprint",
    "rotation_path",
    "sign_rotation",
    "site_key_fingerprint",
    "verify_ed25519",
]

KEY_ROTATION_VERSION: Literal[1] = 1
_FINGERPRINT_LABEL = b"concord/site-keys/v1\x00"
_ROTATION_LABEL = b"concord/key-rotation/v1\x00"
_SEPARATORS = re.compile(r"[\s:\-]+")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ConcordError):
    """A signature, a signed statement or a key fingerprint does not verify.

    Codes: ``signature.invalid`` (bad signature), ``signature.key_invalid`` (not a usable
    public key), ``keys.fingerprint_invalid`` (not a fingerprint), ``keys.rotation_invalid``
    (a rotation that does not chain from the pinned key).
    """

    code = "signature.invalid"


def site_key_fingerprint(signing_public_key: str, exchange_public_key: str) -> str:
    """The SHA-256 (hex) of a site's two public keys (API form: base64 of 32 raw bytes).

    Raises :class:`SignatureError` (``signature.key_invalid``) for a malformed key.
    """
    try:
        signing = b64decode_key(signing_public_key, what="signing public key")
        exchange = b64decode_key(exchange_public_key, what="exchange public key")
    except ValueError as exc:
        raise SignatureError(str(exc), code="signature.key_invalid") from None
    return hashlib.sha256(_FINGERPRINT_LABEL + signing + exchange).hexdigest()


def format_fingerprint(fingerprint: str) -> str:
    """The fingerprint as people read it aloud: 16 groups of 4 hex digits."""
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def parse_fingerprint(text: str) -> str:
    """A fingerprint as typed (any case; spaces, colons or dashes between digits allowed).

    Raises :class:`SignatureError` (``keys.fingerprint_invalid``) unless 64 hex digits remain.
    """
    value = _SEPARATORS.sub("", text).lower()
    if not _HEX64.match(value):
        raise SignatureError(
            "a key fingerprint is 64 hexadecimal digits (as `site-node keys fingerprint` "
            "prints it)",
            code="keys.fingerprint_invalid",
        )
    return value


def verify_ed25519(public_key_b64: str, signature: bytes, message: bytes, *, what: str) -> None:
    """Check an Ed25519 signature; raises :class:`SignatureError` naming ``what``."""
    try:
        key = ed25519_public_from_b64(public_key_b64)
    except ValueError as exc:
        raise SignatureError(f"{what}: {exc}", code="signature.key_invalid") from None
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError(f"{what}: the signature does not verify") from None


@dataclass(frozen=True)
class PinnedKeys:
    """A site's public keys as a peer holds them (and their fingerprint)."""

    site_id: str
    signing_public_key: str
    exchange_public_key: str

    @property
    def fingerprint(self) -> str:
        """:func:`site_key_fingerprint` of the two keys."""
        return site_key_fingerprint(self.signing_public_key, self.exchange_public_key)


class KeyRotation(BaseModel):
    """A site's statement that its keys changed: signed by the old and by the new key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = KEY_ROTATION_VERSION
    site_id: Slug
    previous_fingerprint: Sha256Hex
    signing_public_key: str
    exchange_public_key: str
    rotated_at: str
    previous_signature: B64Bytes
    new_signature: B64Bytes

    @property
    def fingerprint(self) -> str:
        """The new keys' fingerprint."""
        return site_key_fingerprint(self.signing_public_key, self.exchange_public_key)

    def signed_bytes(self) -> bytes:
        """What both signatures cover: every field but the signatures."""
        body = self.model_dump(mode="json", exclude={"previous_signature", "new_signature"})
        return _ROTATION_LABEL + canonical_json(body)

    def verify(self, previous: PinnedKeys) -> PinnedKeys:
        """Check this rotation against the keys it replaces; returns the new keys.

        Raises :class:`SignatureError` (``keys.rotation_invalid`` for a rotation of another
        site or from other keys, ``signature.invalid`` for a signature that fails).
        """
        if self.site_id != previous.site_id:
            raise SignatureError(
                f"a rotation of {self.site_id} offered for {previous.site_id}",
                code="keys.rotation_invalid",
            )
        if self.previous_fingerprint != previous.fingerprint:
            raise SignatureError(
                f"{self.site_id}: the rotation replaces keys {self.previous_fingerprint[:16]}…, "
                f"not the pinned {previous.fingerprint[:16]}…",
                code="keys.rotation_invalid",
            )
        message = self.signed_bytes()
        verify_ed25519(
            previous.signing_public_key,
            self.previous_signature,
            message,
            what=f"{self.site_id} key rotation (old key)",
        )
        verify_ed25519(
            self.signing_public_key,
            self.new_signature,
            message,
            what=f"{self.site_id} key rotation (new key)",
        )
        return PinnedKeys(self.site_id, self.signing_public_key, self.exchange_public_key)


def sign_rotation(
    *,
    site_id: str,
    previous: PinnedKeys,
    previous_signing_key: Ed25519PrivateKey,
    new_signing_key: Ed25519PrivateKey,
    new_exchange_public_key: str,
    rotated_at: str,
) -> KeyRotation:
    """The signed statement that ``site_id``'s keys change from ``previous`` to the new ones."""
    new_signing_public = base64.b64encode(
        new_signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    ).decode()
    unsigned = KeyRotation(
        site_id=site_id,
        previous_fingerprint=previous.fingerprint,
        signing_public_key=new_signing_public,
        exchange_public_key=new_exchange_public_key,
        rotated_at=rotated_at,
        previous_signature=b"\x00" * 64,
        new_signature=b"\x00" * 64,
    )
    message = unsigned.signed_bytes()
    return unsigned.model_copy(
        update={
            "previous_signature": previous_signing_key.sign(message),
            "new_signature": new_signing_key.sign(message),
        }
    )


def follow_rotations(pinned: PinnedKeys, rotations: Sequence[KeyRotation]) -> PinnedKeys:
    """The keys ``pinned`` leads to through ``rotations`` (oldest first).

    Rotations that replace keys older than ``pinned`` (history the peer already followed)
    are skipped; from the pinned key on, every rotation must chain. Raises
    :class:`SignatureError` when the chain is broken or a signature fails.
    """
    return rotation_path(pinned, rotations)[-1]


def rotation_path(pinned: PinnedKeys, rotations: Sequence[KeyRotation]) -> list[PinnedKeys]:
    """Every key on the chain from ``pinned`` (first) to the keys it leads to (last), each
    checked as :func:`follow_rotations` does: the keys a peer's older signatures (audit
    cosignatures made before a rotation) verify with."""
    path = [pinned]
    started = False
    for rotation in rotations:
        if not started and rotation.previous_fingerprint != path[-1].fingerprint:
            continue
        started = True
        path.append(rotation.verify(path[-1]))
    return path
