"""Site-side cryptography: CKKS study contexts, the update wire format, sealed key exchange.

* :mod:`site_node.crypto.ckks`: parameters, study context generation, public contexts.
* :mod:`site_node.crypto.wire`: the encrypted-update wire format shared with the server,
  and the :class:`UpdateCodec` implementations (:class:`CkksCodec`, :class:`PlainCodec`).
* :mod:`site_node.crypto.sealing`: sealing the study's secret context from site to site.
* :mod:`site_node.crypto.errors`: :class:`CryptoError` and its subclasses, with stable codes.
"""

from site_node.crypto.ckks import (
    SECURITY_BOUND_BITS,
    CkksParams,
    ContextInfo,
    context_info,
    generate_study_context,
    load_context,
    public_context,
)
from site_node.crypto.errors import (
    ContextError,
    CryptoError,
    KeyFileError,
    NonFiniteUpdateError,
    SealedKeyError,
    UpdateRangeError,
    UpdateShapeError,
    WireFormatError,
)
from site_node.crypto.sealing import (
    SealedKey,
    SiteKeyPair,
    ed25519_public_from_b64,
    open_study_key,
    seal_study_key,
    study_key_fingerprint,
    x25519_public_from_b64,
)
from site_node.crypto.wire import (
    DEFAULT_MAX_SITES,
    WIRE_FORMAT_VERSION,
    CkksCodec,
    EncodedUpdate,
    EncryptedUpdate,
    PlainCodec,
    PlainUpdate,
    RoundInfo,
    UpdateCodec,
    UpdateHeader,
    decrypt_aggregate,
    encode_update,
    expected_chunks,
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
