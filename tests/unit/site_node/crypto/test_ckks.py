"""CKKS parameters and contexts: what a site holds, what the server gets."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from pydantic import ValidationError

from site_node.crypto import (
    CkksParams,
    ContextError,
    context_info,
    generate_study_context,
    load_context,
    public_context,
)


def test_defaults_are_the_documented_choice() -> None:
    params = CkksParams()
    assert params.poly_modulus_degree == 8192
    assert params.coeff_mod_bit_sizes == (60, 60)
    assert params.global_scale_bits == 36
    assert params.encryption_type == "symmetric"
    assert params.slot_count == 4096
    assert params.max_abs_sum == 2.0**22


@pytest.mark.parametrize(
    ("degree", "bits"),
    [(4096, (60, 40, 40, 60)), (8192, (60, 60, 60, 60)), (8192, (60,)), (8192, (60, 61))],
)
def test_params_outside_the_security_bound_or_malformed_are_refused(
    degree: int, bits: tuple[int, ...]
) -> None:
    with pytest.raises(ValidationError):
        CkksParams(poly_modulus_degree=degree, coeff_mod_bit_sizes=bits)


def test_scale_without_headroom_is_refused() -> None:
    with pytest.raises(ValidationError, match="headroom"):
        CkksParams(global_scale_bits=58)


def test_secret_and_public_context(secret_ctx: bytes, public_ctx: bytes) -> None:
    site = load_context(secret_ctx, require_secret=True)
    assert site.is_private()
    server = load_context(public_ctx, require_secret=False)
    assert server.is_private() is False
    info = context_info(server)
    assert (info.poly_modulus_degree, info.data_modulus_bits) == (8192, 60)
    assert info.global_scale == 2.0**36
    # Symmetric: the public context is parameters only, far smaller than the secret one.
    assert len(public_ctx) < 1024 < len(secret_ctx)
    assert public_context(secret_ctx) == public_ctx  # deterministic: sites compare its hash


def test_public_context_cannot_decrypt_nor_encrypt(secret_ctx: bytes, public_ctx: bytes) -> None:
    site = load_context(secret_ctx, require_secret=True)
    server = load_context(public_ctx, require_secret=False)
    blob = ts.ckks_vector(site, [1.0, 2.0]).serialize()
    on_server = ts.ckks_vector_from(server, blob)
    with pytest.raises(ValueError, match="secret"):
        on_server.decrypt()
    with pytest.raises(ValueError, match="doesn't support encryption"):
        ts.ckks_vector(server, [1.0])


def test_asymmetric_public_context_has_public_key_but_no_secret() -> None:
    secret = generate_study_context(CkksParams(encryption_type="asymmetric"))
    public = load_context(public_context(secret), require_secret=False)
    assert public.is_private() is False
    assert public.has_public_key()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector(public, [1.0]).decrypt()


def test_load_context_errors(secret_ctx: bytes, public_ctx: bytes) -> None:
    with pytest.raises(ContextError) as exc:
        load_context(secret_ctx, require_secret=False)
    assert exc.value.code == "crypto.context_has_secret"
    with pytest.raises(ContextError) as exc:
        load_context(public_ctx, require_secret=True)
    assert exc.value.code == "crypto.context_not_private"
    for garbage in (b"", b"not a context", secret_ctx[: len(secret_ctx) // 2]):
        with pytest.raises(ContextError) as exc:
            load_context(garbage, require_secret=True)
        assert exc.value.code == "crypto.context_invalid"
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 4096, 1032193).serialize(save_secret_key=True)
    with pytest.raises(ContextError, match="not a CKKS"):
        load_context(bfv, require_secret=True)
    with pytest.raises(ContextError) as exc:
        public_context(public_ctx)
    assert exc.value.code == "crypto.context_not_private"


def test_headroom_bound_holds_and_is_needed(secret_ctx: bytes) -> None:
    """A dense sum at max_abs_sum decrypts; three times it wraps around."""
    ctx = load_context(secret_ctx, require_secret=True)
    bound = CkksParams().max_abs_sum
    half = np.full(4096, bound / 2)
    ok = ts.ckks_vector(ctx, half) + ts.ckks_vector(ctx, half)
    assert np.allclose(ok.decrypt(), bound, rtol=1e-9)
    full = ts.ckks_vector(ctx, np.full(4096, bound))  # each one alone still encodes
    wrapped = full + full + full
    assert not np.allclose(wrapped.decrypt(), bound * 3, rtol=1e-3)
