"""Reading CKKS contexts (TenSEAL): what a context says about the ciphertexts it accepts.

Sites generate a study's context and hold its secret key (:mod:`site_node.crypto.ckks`);
the server is given only the public context and uses it to add ciphertexts. Both must read
a context the same way: its ring degree and data modulus fix the chunk size and the size of
a ciphertext on the wire, its scale and modulus the largest sum that decrypts correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tenseal as ts

from concord_protocol.errors import ContextError
from concord_protocol.wire.format import EncryptedScheme

__all__ = [
    "HEADROOM_MARGIN_BITS",
    "SECURITY_BOUND_BITS",
    "ContextInfo",
    "context_info",
    "load_context",
    "max_abs_sum",
]

#: Largest total coefficient-modulus size (bits) per ring degree for 128-bit security
#: (HomomorphicEncryption.org standard, as enforced by SEAL).
SECURITY_BOUND_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438}

#: Bits of safety kept between the guarded magnitude and the modulus (factor 2).
HEADROOM_MARGIN_BITS = 1


def max_abs_sum(data_modulus_bits: int, scale_bits: float) -> float:
    """Largest magnitude the decrypted sum may reach: a plaintext coefficient of
    ``max|value| * scale`` must stay below ``q/2``, with :data:`HEADROOM_MARGIN_BITS` kept."""
    # Worst case a plaintext coefficient equals max|value| * scale; it must stay below q/2.
    return float(2.0 ** (data_modulus_bits - 1 - HEADROOM_MARGIN_BITS - scale_bits))


@dataclass(frozen=True)
class ContextInfo:
    """What a loaded context says about the ciphertexts it accepts."""

    poly_modulus_degree: int
    data_modulus_bits: int
    global_scale: float
    first_parms_id: tuple[int, ...]
    is_private: bool

    @property
    def slot_count(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_sum(self) -> float:
        """Largest magnitude the decrypted sum of weighted updates may reach safely."""
        return max_abs_sum(self.data_modulus_bits, math.log2(self.global_scale))

    def chunk_size(self, scheme: EncryptedScheme) -> int:
        """Values per ciphertext: one per slot for ``ckks``; two per slot (the real and the
        imaginary part) for ``ckks_seeded``."""
        return self.slot_count if scheme == "ckks" else 2 * self.slot_count


def context_info(ctx: ts.Context) -> ContextInfo:
    """Parameters of a loaded context (ring degree, data modulus, scale, parms id)."""
    seal = ctx.seal_context().data
    first = seal.first_context_data()
    return ContextInfo(
        poly_modulus_degree=int(first.parms().poly_modulus_degree()),
        data_modulus_bits=int(first.total_coeff_modulus_bit_count()),
        global_scale=float(ctx.global_scale),
        first_parms_id=tuple(int(x) for x in seal.first_parms_id()),
        is_private=bool(ctx.is_private()),
    )


def load_context(data: bytes, *, require_secret: bool) -> ts.Context:
    """Load a serialised CKKS context.

    ``require_secret=True`` (a site): the context must hold the secret key.
    ``require_secret=False`` (the server): the context must *not* hold it; a server handed
    a secret context refuses it rather than silently being able to decrypt.
    Raises :class:`ContextError` with codes ``crypto.context_invalid``,
    ``crypto.context_not_private`` or ``crypto.context_has_secret``.
    """
    if not isinstance(data, bytes | bytearray) or not data:
        raise ContextError("the CKKS context is empty or not bytes", code="crypto.context_invalid")
    try:
        ctx = ts.context_from(bytes(data))
        scheme = ctx.seal_context().data.first_context_data().parms().scheme()
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise ContextError(
            f"the CKKS context cannot be parsed ({type(exc).__name__})",
            code="crypto.context_invalid",
        ) from None
    if getattr(scheme, "name", None) != "CKKS":
        raise ContextError("the context is not a CKKS context", code="crypto.context_invalid")
    if require_secret and not ctx.is_private():
        raise ContextError(
            "the context holds no secret key: a site needs the study's secret context "
            "(open the sealed study key first)",
            code="crypto.context_not_private",
        )
    if not require_secret and ctx.is_private():
        raise ContextError(
            "the context holds the secret key: the server must only be given the public context",
            code="crypto.context_has_secret",
        )
    return ctx
