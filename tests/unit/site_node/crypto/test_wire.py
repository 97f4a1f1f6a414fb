"""The update wire format and the site-side codecs."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pytest
import tenseal as ts

from site_node.crypto import (
    CkksCodec,
    EncodedUpdate,
    EncryptedUpdate,
    NonFiniteUpdateError,
    PlainCodec,
    PlainUpdate,
    UpdateCodec,
    UpdateHeader,
    UpdateRangeError,
    UpdateShapeError,
    WireFormatError,
    decrypt_aggregate,
    encode_update,
    load_context,
)

from .conftest import CONTRACT_HASH, round_info

N_PARAMS = 10_000  # three chunks of 4096, the last one shorter


def _sum_with_public_context(public_ctx: bytes, updates: Sequence[EncodedUpdate]) -> list[bytes]:
    ctx = load_context(public_ctx, require_secret=False)
    out = []
    for index in range(updates[0].header.num_chunks):
        acc = ts.ckks_vector_from(ctx, updates[0].chunks[index])
        for update in updates[1:]:
            acc += ts.ckks_vector_from(ctx, update.chunks[index])
        out.append(acc.serialize())
    return out


@pytest.fixture(scope="module")
def codec(secret_ctx: bytes) -> CkksCodec:
    return CkksCodec(secret_ctx)


def test_both_codecs_implement_the_protocol(codec: CkksCodec) -> None:
    assert isinstance(codec, UpdateCodec)
    assert isinstance(PlainCodec(), UpdateCodec)
    assert (codec.scheme, PlainCodec().scheme) == ("ckks", "plain")


def test_encrypted_update_layout(codec: CkksCodec) -> None:
    vector = np.linspace(-1, 1, N_PARAMS, dtype=np.float32)
    update = codec.encode(vector, weight=10, info=round_info(N_PARAMS))
    assert isinstance(update, EncryptedUpdate)
    header = update.header
    assert (header.scheme, header.chunk_size, header.num_chunks) == ("ckks", 4096, 3)
    assert [header.chunk_length(i) for i in range(3)] == [4096, 4096, 1808]
    assert header.chunk_digests == tuple(hashlib.sha256(c).hexdigest() for c in update.chunks)
    assert update.digest == hashlib.sha256(header.to_bytes()).hexdigest()
    # About 32 bytes per slot at the default parameters (float32 is 4); the last chunk is
    # a whole ciphertext however few values it holds.
    assert 30 < update.nbytes / (3 * 4096) < 34
    blobs = update.to_bytes_list()
    assert len(blobs) == 4
    assert EncodedUpdate.from_bytes_list(blobs) == update


def test_weighted_round_trip_divides_by_total_weight(
    codec: CkksCodec, secret_ctx: bytes, public_ctx: bytes
) -> None:
    rng = np.random.default_rng(7)
    vectors = [rng.normal(0, 0.1, N_PARAMS) for _ in range(3)]
    weights = [120.0, 300.0, 45.0]
    updates = [
        codec.encode(v, weight=w, info=round_info(N_PARAMS))
        for v, w in zip(vectors, weights, strict=True)
    ]
    aggregate = _sum_with_public_context(public_ctx, updates)
    got = decrypt_aggregate(
        aggregate, secret_context=secret_ctx, num_params=N_PARAMS, total_weight=sum(weights)
    )
    expected = sum(w * v for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    assert np.max(np.abs(got - expected)) < 1e-6
    # Without dividing, the weighted sum shows the weights were applied before encryption.
    raw = codec.decrypt_aggregate(aggregate, num_params=N_PARAMS, total_weight=1)
    assert np.max(np.abs(raw - sum(weights) * expected)) < 1e-5


def test_decryption_is_rounded_and_identical_at_every_site(
    secret_ctx: bytes, public_ctx: bytes
) -> None:
    site_a, site_b = CkksCodec(secret_ctx), CkksCodec(secret_ctx)
    vector = np.random.default_rng(1).normal(size=N_PARAMS)
    update = site_a.encode(vector, weight=3, info=round_info(N_PARAMS))
    aggregate = _sum_with_public_context(public_ctx, [update])
    out_a = site_a.decrypt_aggregate(aggregate, num_params=N_PARAMS, total_weight=1)
    out_b = site_b.decrypt_aggregate(aggregate, num_params=N_PARAMS, total_weight=1)
    assert np.array_equal(out_a, out_b)
    steps = out_a / site_a.rounding_grid
    assert np.array_equal(steps, np.round(steps))  # on the grid: the raw CKKS error is gone
    # dither and rounding add at most one grid step to the CKKS error (~1e-8)
    assert np.max(np.abs(out_a - 3 * vector)) <= 1.2 * site_a.rounding_grid


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_refused_before_encrypting(codec: CkksCodec, bad: float) -> None:
    vector = np.zeros(N_PARAMS)
    vector[9_000] = bad
    with pytest.raises(NonFiniteUpdateError) as exc:
        codec.iter_encrypted_chunks(vector, weight=1, info=round_info(N_PARAMS))  # eager check
    assert exc.value.code == "update.non_finite"
    assert "9000" in str(exc.value)


def test_length_shape_and_dtype_are_checked(codec: CkksCodec) -> None:
    with pytest.raises(UpdateShapeError) as exc:
        codec.encode(np.zeros(N_PARAMS - 1), weight=1, info=round_info(N_PARAMS))
    assert exc.value.code == "update.length_mismatch"
    with pytest.raises(UpdateShapeError) as exc:
        codec.encode(np.zeros((2, N_PARAMS // 2)), weight=1, info=round_info(N_PARAMS))
    assert exc.value.code == "update.bad_shape"
    with pytest.raises(UpdateShapeError) as exc:
        codec.encode(np.zeros(N_PARAMS, dtype=complex), weight=1, info=round_info(N_PARAMS))
    assert exc.value.code == "update.bad_dtype"


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, True])
def test_invalid_weight_is_refused(codec: CkksCodec, weight: float) -> None:
    with pytest.raises(UpdateRangeError) as exc:
        codec.encode(np.zeros(N_PARAMS), weight=weight, info=round_info(N_PARAMS))
    assert exc.value.code == "update.invalid_weight"


def test_overflow_guard(codec: CkksCodec, secret_ctx: bytes) -> None:
    limit = codec.per_site_limit
    assert limit == 2.0**22 / 32
    ok = np.full(N_PARAMS, 0.5)
    codec.encode(ok, weight=limit, info=round_info(N_PARAMS))  # exactly at the limit
    with pytest.raises(UpdateRangeError) as exc:
        codec.encode(ok, weight=2.01 * limit, info=round_info(N_PARAMS))
    assert exc.value.code == "update.out_of_range"
    # Fewer sites summed -> a larger per-site allowance.
    CkksCodec(secret_ctx, max_sites=4).encode(ok, weight=2.01 * limit, info=round_info(N_PARAMS))


def test_one_shot_encode_update_sets_the_header(secret_ctx: bytes) -> None:
    update = encode_update(
        np.ones(5),
        weight=2,
        secret_context=secret_ctx,
        study_id="s-9",
        contract_hash=CONTRACT_HASH,
        round_number=4,
        num_params=5,
    )
    assert (update.header.study_id, update.header.round_number, update.header.num_params) == (
        "s-9",
        4,
        5,
    )
    assert update.header.num_chunks == 1


def test_from_bytes_list_rejects_tampering(codec: CkksCodec) -> None:
    blobs = codec.encode(np.ones(N_PARAMS), weight=1, info=round_info(N_PARAMS)).to_bytes_list()
    flipped = bytearray(blobs[2])
    flipped[500] ^= 0x01
    cases = {
        "update.digest_mismatch": [blobs[0], blobs[1], bytes(flipped), blobs[3]],
        "update.wrong_chunk_count": blobs[:-1],
        "update.malformed_header": [b'{"scheme":"ckks"}', *blobs[1:]],
    }
    for code, bad in cases.items():
        with pytest.raises(WireFormatError) as exc:
            EncodedUpdate.from_bytes_list(bad)
        assert exc.value.code == code
    spaced = blobs[0].replace(b",", b", ")
    with pytest.raises(WireFormatError, match="canonical"):
        UpdateHeader.from_bytes(spaced)


def test_header_must_be_consistent() -> None:
    with pytest.raises(ValueError, match="num_chunks"):
        UpdateHeader(
            scheme="ckks",
            study_id="s",
            contract_hash=CONTRACT_HASH,
            round_number=0,
            num_params=10,
            chunk_size=4,
            num_chunks=2,
            chunk_digests=("0" * 64,) * 2,
        )


def test_decrypt_aggregate_checks_its_input(codec: CkksCodec, public_ctx: bytes) -> None:
    update = codec.encode(np.ones(N_PARAMS), weight=1, info=round_info(N_PARAMS))
    chunks = list(update.chunks)
    with pytest.raises(WireFormatError) as exc:
        codec.decrypt_aggregate(chunks[:2], num_params=N_PARAMS, total_weight=1)
    assert exc.value.code == "update.wrong_chunk_count"
    with pytest.raises(WireFormatError) as exc:
        codec.decrypt_aggregate(
            [chunks[0], chunks[1], chunks[2][:100]], num_params=N_PARAMS, total_weight=1
        )
    assert exc.value.code == "update.undecodable_chunk"
    with pytest.raises(WireFormatError) as exc:  # a full chunk where a short one belongs
        codec.decrypt_aggregate(
            [chunks[0], chunks[1], chunks[0]], num_params=N_PARAMS, total_weight=1
        )
    assert exc.value.code == "update.size_mismatch"
    with pytest.raises(UpdateRangeError):
        codec.decrypt_aggregate(chunks, num_params=N_PARAMS, total_weight=0)


def test_plain_codec_round_trip() -> None:
    codec = PlainCodec(chunk_size=4000)
    vectors: list[np.ndarray] = [np.arange(N_PARAMS, dtype=np.float32), np.ones(N_PARAMS)]
    updates = [
        codec.encode(v, weight=w, info=round_info(N_PARAMS))
        for v, w in zip(vectors, (1.0, 3.0), strict=True)
    ]
    assert isinstance(updates[0], PlainUpdate)
    assert updates[0].header.num_chunks == 3
    assert isinstance(EncodedUpdate.from_bytes_list(updates[0].to_bytes_list()), PlainUpdate)
    summed = [
        (np.frombuffer(a, "<f8") + np.frombuffer(b, "<f8")).tobytes()
        for a, b in zip(updates[0].chunks, updates[1].chunks, strict=True)
    ]
    got = codec.decrypt_aggregate(summed, num_params=N_PARAMS, total_weight=4.0)
    assert np.allclose(got, (vectors[0] + 3 * vectors[1]) / 4, rtol=0, atol=1e-12)
    with pytest.raises(NonFiniteUpdateError):
        codec.encode(np.full(N_PARAMS, np.nan), weight=1, info=round_info(N_PARAMS))
    with pytest.raises(WireFormatError) as exc:
        codec.decrypt_aggregate(
            [summed[0], summed[1], summed[2][:-8]], num_params=N_PARAMS, total_weight=1
        )
    assert exc.value.code == "update.size_mismatch"
