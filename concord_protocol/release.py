"""What a released model is, byte for byte: both sides must compute it identically.

A completed study's final model leaves the consortium only when every site signed off the
same model hash and the data-use policy allows it (the rules are the server's,
:mod:`consortium_server.release`; each site decrypts and signs off in
:mod:`site_node.release`). Defined here:

* the **canonical model bytes**: the decrypted parameter vector as little-endian float64
  (``numpy.asarray(vector, dtype="<f8").tobytes()``), in the order of the aggregate;
* the **model hash**: SHA-256 (lowercase hex) of those bytes;
* the **sign-off message**: RFC 8785 canonical JSON of
  ``{"contract_hash", "model_sha256", "site_id", "study_id"}``, signed with the site's
  Ed25519 signing key (the one registered at enrolment).

"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

from concord_protocol.canonical import canonical_json

__all__ = ["MODEL_ENCODING", "canonical_model_bytes", "model_sha256", "signoff_message"]

#: How the released model is encoded (recorded in the model card).
MODEL_ENCODING = "float64-le"


def canonical_model_bytes(vector: npt.ArrayLike) -> bytes:
    """The released form of a decrypted model: a flat little-endian float64 vector."""
    array = np.asarray(vector, dtype="<f8")
    if array.ndim != 1:
        raise ValueError("the model must be one flat parameter vector")
    return array.tobytes()


def model_sha256(data: bytes) -> str:
    """SHA-256 (hex) of canonical model bytes: the hash every site signs off."""
    return hashlib.sha256(data).hexdigest()


def signoff_message(*, study_id: str, contract_hash: str, model_sha256: str, site_id: str) -> bytes:
    """The exact bytes a site signs to sign off the release of ``model_sha256``."""
    return canonical_json(
        {
            "study_id": study_id,
            "contract_hash": contract_hash,
            "model_sha256": model_sha256,
            "site_id": site_id,
        }
    )
