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
  Ed25519 signing key (the one registered at enrolment);
* the **parameter layout** (:class:`ModelLayout`) the uploading site sends with the bytes:
  the input shape and class count the catalogue network was built for and the
  ``(name, shape)`` of each of its parameters in the order they were flattened
  (``site_node.training.params``), so that the server can serve the model as a standard
  tensor file (:mod:`concord_protocol.model_file`). The layout is not signed: the sites sign
  the bytes only. A reader rebuilds the layout from the catalogue network and refuses a
  file that differs, so a server that lies about it can make a file unusable, never make
  it load other weights under the right names.

"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from concord_protocol.canonical import canonical_json

__all__ = [
    "MAX_LAYOUT_PARAMETERS",
    "MODEL_ENCODING",
    "ModelLayout",
    "ModelParameter",
    "canonical_model_bytes",
    "model_sha256",
    "signoff_message",
]

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


#: At most this many parameter tensors in a layout (the catalogue's largest has ~400).
MAX_LAYOUT_PARAMETERS = 10_000

#: A parameter's name as PyTorch's ``named_parameters()`` spells it (``features.0.weight``).
ParameterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")]
#: One dimension of a parameter or input (a catalogue network has no empty parameter).
Dimension = Annotated[int, Field(ge=1, le=2**31 - 1)]


class ModelParameter(BaseModel):
    """One parameter tensor of the released network: its name and shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ParameterName
    shape: tuple[Dimension, ...] = Field(max_length=8)

    @property
    def numel(self) -> int:
        """Number of scalars (1 for a 0-dimensional parameter)."""
        return math.prod(self.shape)


class ModelLayout(BaseModel):
    """How the released parameter vector splits into the catalogue network's tensors.

    Sent by the uploading site with the model bytes; the server checks that the tensors'
    sizes add up to the model's parameter count and that the catalogue gives that count
    for ``input_shape`` and ``num_classes``, and keeps it to write the model file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: tuple[Dimension, ...] = Field(
        min_length=1, max_length=5, description="One record's shape, e.g. `[30]` or `[1, 64, 64]`."
    )
    num_classes: int = Field(ge=2, le=100_000)
    parameters: tuple[ModelParameter, ...] = Field(
        min_length=1,
        max_length=MAX_LAYOUT_PARAMETERS,
        description="Every trainable parameter, in the order of the flat vector.",
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> ModelLayout:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        if "__metadata__" in names:
            raise ValueError("__metadata__ is not a parameter name")
        return self

    @property
    def num_params(self) -> int:
        """Number of scalars over all tensors (the flat vector's length)."""
        return sum(p.numel for p in self.parameters)
