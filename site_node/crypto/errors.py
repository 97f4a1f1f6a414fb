"""Errors of the site's crypto code, each with a stable ``code``.

Codes are part of the contract with callers (the Flower ClientApp, the site agent and the
audit log): switch on ``code``, never on the message. Messages name what is wrong and what
to do, and never contain key material or update values. Every class here is a
:class:`~site_node.errors.SiteError` (the site's root) and a
:class:`~concord_protocol.errors.CryptoError`, so ``except CryptoError`` also catches what
the shared wire-format and context code raises (:class:`WireFormatError`,
:class:`ContextError`).
"""

from __future__ import annotations

from concord_protocol.errors import ContextError, CryptoError, WireFormatError
from site_node.errors import SiteError

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


class NonFiniteUpdateError(SiteError, CryptoError):
    """The update holds NaN or infinite values; a site never encrypts such an update."""

    code = "update.non_finite"


class UpdateShapeError(SiteError, CryptoError):
    """The update does not have the number of parameters the round expects.

    Codes: ``update.length_mismatch``, ``update.bad_shape``, ``update.bad_dtype``.
    """

    code = "update.length_mismatch"


class UpdateRangeError(SiteError, CryptoError):
    """Weighted values (or the weight itself) would overflow the CKKS plaintext space.

    Codes: ``update.out_of_range`` and ``update.invalid_weight``.
    """

    code = "update.out_of_range"


class SealedKeyError(SiteError, CryptoError):
    """A sealed study key was refused.

    Codes: ``sealed_key.malformed``, ``sealed_key.wrong_recipient``,
    ``sealed_key.wrong_study``, ``sealed_key.wrong_contract``, ``sealed_key.bad_signature``,
    ``sealed_key.decrypt_failed``, ``sealed_key.public_context_mismatch``,
    ``sealed_key.fingerprint_mismatch``.
    """

    code = "sealed_key.invalid"


class KeyFileError(SiteError, CryptoError):
    """A site key file is missing, unreadable, of the wrong type or too widely readable.

    Codes: ``keys.missing``, ``keys.invalid``, ``keys.insecure_permissions``, ``keys.exists``.
    """

    code = "keys.invalid"
