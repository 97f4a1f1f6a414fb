"""Blind aggregation on the server: public context only, bad replies dropped and recorded."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tenseal as ts

from consortium_server.federation.blind_sum import (
    BlindSumResult,
    NotEnoughSitesError,
    RejectReason,
    blind_sum,
    plain_sum,
)
from site_node.crypto import (
    CkksCodec,
    CkksParams,
    ContextError,
    EncodedUpdate,
    EncryptedUpdate,
    PlainCodec,
    RoundInfo,
    generate_study_context,
    load_context,
    public_context,
)

N_PARAMS = 20_000  # 5 chunks of 4096 slots, the last one partial
CHUNKS = 5
INFO = RoundInfo("study-1", "ab" * 32, 3, N_PARAMS)
WEIGHTS = {"site-a": 120.0, "site-b": 300.0, "site-c": 45.0, "site-d": 80.0}


@pytest.fixture(scope="module")
def secret_ctx() -> bytes:
    return generate_study_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: bytes) -> bytes:
    return public_context(secret_ctx)


@pytest.fixture(scope="module")
def codec(secret_ctx: bytes) -> CkksCodec:
    return CkksCodec(secret_ctx)


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {site: rng.normal(0, 0.05, N_PARAMS).astype(np.float32) for site in WEIGHTS}


@pytest.fixture(scope="module")
def replies(codec: CkksCodec, vectors: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
    return {
        site: codec.encode(vectors[site], weight=WEIGHTS[site], info=INFO).to_bytes_list()
        for site in WEIGHTS
    }


@pytest.fixture(scope="module")
def max_chunk(replies: dict[str, list[bytes]]) -> int:
    return max(len(c) for blobs in replies.values() for c in blobs[1:]) + 64


def fedavg(vectors: dict[str, np.ndarray], sites: list[str]) -> np.ndarray:
    total = sum(WEIGHTS[s] for s in sites)
    weighted = np.zeros(N_PARAMS)
    for s in sites:
        weighted += WEIGHTS[s] * vectors[s].astype(np.float64)
    return weighted / total


def run(public_ctx: bytes, updates: dict[str, list[bytes]], max_chunk: int) -> BlindSumResult:
    return blind_sum(
        public_ctx, updates, expected=INFO, expected_chunks=CHUNKS, max_chunk_bytes=max_chunk
    )


def decrypt(codec: CkksCodec, result: BlindSumResult) -> np.ndarray:
    """What a site does with the server's reply: check the wire format, decrypt, divide."""
    aggregate = EncodedUpdate.from_bytes_list(result.to_bytes_list())
    total = sum(WEIGHTS[s] for s in result.accepted)
    return codec.decrypt_aggregate(aggregate.chunks, num_params=N_PARAMS, total_weight=total)


def with_chunk(blobs: list[bytes], index: int, chunk: bytes, *, redigest: bool) -> list[bytes]:
    """Replace chunk ``index``; ``redigest`` rewrites the header as a malicious site would."""
    update = EncodedUpdate.from_bytes_list(blobs)
    chunks = list(update.chunks)
    chunks[index] = chunk
    if redigest:
        return EncryptedUpdate.build(INFO, chunk_size=4096, chunks=chunks).to_bytes_list()
    return [blobs[0], *chunks]


def test_aggregate_equals_plaintext_fedavg(
    codec: CkksCodec,
    public_ctx: bytes,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    max_chunk: int,
) -> None:
    sites = ["site-a", "site-b", "site-c"]
    result = run(public_ctx, {s: replies[s] for s in sites}, max_chunk)
    assert result.accepted == tuple(sites)
    assert result.rejected == ()
    assert len(result.chunks) == CHUNKS
    assert result.site_digests["site-a"] == hashlib.sha256(replies["site-a"][0]).hexdigest()
    got = decrypt(codec, result)
    assert np.max(np.abs(got - fedavg(vectors, sites))) < 1e-6


def test_server_context_cannot_decrypt_and_a_secret_one_is_refused(
    secret_ctx: bytes, public_ctx: bytes, replies: dict[str, list[bytes]], max_chunk: int
) -> None:
    result = run(public_ctx, replies, max_chunk)
    server_ctx = load_context(public_ctx, require_secret=False)
    assert server_ctx.is_private() is False
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server_ctx, result.chunks[0]).decrypt()
    with pytest.raises(ContextError) as exc:
        run(secret_ctx, replies, max_chunk)
    assert exc.value.code == "crypto.context_has_secret"


def _corruptions(
    replies: dict[str, list[bytes]], other_scale_chunk: bytes, short_chunk: bytes
) -> dict[str, tuple[list[bytes], RejectReason]]:
    d = replies["site-d"]
    flipped = bytearray(d[2])
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "flipped, stale digest": (
            with_chunk(d, 1, bytes(flipped), redigest=False),
            RejectReason.DIGEST_MISMATCH,
        ),
        "truncated": (with_chunk(d, 1, d[2][:1000], redigest=True), RejectReason.UNDECODABLE_CHUNK),
        "random bytes": (
            with_chunk(d, 1, os.urandom(len(d[2])), redigest=True),
            RejectReason.UNDECODABLE_CHUNK,
        ),
        "empty chunk": (with_chunk(d, 0, b"", redigest=True), RejectReason.UNDECODABLE_CHUNK),
        "other scale": (
            with_chunk(d, 0, other_scale_chunk, redigest=True),
            RejectReason.PARAMETER_MISMATCH,
        ),
        "short vector": (with_chunk(d, 0, short_chunk, redigest=True), RejectReason.SIZE_MISMATCH),
        "oversized": (
            with_chunk(d, 1, d[2] + bytes(4096), redigest=True),
            RejectReason.OVERSIZED_CHUNK,
        ),
        "missing chunk": (d[:-1], RejectReason.WRONG_CHUNK_COUNT),
        "extra chunk": ([*d, d[1]], RejectReason.WRONG_CHUNK_COUNT),
        "garbage header": ([b"\x00garbage", *d[1:]], RejectReason.MALFORMED_HEADER),
        "no blobs": ([], RejectReason.MALFORMED_HEADER),
        "other round": (
            EncryptedUpdate.build(
                RoundInfo(INFO.study_id, INFO.contract_hash, 2, N_PARAMS),
                chunk_size=4096,
                chunks=d[1:],
            ).to_bytes_list(),
            RejectReason.HEADER_MISMATCH,
        ),
    }


def test_each_bad_reply_is_dropped_with_a_record_and_the_rest_summed(
    codec: CkksCodec,
    public_ctx: bytes,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    max_chunk: int,
) -> None:
    other_ctx = load_context(
        generate_study_context(CkksParams(global_scale_bits=40)), require_secret=True
    )
    other_scale_chunk = ts.ckks_vector(other_ctx, np.zeros(4096)).serialize()
    short_chunk = codec.encode(np.zeros(10), weight=1, info=RoundInfo("s", "ab" * 32, 0, 10))
    good = ["site-a", "site-b", "site-c"]
    expected = fedavg(vectors, good)
    cases = _corruptions(replies, other_scale_chunk, short_chunk.chunks[0])
    for name, (bad, reason) in cases.items():
        result = run(public_ctx, {**{s: replies[s] for s in good}, "site-d": bad}, max_chunk)
        assert result.accepted == tuple(good), name
        (record,) = result.rejected
        assert (record.site_id, record.reason) == ("site-d", reason), name
        header = bad[0] if bad else b""
        assert record.digest == hashlib.sha256(header).hexdigest(), name
        assert record.as_record()["reason"] == reason.value
        assert np.max(np.abs(decrypt(codec, result) - expected)) < 1e-6, name


def test_a_reply_failing_at_a_later_chunk_is_subtracted_from_earlier_sums(
    codec: CkksCodec,
    public_ctx: bytes,
    replies: dict[str, list[bytes]],
    vectors: dict[str, np.ndarray],
    max_chunk: int,
) -> None:
    # site-a sorts first, so its chunks 0-3 were added before chunk 4 fails to decode.
    bad = with_chunk(replies["site-a"], 4, replies["site-a"][5][:500], redigest=True)
    others = ["site-b", "site-c", "site-d"]
    result = run(public_ctx, {"site-a": bad, **{s: replies[s] for s in others}}, max_chunk)
    assert result.accepted == tuple(others)
    (record,) = result.rejected
    assert (record.reason, record.chunk_index) == (RejectReason.UNDECODABLE_CHUNK, 4)
    assert np.max(np.abs(decrypt(codec, result) - fedavg(vectors, others))) < 1e-6


def test_not_enough_sites(
    public_ctx: bytes, replies: dict[str, list[bytes]], max_chunk: int
) -> None:
    bad = [b"{}", *replies["site-c"][1:]]
    with pytest.raises(NotEnoughSitesError) as exc:
        run(
            public_ctx,
            {"site-a": replies["site-a"], "site-b": replies["site-b"], "x": bad},
            1 << 20,
        )
    assert exc.value.code == "aggregation.not_enough_sites"
    assert exc.value.accepted == ("site-a", "site-b")
    assert [r.reason for r in exc.value.rejected] == [RejectReason.MALFORMED_HEADER]
    two = {"site-a": replies["site-a"], "site-b": replies["site-b"]}
    result = blind_sum(
        public_ctx,
        two,
        expected=INFO,
        expected_chunks=CHUNKS,
        max_chunk_bytes=max_chunk,
        min_sites=2,
    )
    assert result.accepted == ("site-a", "site-b")


def test_inconsistent_expectations_are_a_server_bug(
    public_ctx: bytes, replies: dict[str, list[bytes]]
) -> None:
    with pytest.raises(ValueError, match="expected_chunks"):
        blind_sum(public_ctx, replies, expected=INFO, expected_chunks=4, max_chunk_bytes=1 << 20)


def test_plain_sum_matches_fedavg_and_drops_bad_replies(vectors: dict[str, np.ndarray]) -> None:
    codec = PlainCodec(chunk_size=8192)
    replies = {
        s: codec.encode(vectors[s], weight=WEIGHTS[s], info=INFO).to_bytes_list() for s in WEIGHTS
    }
    update = EncodedUpdate.from_bytes_list(replies["site-d"])
    chunks = list(update.chunks)
    chunks[2] = np.full(len(chunks[2]) // 8, np.nan).tobytes()
    poisoned = type(update).build(INFO, chunk_size=8192, chunks=chunks).to_bytes_list()
    result = plain_sum(
        {**replies, "site-d": poisoned},
        expected=INFO,
        expected_chunks=3,
        max_chunk_bytes=8 * 8192,
        chunk_size=8192,
    )
    good = ["site-a", "site-b", "site-c"]
    assert result.accepted == tuple(good)
    assert [(r.reason, r.chunk_index) for r in result.rejected] == [(RejectReason.NON_FINITE, 2)]
    total = sum(WEIGHTS[s] for s in good)
    got = codec.decrypt_aggregate(result.chunks, num_params=N_PARAMS, total_weight=total)
    assert np.allclose(got, fedavg(vectors, good), rtol=0, atol=1e-12)
    with_ckks = plain_sum(
        {**replies, "site-d": [b"x"]},
        expected=INFO,
        expected_chunks=3,
        max_chunk_bytes=8 * 8192,
        chunk_size=8192,
    )
    assert with_ckks.rejected[0].reason == RejectReason.MALFORMED_HEADER
