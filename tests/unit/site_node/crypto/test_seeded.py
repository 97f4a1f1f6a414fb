"""ckks_seeded at a site: SEAL's bytes, the codec's round trip, guard, rounding and tags.

The server's side of the sum is ``consortium_server.federation.blind_sum`` (its own tests
cover every rejection); here it only produces the aggregates a site decrypts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from concord_protocol.wire.format import CKKS_TAG_SLOTS, RoundInfo
from concord_protocol.wire.seeded import AggregateChunk, Seed, SeededLayout, UploadChunk
from consortium_server.federation.blind_sum import blind_sum
from site_node.crypto import (
    CkksCodec,
    EncodedUpdate,
    SeededUpdate,
    UpdateRangeError,
    WireFormatError,
    expected_chunks,
    generate_study_context,
)
from site_node.crypto.codecs import ListedSum
from site_node.crypto.seal_format import (
    SUPPORTED_SEAL_VERSIONS,
    SealFile,
    build_seeded,
    parse_seeded,
    probe_seal_version,
)
from site_node.crypto.seeded import COMPLEX_PACKING_FACTOR, SeededCipher
from site_node.crypto.tags import AggregateIntegrityError

from .conftest import CONTRACT_HASH

N_PARAMS = 20_000  # three chunks: 8188 + 8188 + 3624 values, each with 4 tags


def _info(num_params: int = N_PARAMS, round_number: int = 1) -> RoundInfo:
    return RoundInfo("study-1", CONTRACT_HASH, round_number, num_params, CKKS_TAG_SLOTS)


def _sites(k: int) -> tuple[str, ...]:
    return tuple(f"hospital-{i:02d}" for i in range(k))


@pytest.fixture(scope="module")
def codec(secret_ctx: bytes) -> CkksCodec:
    return CkksCodec(secret_ctx, tag_slots=CKKS_TAG_SLOTS, scheme="ckks_seeded")


def _blind_sum(public: bytes, replies: dict[str, list[bytes]], info: RoundInfo) -> list[bytes]:
    result = blind_sum(
        public,
        replies,
        expected=info,
        expected_chunks=expected_chunks(info.num_values(8192), 8192),
        max_chunk_bytes=1 << 17,
        scheme="ckks_seeded",
    )
    assert result.rejected == ()
    return list(EncodedUpdate.from_bytes_list(result.to_bytes_list()).chunks)


def _round(
    codec: CkksCodec, public: bytes, sites: tuple[str, ...], seed: int = 0
) -> tuple[list[bytes], dict[str, float], np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {s: float(rng.integers(20, 5000)) for s in sites}
    vectors = {s: rng.normal(0, 0.05, N_PARAMS).astype(np.float32) for s in sites}
    info = _info()
    replies = {
        s: codec.encode(vectors[s], weight=weights[s], info=info, site_id=s).to_bytes_list()
        for s in sites
    }
    total = sum(weights.values())
    mean = np.asarray(sum(weights[s] * vectors[s].astype(np.float64) for s in sites) / total)
    return _blind_sum(public, replies, info), weights, mean


def _decrypt(codec: CkksCodec, chunks: list[bytes], weights: dict[str, float]) -> np.ndarray:
    return codec.decrypt_aggregate(
        chunks,
        num_params=N_PARAMS,
        total_weight=sum(weights.values()),
        listed=ListedSum(_info(), tuple(weights)),
    )


def _replace_seed(layout: SeededLayout, chunk: bytes, index: int, seed: Seed) -> bytes:
    aggregate = AggregateChunk.from_bytes(layout, chunk)
    seeds = list(aggregate.seeds)
    seeds[index] = seed
    return AggregateChunk(tuple(sorted(seeds, key=Seed.to_bytes)), aggregate.c0).to_bytes(layout)


def test_the_seal_layout_round_trips_through_seal(secret_ctx: bytes) -> None:
    """SEAL's own seeded bytes, parsed and rebuilt uncompressed, load to the same ciphertext:
    the test to rerun whenever TenSEAL (so SEAL's serialisation) changes."""
    ctx = ts.context_from(secret_ctx)
    seal, key = ctx.seal_context().data, ctx.secret_key().data
    layout = SeededLayout.from_context(ctx)
    file = SealFile()
    version = probe_seal_version(file)
    assert version in SUPPORTED_SEAL_VERSIONS
    plaintext = sealapi.Plaintext()
    values = np.random.default_rng(0).normal(size=8192).view(np.complex128)
    sealapi.CKKSEncoder(seal).encode(values.tolist(), 2.0**36, plaintext)
    saved = file.save(sealapi.Encryptor(seal, key).encrypt_symmetric(plaintext))
    upload = parse_seeded(saved, layout, version)
    assert upload.seed.prng_type in (1, 2)
    rebuilt = build_seeded(layout, upload.c0, upload.seed, version)
    assert len(rebuilt) < len(saved) + 200  # uncompressed, but zstd saves nothing here
    direct, ours = sealapi.Ciphertext(), sealapi.Ciphertext()
    file.load(direct, seal, saved)
    file.load(ours, seal, rebuilt)
    assert file.save(direct) == file.save(ours)
    assert parse_seeded(rebuilt, layout, version).seed == upload.seed
    with pytest.raises(WireFormatError):  # a full (unseeded) ciphertext is not an upload
        parse_seeded(file.save(direct), layout, version)
    with pytest.raises(WireFormatError):
        parse_seeded(saved[:-1], layout, version)
    with pytest.raises(WireFormatError):
        parse_seeded(rebuilt, layout, (version[0], version[1] + 1))


def test_the_seal_file_without_memfd_is_private_and_removed(secret_ctx: bytes) -> None:
    file = SealFile(use_memfd=False)
    assert not file.path.startswith("/proc/")
    directory = Path(file.path).parent
    assert os.stat(directory).st_mode & 0o077 == 0
    assert os.stat(file.path).st_mode & 0o077 == 0
    assert probe_seal_version(file) in SUPPORTED_SEAL_VERSIONS
    file.close()
    assert not directory.exists()


@pytest.mark.parametrize("num_sites", [3, 10])
def test_round_trip_matches_plaintext_fedavg(
    codec: CkksCodec, public_ctx: bytes, num_sites: int
) -> None:
    sites = _sites(num_sites)
    chunks, weights, mean = _round(codec, public_ctx, sites, seed=num_sites)
    layout = SeededLayout.from_context(ts.context_from(public_ctx))
    assert [len(c) for c in chunks] == [layout.aggregate_bytes(num_sites)] * 3
    got = _decrypt(codec, chunks, weights)
    assert np.max(np.abs(got - mean)) <= 1e-6


def test_update_and_aggregate_bytes_are_below_twice_float32(
    codec: CkksCodec, public_ctx: bytes
) -> None:
    num_params = 3 * codec.values_per_chunk  # whole chunks: the per-parameter cost
    info = _info(num_params)
    vector = np.random.default_rng(1).normal(0, 0.05, num_params)
    replies = {
        s: codec.encode(vector, weight=7, info=info, site_id=s).to_bytes_list() for s in _sites(10)
    }
    update = EncodedUpdate.from_bytes_list(replies["hospital-00"])
    assert isinstance(update, SeededUpdate)
    assert (update.header.chunk_size, update.header.format_version) == (8192, 3)
    layout = SeededLayout.from_context(ts.context_from(public_ctx))
    assert [len(c) for c in update.chunks] == [layout.upload_bytes] * 3
    assert update.nbytes / num_params <= 8
    aggregate = _blind_sum(public_ctx, replies, info)
    header = len(replies["hospital-00"][0])
    assert (header + sum(len(c) for c in aggregate)) / num_params <= 8


def test_decryption_is_rounded_after_a_keyed_dither_identically_at_every_site(
    secret_ctx: bytes, public_ctx: bytes, codec: CkksCodec
) -> None:
    chunks, weights, _ = _round(codec, public_ctx, _sites(3))
    other = CkksCodec(secret_ctx, tag_slots=CKKS_TAG_SLOTS, scheme="ckks_seeded")
    total = sum(weights.values())
    a, b = _decrypt(codec, chunks, weights), _decrypt(other, chunks, weights)
    assert np.array_equal(a, b)
    steps = a * total / codec.rounding_grid
    assert np.max(np.abs(steps - np.round(steps))) < 1e-6  # on the grid before dividing
    # the raw CKKS decryption is not: the rounding is what removes its exact error
    raw, _ = SeededCipher(ts.context_from(secret_ctx)).decrypt(chunks[0])
    raw_steps = raw[: codec.values_per_chunk] / codec.rounding_grid
    assert np.max(np.abs(raw_steps - np.round(raw_steps))) > 0.01


def test_a_flipped_seed_bit_is_caught_by_the_tags(codec: CkksCodec, public_ctx: bytes) -> None:
    chunks, weights, mean = _round(codec, public_ctx, _sites(3))
    layout = SeededLayout.from_context(ts.context_from(public_ctx))
    seed = AggregateChunk.from_bytes(layout, chunks[1]).seeds[2]
    flipped = bytearray(seed.value)
    flipped[17] ^= 0x04
    bad = [
        chunks[0],
        _replace_seed(layout, chunks[1], 2, Seed(seed.prng_type, bytes(flipped))),
        chunks[2],
    ]
    with pytest.raises(AggregateIntegrityError) as exc:
        _decrypt(codec, bad, weights)
    assert exc.value.code == "aggregate.integrity_failed"
    assert "chunk 1" in str(exc.value)
    # the same aggregate unchanged decrypts: the failure is the flipped bit's
    assert np.max(np.abs(_decrypt(codec, chunks, weights) - mean)) <= 1e-6


def test_a_dropped_seed_or_an_extra_one_is_refused(codec: CkksCodec, public_ctx: bytes) -> None:
    chunks, weights, _ = _round(codec, public_ctx, _sites(4))
    layout = SeededLayout.from_context(ts.context_from(public_ctx))
    aggregate = AggregateChunk.from_bytes(layout, chunks[0])
    dropped = AggregateChunk(aggregate.seeds[:3], aggregate.c0).to_bytes(layout)
    with pytest.raises(AggregateIntegrityError, match="sums 3 uploads"):
        _decrypt(codec, [dropped, *chunks[1:]], weights)
    # listing only three sites: the fourth seed has no contribution behind it
    three = dict(list(weights.items())[:3])
    with pytest.raises(AggregateIntegrityError, match="sums 4 uploads"):
        _decrypt(codec, chunks, three)


def test_a_chunk_from_another_study_key_is_caught_by_the_tags(
    codec: CkksCodec, public_ctx: bytes
) -> None:
    """Same parameters, other key: the server cannot tell (same parms_id), the tags can."""
    intruder = CkksCodec(generate_study_context(), tag_slots=CKKS_TAG_SLOTS, scheme="ckks_seeded")
    sites = _sites(3)
    info = _info()
    rng = np.random.default_rng(9)
    vectors = {s: rng.normal(0, 0.05, N_PARAMS) for s in sites}
    replies = {
        s: (intruder if s == sites[1] else codec)
        .encode(vectors[s], weight=10, info=info, site_id=s)
        .to_bytes_list()
        for s in sites
    }
    chunks = _blind_sum(public_ctx, replies, info)  # accepted: nothing for the server to see
    with pytest.raises(AggregateIntegrityError):
        _decrypt(codec, chunks, dict.fromkeys(sites, 10.0))


def test_a_chunk_of_the_other_scheme_is_refused(secret_ctx: bytes, codec: CkksCodec) -> None:
    legacy = CkksCodec(secret_ctx)
    seeded = CkksCodec(secret_ctx, scheme="ckks_seeded")
    info = RoundInfo("study-1", CONTRACT_HASH, 1, 100)  # one chunk in either scheme
    seeded_chunk = seeded.encode(np.ones(100), weight=1, info=info).chunks[0]
    legacy_chunk = legacy.encode(np.ones(100), weight=1, info=info).chunks[0]
    for reader, chunk in ((legacy, seeded_chunk), (seeded, legacy_chunk)):
        with pytest.raises(WireFormatError) as exc:
            reader.decrypt_aggregate([chunk], num_params=100, total_weight=1)
        assert exc.value.code == "update.undecodable_chunk"


def test_undecodable_aggregates_are_refused_before_decrypting(
    codec: CkksCodec, public_ctx: bytes
) -> None:
    chunks, weights, _ = _round(codec, public_ctx, _sites(3))
    layout = SeededLayout.from_context(ts.context_from(public_ctx))
    upload = UploadChunk(
        AggregateChunk.from_bytes(layout, chunks[0]).seeds[0], np.zeros(8192, np.uint64)
    )
    for bad, code in (
        (chunks[0][:-1], "update.undecodable_chunk"),
        (upload.to_bytes(layout), "update.undecodable_chunk"),  # an upload is not an aggregate
        (chunks[0][:5] + bytes(32) + chunks[0][37:], "update.parameter_mismatch"),
    ):
        with pytest.raises(WireFormatError) as exc:
            _decrypt(codec, [bad, *chunks[1:]], weights)
        assert exc.value.code == code


def test_the_overflow_guard_is_enforced_with_the_complex_packing_factor(
    secret_ctx: bytes, codec: CkksCodec
) -> None:
    assert codec.per_site_limit == CkksCodec(secret_ctx).per_site_limit / COMPLEX_PACKING_FACTOR
    assert codec.per_site_limit == 2.0**22 / math.sqrt(2) / 32
    ones = np.ones(N_PARAMS)
    codec.encode(ones, weight=codec.per_site_limit, info=_info(), site_id="hospital-00")
    with pytest.raises(UpdateRangeError) as exc:
        codec.encode(ones, weight=1.01 * codec.per_site_limit, info=_info(), site_id="h")
    assert exc.value.code == "update.out_of_range"


def test_complex_packing_grows_coefficients_by_sqrt_2(secret_ctx: bytes) -> None:
    """Why the guard is divided by sqrt(2): with two reals per slot this pattern encodes to a
    coefficient of sqrt(2) max|x| * scale. A sum at the seeded guard's bound decrypts; a sum
    of 1.5 times the ckks bound, which one value per slot still decrypts, wraps around."""
    cipher = SeededCipher(ts.context_from(secret_ctx))
    layout = cipher.layout
    worst = np.tile([1.0, -1.0, -1.0, -1.0], 2048)

    def blind_total(part: np.ndarray, copies: int) -> np.ndarray:
        uploads = [UploadChunk.from_bytes(layout, cipher.encrypt(part)) for _ in range(copies)]
        values, summed = cipher.decrypt(AggregateChunk.sum_of(layout, uploads).to_bytes(layout))
        assert summed == copies
        return values

    bound = 2.0**22 / COMPLEX_PACKING_FACTOR
    assert np.max(np.abs(blind_total(worst * bound / 2, 2) - worst * bound)) < 1e-4
    wrapped = blind_total(worst * 2.0**21, 3)
    assert np.max(np.abs(wrapped - worst * 1.5 * 2.0**22)) > 1.0
    ctx = ts.context_from(secret_ctx)
    one_per_slot = [ts.ckks_vector(ctx, np.full(4096, 2.0**21)) for _ in range(3)]
    total = one_per_slot[0] + one_per_slot[1] + one_per_slot[2]
    assert np.allclose(total.decrypt(), 1.5 * 2.0**22, rtol=1e-9)


def test_the_cipher_refuses_what_it_cannot_encrypt(secret_ctx: bytes, public_ctx: bytes) -> None:
    cipher = SeededCipher(ts.context_from(secret_ctx))
    for bad in (np.zeros(0), np.zeros(8193), np.zeros((2, 4))):
        with pytest.raises(ValueError, match="chunk holds"):
            cipher.encrypt(bad)
    with pytest.raises(ValueError, match="secret"):
        SeededCipher(ts.context_from(public_ctx))
    first, second = (
        UploadChunk.from_bytes(cipher.layout, cipher.encrypt(np.ones(5))) for _ in "ab"
    )
    assert first.seed != second.seed  # a fresh random seed per ciphertext
