"""Integrity tags: honest sums pass within the stated bound, forged ones do not."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from concord_protocol.wire.format import CKKS_TAG_SLOTS, RoundInfo, tagged_length
from consortium_server.federation.blind_sum import blind_sum
from site_node.crypto import CkksCodec, expected_chunks
from site_node.crypto.codecs import ListedSum
from site_node.crypto.tags import TOLERANCE_GRIDS, AggregateIntegrityError, AggregateTags

from .conftest import CONTRACT_HASH

N_PARAMS = 10_000  # three chunks: 4092 + 4092 + 1816 values, each with 4 tags
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _info(round_number: int = 1, study: str = "study-1") -> RoundInfo:
    return RoundInfo(study, CONTRACT_HASH, round_number, N_PARAMS, CKKS_TAG_SLOTS)


def _aggregate(
    codec: CkksCodec, public: bytes, info: RoundInfo, weights: dict[str, float], seed: int = 0
) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {s: rng.normal(0, 0.2, N_PARAMS) for s in weights}
    updates = {
        s: codec.encode(v, weight=weights[s], info=info, site_id=s).to_bytes_list()
        for s, v in vectors.items()
    }
    size = info.num_values(codec.chunk_size)
    summed = blind_sum(
        public,
        updates,
        expected=info,
        expected_chunks=expected_chunks(size, codec.chunk_size),
        max_chunk_bytes=1 << 22,
    )
    total = sum(weights.values())
    return list(summed.aggregate.chunks), sum(weights[s] * vectors[s] for s in weights) / total


@pytest.fixture(scope="module")
def codec(secret_ctx: bytes) -> CkksCodec:
    return CkksCodec(secret_ctx, tag_slots=CKKS_TAG_SLOTS)


def test_the_tagged_layout_adds_four_slots_per_chunk(codec: CkksCodec) -> None:
    assert codec.values_per_chunk == codec.chunk_size - 4
    assert tagged_length(N_PARAMS, codec.chunk_size, 4) == N_PARAMS + 3 * 4
    assert tagged_length(4092, 4096, 4) == 4096  # one full chunk
    assert tagged_length(4093, 4096, 4) == 4093 + 8
    with pytest.raises(ValueError, match="tag_slots"):
        tagged_length(10, 4096, 4096)


def test_honest_aggregates_are_off_by_at_most_one_grid(
    codec: CkksCodec, secret_ctx: bytes, public_ctx: bytes
) -> None:
    """The bound the tolerance rests on, over different weights and magnitudes."""
    tags = AggregateTags(secret_ctx)
    worst = 0.0
    for seed, weights in enumerate(
        [{s: 1.0 for s in SITES}, {"hospital-a": 4000.0, "hospital-b": 7.0, "hospital-c": 300.0}]
    ):
        info = _info(seed + 1)
        chunks, expected = _aggregate(codec, public_ctx, info, weights, seed)
        out = codec.decrypt_aggregate(
            chunks,
            num_params=N_PARAMS,
            total_weight=sum(weights.values()),
            listed=ListedSum(info, SITES),
        )
        assert np.max(np.abs(out - expected)) < 1e-5
        ctx = ts.context_from(secret_ctx)
        for index, chunk in enumerate(chunks):
            values = codec._round(np.asarray(ts.ckks_vector_from(ctx, chunk).decrypt()), chunk)
            off = tags.deviation(values[:-4], values[-4:], info, index, SITES)
            worst = max(worst, off / codec.rounding_grid)
    assert worst <= 1.0 < TOLERANCE_GRIDS


def test_a_plaintext_added_anywhere_is_detected(codec: CkksCodec, public_ctx: bytes) -> None:
    info = _info()
    weights = {s: 100.0 for s in SITES}
    chunks, _ = _aggregate(codec, public_ctx, info, weights)
    ctx = ts.context_from(public_ctx)
    for index, slot, value in [(0, 0, 1.0), (1, 4091, -0.5), (2, 1815, 0.1), (0, 4093, 1.0)]:
        vec = ts.ckks_vector_from(ctx, chunks[index])
        plain = np.zeros(vec.size())
        plain[slot] = value
        forged = list(chunks)
        forged[index] = bytes((vec + plain.tolist()).serialize())
        with pytest.raises(AggregateIntegrityError) as refused:
            codec.decrypt_aggregate(
                forged, num_params=N_PARAMS, total_weight=300.0, listed=ListedSum(info, SITES)
            )
        assert refused.value.code == "aggregate.integrity_failed"
        assert f"chunk {index}" in str(refused.value)


def test_the_listed_sites_round_and_study_must_be_the_summed_ones(
    codec: CkksCodec, public_ctx: bytes
) -> None:
    info = _info(round_number=4)
    chunks, _ = _aggregate(codec, public_ctx, info, {s: 50.0 for s in SITES})
    wrong = [
        ListedSum(info, SITES[:2]),  # a contribution dropped from the list
        ListedSum(info, (*SITES, "hospital-d")),  # one listed that is not in the sum
        ListedSum(info, ("hospital-a", "hospital-b", "hospital-x")),  # one swapped
        ListedSum(_info(round_number=3), SITES),  # another round
        ListedSum(_info(round_number=4, study="study-2"), SITES),  # another study
    ]
    for listed in wrong:
        with pytest.raises(AggregateIntegrityError):
            codec.decrypt_aggregate(chunks, num_params=N_PARAMS, total_weight=150.0, listed=listed)
    # and nothing is decrypted without a list
    with pytest.raises(AggregateIntegrityError) as refused:
        codec.decrypt_aggregate(chunks, num_params=N_PARAMS, total_weight=150.0)
    assert refused.value.code == "aggregate.manifest_missing"


def test_a_doubled_aggregate_is_detected(codec: CkksCodec, public_ctx: bytes) -> None:
    """Adding the aggregate to itself keeps its scale but doubles the per-site terms."""
    info = _info()
    chunks, _ = _aggregate(codec, public_ctx, info, {s: 10.0 for s in SITES})
    ctx = ts.context_from(public_ctx)
    doubled = []
    for chunk in chunks:
        vec = ts.ckks_vector_from(ctx, chunk)
        doubled.append(bytes((vec + ts.ckks_vector_from(ctx, chunk)).serialize()))
    with pytest.raises(AggregateIntegrityError):
        codec.decrypt_aggregate(
            doubled, num_params=N_PARAMS, total_weight=60.0, listed=ListedSum(info, SITES)
        )


def test_the_tags_need_the_secret_key(secret_ctx: bytes) -> None:
    """Another study's key gives other coefficients: the server, which has no secret
    context, cannot compute them (and a site of another study cannot either)."""
    from site_node.crypto import generate_study_context

    info = _info()
    mine = AggregateTags(secret_ctx)
    other = AggregateTags(generate_study_context())
    assert not np.allclose(mine.coefficients(info, 0, 16), other.coefficients(info, 0, 16))
    assert not np.allclose(mine.site_term(info, 0, "a"), other.site_term(info, 0, "a"))
    a = mine.coefficients(info, 0, 4092)
    assert a.shape == (4, 4092)
    assert float(np.max(np.abs(a))) * 4092 <= 1.0  # |tag| <= max |value| + 1
