"""CKKS parameters and study contexts (TenSEAL), made at a site.

Reading a context (what the server does too) is :mod:`concord_protocol.wire.ckks`.

One CKKS secret context is generated per study by one approved site and shared with the
other approved sites (sealed, see :mod:`site_node.crypto.sealing`). The consortium server
only ever gets :func:`public_context`, which can add ciphertexts but neither decrypt nor,
with the default symmetric encryption, encrypt.

Default parameters (measured with TenSEAL 0.3.18, numbers in ``docs/crypto.md``):

* ``poly_modulus_degree=8192``, ``coeff_mod_bit_sizes=(60, 60)``: one 60-bit data prime and
  one special prime, 120 of the 218 bits that 128-bit security allows at N=8192 (that is
  above the 192-bit-security bound of 152 bits for this N). The server only adds, so no
  level for a multiply is needed: sites weight their update before encrypting.
  Ciphertext size depends on the data prime only (about half its bit count in bytes per
  parameter): about 32 B/param, the same as N=4096 with a 60-bit data prime, but with far more
  security margin and half as many chunks (4096 slots each).
* ``global_scale_bits=36``: the worst-case magnitude of the *sum* of weighted updates must
  stay below ``2**(60 - 1 - 36)``; we guard at half of that, ``2**22`` (about 4.2e6).
  The absolute error of a 3-site sum is about 2e-8 (2^40 gives 1.4e-9 but only 2.6e5 of
  headroom, too little once updates are multiplied by sample counts); divided by the total
  sample count, the error in the averaged model is below float32 rounding.
* ``encryption_type="symmetric"``: all sites of a study hold the secret key anyway, so no
  public key is needed. Symmetric encryption is 2x faster and about 10x more precise than
  public-key encryption here, the public context is 84 bytes of parameters, and a party
  without the secret key (the server) cannot encrypt at all.
"""

from __future__ import annotations

from typing import Literal

import tenseal as ts
from pydantic import BaseModel, ConfigDict, Field, model_validator

from concord_protocol.errors import ContextError
from concord_protocol.wire.ckks import (
    HEADROOM_MARGIN_BITS,
    SECURITY_BOUND_BITS,
    load_context,
    max_abs_sum,
)

__all__ = ["CkksParams", "generate_study_context", "public_context"]


class CkksParams(BaseModel):
    """CKKS parameters of a study context; the defaults are the consortium's choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: Literal[4096, 8192, 16384] = Field(
        default=8192, description="Ring degree N; a ciphertext holds N/2 values."
    )
    coeff_mod_bit_sizes: tuple[int, ...] = Field(
        default=(60, 60),
        description="Prime sizes; all but the last are data primes, the last is special.",
    )
    global_scale_bits: int = Field(default=36, ge=20, le=58, description="log2 of the scale.")
    encryption_type: Literal["symmetric", "asymmetric"] = "symmetric"

    @model_validator(mode="after")
    def _check(self) -> CkksParams:
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise ValueError("coeff_mod_bit_sizes needs at least one data prime and a special one")
        if any(not 20 <= b <= 60 for b in bits):
            raise ValueError("every prime must have 20 to 60 bits")
        bound = SECURITY_BOUND_BITS[self.poly_modulus_degree]
        if sum(bits) > bound:
            raise ValueError(
                f"coefficient modulus of {sum(bits)} bits exceeds the 128-bit-security bound "
                f"of {bound} bits for N={self.poly_modulus_degree}"
            )
        if self.data_modulus_bits - 1 - HEADROOM_MARGIN_BITS <= self.global_scale_bits:
            raise ValueError("global_scale_bits leaves no headroom below the data modulus")
        return self

    @property
    def slot_count(self) -> int:
        """Values per ciphertext (one chunk of an update)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all primes but the special)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs_sum(self) -> float:
        """Largest magnitude the decrypted *sum* of weighted updates may reach safely."""
        return max_abs_sum(self.data_modulus_bits, self.global_scale_bits)


def generate_study_context(params: CkksParams | None = None) -> bytes:
    """Create a fresh study context and return it serialised *with* its secret key.

    No relinearisation or Galois keys are generated into the bytes: aggregation only adds.
    The result is secret: seal it to other sites, never log or upload it.
    """
    params = params or CkksParams()
    encryption = (
        ts.ENCRYPTION_TYPE.SYMMETRIC
        if params.encryption_type == "symmetric"
        else ts.ENCRYPTION_TYPE.ASYMMETRIC
    )
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        -1,
        list(params.coeff_mod_bit_sizes),
        encryption_type=encryption,
    )
    ctx.global_scale = float(2**params.global_scale_bits)
    return bytes(
        ctx.serialize(
            save_public_key=params.encryption_type == "asymmetric",
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def public_context(secret_context: bytes) -> bytes:
    """Derive the public context (parameters, and the public key if asymmetric) to upload.

    Deterministic for a given secret context, so sites can compare its SHA-256.
    """
    ctx = load_context(secret_context, require_secret=True)
    data = bytes(
        ctx.serialize(
            save_public_key=not _is_symmetric(ctx),
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )
    check = ts.context_from(data)
    if check.is_private():  # defence in depth: never hand out a secret by accident
        raise ContextError(
            "public context still holds the secret key", code="crypto.context_has_secret"
        )
    return data


def _is_symmetric(ctx: ts.Context) -> bool:
    try:
        ctx.has_public_key()
    except ValueError:  # TenSEAL: "has_public_key is not supported for symmetric encryption"
        return True
    return False
