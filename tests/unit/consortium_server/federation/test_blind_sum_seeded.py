"""Blind aggregation of ckks_seeded replies: numpy sums of c0, every bad reply dropped.

The server holds the public context only; the sites' codec (with integrity tags, as a
study's ClientApp uses it) encodes the replies and checks the decrypted aggregates.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tenseal as ts

from concord_protocol.wire.format import CKKS_TAG_SLOTS
from concord_protocol.wire.seeded import AggregateChunk, Seed, SeededLayout, UploadChunk
from consortium_server.federation.blind_sum import (
    BlindSumResult,
    NotEnoughSitesError,
    RejectReason,
    blind_sum,
)
from site_node.crypto import (
    CkksCodec,
    CkksParams,
    ContextError,
    EncodedUpdate,
    RoundInfo,
    SeededUpdate,
    generate_study_context,
    public_context,
)
from site_node.crypto.codecs import ListedSum

N_PARAMS = 30_000  # four chunks of 8188 parameters + 4 tags, the last one partial
CHUNKS = 4
INFO = RoundInfo("study-1", "ab" * 32, 3, N_PARAMS, CKKS_TAG_SLOTS)
SITES = tuple(f"site-{c}" for c in "abcdefghij")  # ten sites


@pytest.fixture(scope="module")
def secret_ctx() -> bytes:
    return generate_study_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: bytes) -> bytes:
    return public_context(secret_ctx)


@pytest.fixture(scope="module")
def layout(public_ctx: bytes) -> SeededLayout:
    return SeededLayout.from_context(ts.context_from(public_ctx))


@pytest.fixture(scope="module")
def codec(secret_ctx: bytes) -> CkksCodec:
    return CkksCodec(secret_ctx, tag_slots=CKKS_TAG_SLOTS, scheme="ckks_seeded")


@pytest.fixture(scope="module")
def weights() -> dict[str, float]:
    rng = np.random.default_rng(11)
    return {s: float(rng.integers(10, 5000)) for s in SITES}


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    return {s: rng.normal(0, 0.05, N_PARAMS).astype(np.float32) for s in SITES}


@pytest.fixture(scope="module")
def replies(
    codec: CkksCodec, vectors: dict[str, np.ndarray], weights: dict[str, float]
) -> dict[str, list[bytes]]:
    return {
        s: codec.encode(vectors[s], weight=weights[s], info=INFO, site_id=s).to_bytes_list()
        for s in SITES
    }


def run(public: bytes, updates: dict[str, list[bytes]], *, min_sites: int = 3) -> BlindSumResult:
    return blind_sum(
        public,
        updates,
        expected=INFO,
        expected_chunks=CHUNKS,
        max_chunk_bytes=1 << 17,
        min_sites=min_sites,
        scheme="ckks_seeded",
    )


def fedavg(
    vectors: dict[str, np.ndarray], weights: dict[str, float], sites: list[str]
) -> np.ndarray:
    total = sum(weights[s] for s in sites)
    return np.asarray(sum(weights[s] * vectors[s].astype(np.float64) for s in sites) / total)


def decrypt(codec: CkksCodec, result: BlindSumResult, weights: dict[str, float]) -> np.ndarray:
    """What a site does with the server's reply: parse the wire format, decrypt, check tags."""
    aggregate = EncodedUpdate.from_bytes_list(result.to_bytes_list())
    return codec.decrypt_aggregate(
        aggregate.chunks,
        num_params=N_PARAMS,
        total_weight=sum(weights[s] for s in result.accepted),
        listed=ListedSum(INFO, result.accepted),
    )


def with_chunk(blobs: list[bytes], index: int, chunk: bytes) -> list[bytes]:
    """Replace chunk ``index`` and rewrite the header as a malicious site would."""
    chunks = list(EncodedUpdate.from_bytes_list(blobs).chunks)
    chunks[index] = chunk
    return SeededUpdate.build(INFO, chunk_size=8192, chunks=chunks).to_bytes_list()


@pytest.mark.parametrize("num_sites", [3, 10])
def test_the_blind_sum_is_plaintext_fedavg(
    codec: CkksCodec,
    public_ctx: bytes,
    layout: SeededLayout,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    weights: dict[str, float],
    num_sites: int,
) -> None:
    sites = list(SITES[:num_sites])
    result = run(public_ctx, {s: replies[s] for s in sites})
    assert result.accepted == tuple(sites)
    assert result.rejected == ()
    assert isinstance(result.aggregate, SeededUpdate)
    assert result.aggregate.header.format_version == 3
    assert [len(c) for c in result.chunks] == [layout.aggregate_bytes(num_sites)] * CHUNKS
    assert result.site_digests["site-a"] == hashlib.sha256(replies["site-a"][0]).hexdigest()
    seeds = AggregateChunk.from_bytes(layout, result.chunks[2]).seeds
    listed = (UploadChunk.from_bytes(layout, replies[s][3]).seed for s in sites)
    assert seeds == tuple(sorted(listed, key=Seed.to_bytes))  # canonical order
    got = decrypt(codec, result, weights)
    assert np.max(np.abs(got - fedavg(vectors, weights, sites))) <= 1e-6
    # Aggregate bytes per parameter: within twice float32 (whole chunks cost the most).
    assert layout.aggregate_bytes(num_sites) / codec.values_per_chunk <= 8


def test_the_server_needs_no_secret_and_refuses_one(
    secret_ctx: bytes, replies: dict[str, list[bytes]]
) -> None:
    with pytest.raises(ContextError) as exc:
        run(secret_ctx, {s: replies[s] for s in SITES[:3]})
    assert exc.value.code == "crypto.context_has_secret"


def _unreduced(layout: SeededLayout, chunk: bytes) -> bytes:
    upload = UploadChunk.from_bytes(layout, chunk)
    raw = bytearray(upload.to_bytes(layout))
    offset = layout.upload_bytes - layout.packed_bytes
    raw[offset : offset + 8] = b"\xff" * 8  # the first coefficient becomes 2**60 - 1 >= q
    return bytes(raw)


def _corruptions(
    public_ctx: bytes, layout: SeededLayout, replies: dict[str, list[bytes]]
) -> dict[str, tuple[list[bytes], RejectReason, int | None]]:
    """Broken versions of site-d's reply, the reason and the chunk each must be dropped for."""
    d = replies["site-d"]
    flipped = bytearray(d[2])
    flipped[len(flipped) // 2] ^= 0x01
    other = SeededLayout.from_context(
        ts.context_from(
            public_context(generate_study_context(CkksParams(coeff_mod_bit_sizes=(60, 50))))
        )
    )
    assert other.parms_id != layout.parms_id
    # Only the parms id of those other parameters: the coefficients still fit this prime.
    other_parms = SeededLayout(layout.poly_modulus_degree, layout.primes, other.parms_id, 2.0**36)
    other_scale = SeededLayout(layout.poly_modulus_degree, layout.primes, layout.parms_id, 2.0**40)
    chunk_1 = UploadChunk.from_bytes(layout, d[2])
    return {
        "truncated": (with_chunk(d, 1, d[2][:-1]), RejectReason.UNDECODABLE_CHUNK, 1),
        "extended": (with_chunk(d, 1, d[2] + b"\x00"), RejectReason.UNDECODABLE_CHUNK, 1),
        "coefficient >= q": (
            with_chunk(d, 1, _unreduced(layout, d[2])),
            RejectReason.UNDECODABLE_CHUNK,
            1,
        ),
        "wrong magic": (with_chunk(d, 0, b"CKSA" + d[1][4:]), RejectReason.UNDECODABLE_CHUNK, 0),
        "wrong version": (
            with_chunk(d, 0, d[1][:4] + b"\x02" + d[1][5:]),
            RejectReason.UNDECODABLE_CHUNK,
            0,
        ),
        "unknown prng": (
            with_chunk(d, 0, d[1][:45] + b"\x07" + d[1][46:]),
            RejectReason.UNDECODABLE_CHUNK,
            0,
        ),
        "wrong parms_id": (
            with_chunk(d, 1, chunk_1.to_bytes(other_parms)),
            RejectReason.PARAMETER_MISMATCH,
            1,
        ),
        "wrong scale": (
            with_chunk(d, 1, chunk_1.to_bytes(other_scale)),
            RejectReason.PARAMETER_MISMATCH,
            1,
        ),
        "flipped, stale digest": (
            [d[0], d[1], bytes(flipped), *d[3:]],
            RejectReason.DIGEST_MISMATCH,
            1,
        ),
        "a legacy ckks header": (
            [replies["site-d"][0].replace(b'"ckks_seeded"', b'"ckks"'), *d[1:]],
            RejectReason.MALFORMED_HEADER,  # version 3 is not the ckks scheme's
            None,
        ),
        "own seed reused": (with_chunk(d, 2, d[2]), RejectReason.REPEATED_SEED, 1),
        "missing chunk": (d[:-1], RejectReason.WRONG_CHUNK_COUNT, None),
    }


def test_each_bad_reply_is_dropped_with_a_record_and_the_rest_summed(
    codec: CkksCodec,
    public_ctx: bytes,
    layout: SeededLayout,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    weights: dict[str, float],
) -> None:
    good = ["site-a", "site-b", "site-c"]
    expected = fedavg(vectors, weights, good)
    for name, (bad, reason, chunk) in _corruptions(public_ctx, layout, replies).items():
        result = run(public_ctx, {**{s: replies[s] for s in good}, "site-d": bad})
        assert result.accepted == tuple(good), name
        (record,) = result.rejected
        assert (record.site_id, record.reason, record.chunk_index) == ("site-d", reason, chunk), (
            name
        )
        assert record.digest == hashlib.sha256(bad[0]).hexdigest(), name
        assert np.max(np.abs(decrypt(codec, result, weights) - expected)) <= 1e-6, name


def test_a_replayed_upload_drops_both_replies_carrying_its_seeds(
    codec: CkksCodec,
    public_ctx: bytes,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    weights: dict[str, float],
) -> None:
    # site-e sends site-a's chunk 2 as its own (its header re-made to match): the server
    # cannot tell which of the two is the copy, so neither is summed.
    replayed = with_chunk(replies["site-e"], 2, replies["site-a"][3])
    sites = ["site-a", "site-b", "site-c", "site-d"]
    result = run(public_ctx, {**{s: replies[s] for s in sites}, "site-e": replayed})
    assert result.accepted == ("site-b", "site-c", "site-d")
    records = {r.site_id: r for r in result.rejected}
    assert set(records) == {"site-a", "site-e"}
    for site_id, other in (("site-a", "site-e"), ("site-e", "site-a")):
        assert (records[site_id].reason, records[site_id].chunk_index) == ("repeated_seed", 2)
        assert f"{other} chunk 2" in records[site_id].detail
    got = decrypt(codec, result, weights)
    assert np.max(np.abs(got - fedavg(vectors, weights, list(result.accepted)))) <= 1e-6


def test_a_reply_failing_at_a_later_chunk_is_subtracted_exactly(
    codec: CkksCodec,
    public_ctx: bytes,
    layout: SeededLayout,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    weights: dict[str, float],
) -> None:
    # site-a sorts first: its chunks 0-2 are summed before chunk 3 turns out unreduced.
    bad = with_chunk(replies["site-a"], 3, _unreduced(layout, replies["site-a"][4]))
    others = ["site-b", "site-c", "site-d"]
    result = run(public_ctx, {"site-a": bad, **{s: replies[s] for s in others}})
    assert result.accepted == tuple(others)
    (record,) = result.rejected
    assert (record.reason, record.chunk_index) == (RejectReason.UNDECODABLE_CHUNK, 3)
    clean = run(public_ctx, {s: replies[s] for s in others})
    assert result.chunks == clean.chunks  # bit for bit: modular subtraction is exact
    assert (
        np.max(np.abs(decrypt(codec, result, weights) - fedavg(vectors, weights, others))) <= 1e-6
    )


def test_not_enough_sites_even_when_the_last_one_fails_late(
    public_ctx: bytes, layout: SeededLayout, replies: dict[str, list[bytes]]
) -> None:
    bad = with_chunk(replies["site-a"], 3, _unreduced(layout, replies["site-a"][4]))
    with pytest.raises(NotEnoughSitesError) as exc:
        run(public_ctx, {"site-a": bad}, min_sites=1)
    assert exc.value.accepted == ()
    assert [r.reason for r in exc.value.rejected] == [RejectReason.UNDECODABLE_CHUNK]
    with pytest.raises(NotEnoughSitesError) as exc:
        run(public_ctx, {s: replies[s] for s in SITES[:2]})
    assert exc.value.accepted == ("site-a", "site-b")


def test_a_legacy_ckks_reply_is_refused_by_a_seeded_study(
    secret_ctx: bytes, public_ctx: bytes, replies: dict[str, list[bytes]]
) -> None:
    legacy = CkksCodec(secret_ctx, tag_slots=CKKS_TAG_SLOTS)
    old = legacy.encode(np.zeros(N_PARAMS), weight=1, info=INFO, site_id="site-d").to_bytes_list()
    result = run(public_ctx, {**{s: replies[s] for s in SITES[:3]}, "site-d": old})
    (record,) = result.rejected
    assert record.reason == RejectReason.HEADER_MISMATCH
    assert "scheme 'ckks'" in record.detail
