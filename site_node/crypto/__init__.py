"""Site-side cryptography: CKKS study contexts, the update wire format, sealed key exchange.

* :mod:`site_node.crypto.ckks`: parameters, study context generation, public contexts.
* :mod:`site_node.crypto.codecs`: the :class:`UpdateCodec` implementations
  (:class:`CkksCodec`, :class:`PlainCodec`) of the wire format shared with the server
  (:mod:`concord_protocol.wire.format`).
* :mod:`site_node.crypto.seeded` and :mod:`site_node.crypto.seal_format`: the
  ``ckks_seeded`` scheme's seeded ciphertexts (SEAL through ``tenseal.sealapi``).
* :mod:`site_node.crypto.sealing`: sealing the study's secret context from site to site.
* :mod:`site_node.crypto.errors`: :class:`CryptoError` and its subclasses, with stable codes.
"""

from concord_protocol.errors import ContextError, WireFormatError
from concord_protocol.sealed_key import SealedKey, ed25519_public_from_b64, x25519_public_from_b64
from concord_protocol.wire.ckks import SECURITY_BOUND_BITS, ContextInfo, context_info, load_context
from concord_protocol.wire.format import (
    WIRE_FORMAT_VERSION,
    EncodedUpdate,
    EncryptedUpdate,
    PlainUpdate,
    RoundInfo,
    SeededUpdate,
    UpdateHeader,
    expected_chunks,
)
from site_node.crypto.ckks import CkksParams, generate_study_context, public_context
from site_node.crypto.codecs import (
    DEFAULT_MAX_SITES,
    CkksCodec,
    PlainCodec,
    UpdateCodec,
    decrypt_aggregate,
    encode_update,
)
from site_node.crypto.errors import (
    CryptoError,
    KeyFileError,
    NonFiniteUpdateError,
    SealedKeyError,
    UpdateRangeError,
    UpdateShapeError,
)
from site_node.crypto.sealing import (
    SiteKeyPair,
    open_study_key,
    seal_study_key,
    study_key_fingerprint,
)

__all__ = [
    "DEFAULT_MAX_SITES",
    "SECURITY_BOUND_BITS",
    "WIRE_FORMAT_VERSION",
    "CkksCodec",
    "CkksParams",
    "ContextError",
    "ContextInfo",
    "CryptoError",
    "EncodedUpdate",
    "EncryptedUpdate",
    "KeyFileError",
    "NonFiniteUpdateError",
    "PlainCodec",
    "PlainUpdate",
    "RoundInfo",
    "SealedKey",
    "SealedKeyError",
    "SeededUpdate",
    "SiteKeyPair",
    "UpdateCodec",
    "UpdateHeader",
    "UpdateRangeError",
    "UpdateShapeError",
    "WireFormatError",
    "context_info",
    "decrypt_aggregate",
    "ed25519_public_from_b64",
    "encode_update",
    "expected_chunks",
    "generate_study_context",
    "load_context",
    "open_study_key",
    "public_context",
    "seal_study_key",
    "study_key_fingerprint",
    "x25519_public_from_b64",
]
