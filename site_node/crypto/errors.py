"""Errors raised by the crypto package, each with a stable ``code``.

Codes are part of the contract with callers (the Flower ClientApp/ServerApp, the site agent
and the audit log): switch on ``code``, never on the message. Messages name what is wrong
and what to do, and never contain key material or update values.
"""

from __future__ import annotations

__all__ = [
    "ContextError",
    "CryptoError",
    "KeyFileError",
    "NonFiniteUpdateError",
    "SealedKeyError",
    "UpdateRangeError",
    "UpdateShapeError",
    "WireFormatError",
]


class CryptoError(Exception):
    """Base class: every error of this package carries a stable dotted ``code``."""

    code: str = "crypto.error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message (safe to log: it never holds keys or values)."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ContextError(CryptoError):
    """A CKKS context is unreadable, or holds (or lacks) the secret key against expectation.

    Codes: ``crypto.context_invalid``, ``crypto.context_not_private`` (a site needs the
    secret key), ``crypto.context_has_secret`` (the server must never be given it).
    """

    code = "crypto.context_invalid"


class NonFiniteUpdateError(CryptoError):
    """The update holds NaN or infinite values; a site never encrypts such an update."""

    code = "update.non_finite"


class UpdateShapeError(CryptoError):
    """The update does not have the number of parameters the round expects."""

    code = "update.length_mismatch"


class UpdateRangeError(CryptoError):
    """Weighted values (or the weight itself) would overflow the CKKS plaintext space.

    Codes: ``update.out_of_range`` and ``update.invalid_weight``.
    """

    code = "update.out_of_range"


class WireFormatError(CryptoError):
    """Bytes on the wire do not form a valid update (header, chunk count, digests, chunks).

    Codes: ``update.malformed_header``, ``update.wrong_chunk_count``,
    ``update.digest_mismatch``, ``update.undecodable_chunk``, ``update.size_mismatch``,
    ``update.header_mismatch``.
    """

    code = "update.malformed"


class SealedKeyError(CryptoError):
    """A sealed study key was refused.

    Codes: ``sealed_key.malformed``, ``sealed_key.wrong_recipient``,
    ``sealed_key.wrong_study``, ``sealed_key.wrong_contract``, ``sealed_key.bad_signature``,
    ``sealed_key.decrypt_failed``, ``sealed_key.public_context_mismatch``,
    ``sealed_key.fingerprint_mismatch``.
    """

    code = "sealed_key.invalid"


class KeyFileError(CryptoError):
    """A site key file is missing, unreadable, of the wrong type or too widely readable.

    Codes: ``keys.missing``, ``keys.invalid``, ``keys.insecure_permissions``, ``keys.exists``.
    """

    code = "keys.invalid"
