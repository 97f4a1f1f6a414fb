"""The ckks_seeded chunk format: sizes, canonical bytes, strict parsing, the modular sum.

These tests need no secret key and no SEAL object beyond reading a context's parameters:
the format and the sum are what the server computes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from pydantic import ValidationError

from concord_protocol.errors import WireFormatError
from concord_protocol.wire.format import (
    CKKS_TAG_SLOTS,
    FORMAT_VERSIONS,
    WIRE_FORMAT_VERSION,
    EncodedUpdate,
    EncryptedUpdate,
    RoundInfo,
    SeededUpdate,
    UpdateHeader,
)
from concord_protocol.wire.seeded import (
    AGGREGATE_MAGIC,
    SEEDED_CHUNK_VERSION,
    UPLOAD_MAGIC,
    AggregateChunk,
    Seed,
    SeededLayout,
    UploadChunk,
    read_upload_seed,
)
from site_node.crypto import CkksParams, generate_study_context, public_context

_PREFIX = 4 + 1 + 32 + 8  # magic, version, parms_id, scale


@pytest.fixture(scope="module")
def layout() -> SeededLayout:
    return SeededLayout.from_context(ts.context_from(public_context(generate_study_context())))


def _upload(layout: SeededLayout, rng: np.random.Generator) -> UploadChunk:
    c0 = rng.integers(0, layout.moduli, dtype=np.uint64)
    return UploadChunk(Seed(1, os.urandom(64)), c0)


def _to_int(c: np.ndarray) -> list[int]:
    return [int(x) for x in c]


def test_the_layout_is_the_contexts_and_the_same_on_both_sides() -> None:
    secret = generate_study_context()
    site = SeededLayout.from_context(ts.context_from(secret))
    server = SeededLayout.from_context(ts.context_from(public_context(secret)))
    assert site == server
    assert (server.poly_modulus_degree, server.prime_bits, server.scale) == (8192, (60,), 2.0**36)
    assert server.values_per_chunk == 8192  # two reals per slot
    # The parms id names the parameters, not the key: another study's key has the same one.
    assert SeededLayout.from_context(ts.context_from(generate_study_context())) == server


def test_bytes_per_parameter_are_below_twice_float32(layout: SeededLayout) -> None:
    params_per_chunk = layout.values_per_chunk - CKKS_TAG_SLOTS
    assert layout.packed_bytes == 8192 * 60 // 8
    assert layout.upload_bytes == _PREFIX + 65 + 61_440
    assert layout.aggregate_bytes(3) == _PREFIX + 2 + 3 * 65 + 61_440
    assert layout.upload_bytes / params_per_chunk < 7.52
    assert layout.aggregate_bytes(3) / params_per_chunk < 7.55
    assert layout.aggregate_bytes(10) / params_per_chunk < 7.60
    assert max(layout.upload_bytes, layout.aggregate_bytes(10)) / params_per_chunk <= 8


def test_packing_is_exact_canonical_and_refuses_unreduced_coefficients() -> None:
    # Two data primes (40 and 40 bits) and a 60-bit special one.
    layout = SeededLayout.from_context(
        ts.context_from(generate_study_context(CkksParams(coeff_mod_bit_sizes=(40, 40, 60))))
    )
    assert layout.prime_bits == (40, 40)
    rng = np.random.default_rng(3)
    c = rng.integers(0, layout.moduli, dtype=np.uint64)
    c[0], c[8192] = layout.primes[0] - 1, layout.primes[1] - 1  # the largest reduced values
    packed = layout.pack(c)
    assert len(packed) == layout.packed_bytes == 2 * 8192 * 40 // 8
    assert np.array_equal(layout.unpack(packed), c)
    with pytest.raises(ValueError, match="reduced"):
        layout.pack(layout.moduli.copy())
    # q itself fits in 40 bits, so it can be written; it must not be read.
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")
    q0 = np.unpackbits(np.array([layout.primes[1]], "<u8").view(np.uint8), bitorder="little")
    bits[8192 * 40 : 8192 * 40 + 40] = q0[:40]
    with pytest.raises(WireFormatError) as exc:
        layout.unpack(np.packbits(bits, bitorder="little").tobytes())
    assert exc.value.code == "update.undecodable_chunk"


def test_the_60_bit_word_path_writes_and_reads_the_generic_bit_stream(
    layout: SeededLayout,
) -> None:
    """The default primes' 60-bit coefficients are packed two to 15 bytes with word
    arithmetic (the server's aggregation speed); the bytes must be the generic little-endian
    bit stream's, both ways, and q must still be refused."""
    assert set(layout.prime_bits) == {60}
    rng = np.random.default_rng(11)
    c = rng.integers(0, layout.moduli, dtype=np.uint64)
    c[0], c[-1] = layout.primes[0] - 1, layout.primes[-1] - 1
    n = layout.poly_modulus_degree
    generic = b"".join(
        np.packbits(
            np.unpackbits(
                c[j * n : (j + 1) * n].astype("<u8").view(np.uint8).reshape(n, 8),
                axis=1,
                bitorder="little",
            )[:, :60],
            bitorder="little",
        ).tobytes()
        for j in range(len(layout.primes))
    )
    assert layout.pack(c) == generic
    assert np.array_equal(layout.unpack(generic), c)
    # q written as coefficient 1: an odd one, split across two words.
    bits = np.unpackbits(np.frombuffer(generic, np.uint8), bitorder="little")
    q = np.unpackbits(np.array([layout.primes[0]], "<u8").view(np.uint8), bitorder="little")
    bits[60:120] = q[:60]
    with pytest.raises(WireFormatError) as exc:
        layout.unpack(np.packbits(bits, bitorder="little").tobytes())
    assert exc.value.code == "update.undecodable_chunk"


def test_upload_chunk_round_trip_and_layout(layout: SeededLayout) -> None:
    upload = _upload(layout, np.random.default_rng(1))
    data = upload.to_bytes(layout)
    assert len(data) == layout.upload_bytes
    assert data[:4] == UPLOAD_MAGIC
    assert data[4] == SEEDED_CHUNK_VERSION
    assert data[5:37] == layout.parms_id
    assert struct.unpack_from("<d", data, 37)[0] == 2.0**36
    assert data[45] == 1
    assert data[46:110] == upload.seed.value
    back = UploadChunk.from_bytes(layout, data)
    assert back.seed == upload.seed
    assert np.array_equal(back.c0, upload.c0)
    assert back.to_bytes(layout) == data
    assert read_upload_seed(layout, data) == upload.seed


def _bad_uploads(layout: SeededLayout, data: bytes) -> dict[str, tuple[bytes, str]]:
    other_scale = SeededLayout(layout.poly_modulus_degree, layout.primes, layout.parms_id, 2.0**40)
    other_parms = SeededLayout(layout.poly_modulus_degree, layout.primes, bytes(32), layout.scale)
    unreduced = bytearray(data)
    unreduced[_PREFIX + 65 : _PREFIX + 65 + 8] = b"\xff" * 8  # coefficient 0 is 2**60 - 1 >= q
    undecodable, parameters = "update.undecodable_chunk", "update.parameter_mismatch"
    return {
        "truncated": (data[:-1], undecodable),
        "extended": (data + b"\x00", undecodable),
        "empty": (b"", undecodable),
        "aggregate magic": (AGGREGATE_MAGIC + data[4:], undecodable),
        "other version": (data[:4] + bytes([SEEDED_CHUNK_VERSION + 1]) + data[5:], undecodable),
        "unknown prng": (data[:45] + b"\x00" + data[46:], undecodable),
        "coefficient >= q": (bytes(unreduced), undecodable),
        "other scale": (UploadChunk.from_bytes(layout, data).to_bytes(other_scale), parameters),
        "other parms_id": (UploadChunk.from_bytes(layout, data).to_bytes(other_parms), parameters),
    }


def test_every_malformed_upload_chunk_is_refused(layout: SeededLayout) -> None:
    data = _upload(layout, np.random.default_rng(2)).to_bytes(layout)
    for name, (bad, code) in _bad_uploads(layout, data).items():
        with pytest.raises(WireFormatError) as exc:
            UploadChunk.from_bytes(layout, bad)
        assert exc.value.code == code, name


def test_the_sum_is_modular_exact_and_reversible(layout: SeededLayout) -> None:
    rng = np.random.default_rng(4)
    uploads = [_upload(layout, rng) for _ in range(10)]
    total = AggregateChunk.sum_of(layout, uploads)
    assert total.seeds == tuple(sorted((u.seed for u in uploads), key=Seed.to_bytes))
    q = layout.primes[0]
    expected = [sum(col) % q for col in zip(*(_to_int(u.c0) for u in uploads), strict=True)]
    assert _to_int(total.c0) == expected
    # Taking one back out restores the sum of the others exactly (the server's drop path).
    without = total.subtract(layout, AggregateChunk.of(uploads[3]))
    rest = AggregateChunk.sum_of(layout, uploads[:3] + uploads[4:])
    assert without.seeds == rest.seeds
    assert np.array_equal(without.c0, rest.c0)
    with pytest.raises(ValueError, match="not in the sum"):
        without.subtract(layout, AggregateChunk.of(uploads[3]))


def test_aggregate_chunk_round_trip_and_strict_parsing(layout: SeededLayout) -> None:
    rng = np.random.default_rng(5)
    total = AggregateChunk.sum_of(layout, [_upload(layout, rng) for _ in range(3)])
    data = total.to_bytes(layout)
    assert len(data) == layout.aggregate_bytes(3)
    assert data[:4] == AGGREGATE_MAGIC
    assert data[45:47] == b"\x03\x00"
    back = AggregateChunk.from_bytes(layout, data)
    assert back.seeds == total.seeds
    assert back.to_bytes(layout) == data
    count_4 = data[:45] + b"\x04\x00" + data[47:]
    count_0 = data[:45] + b"\x00\x00" + data[47:]
    repeated = data[: 47 + 65] + data[47 : 47 + 65] + data[47 + 130 :]
    for bad in (data[:-1], data + b"\x00", count_4, count_0, repeated, UPLOAD_MAGIC + data[4:]):
        with pytest.raises(WireFormatError) as exc:
            AggregateChunk.from_bytes(layout, bad)
        assert exc.value.code == "update.undecodable_chunk"
    other_parms = SeededLayout(layout.poly_modulus_degree, layout.primes, bytes(32), layout.scale)
    with pytest.raises(WireFormatError) as exc:
        AggregateChunk.from_bytes(other_parms, data)
    assert exc.value.code == "update.parameter_mismatch"


def test_an_aggregate_refuses_a_repeated_seed(layout: SeededLayout) -> None:
    upload = _upload(layout, np.random.default_rng(6))
    with pytest.raises(WireFormatError, match="seed twice"):
        AggregateChunk.of(upload).add(layout, AggregateChunk.of(upload))
    with pytest.raises(WireFormatError):
        Seed(0, bytes(64))
    with pytest.raises(WireFormatError):
        Seed(1, bytes(63))


def test_the_header_version_follows_the_scheme() -> None:
    assert WIRE_FORMAT_VERSION == 3
    assert dict(FORMAT_VERSIONS) == {"ckks": 2, "plain": 2, "ckks_seeded": 3}
    info = RoundInfo("s", "ab" * 32, 1, 10, CKKS_TAG_SLOTS)
    seeded = SeededUpdate.build(info, chunk_size=8192, chunks=[b"x"])
    legacy = EncryptedUpdate.build(info, chunk_size=4096, chunks=[b"x"])
    assert (seeded.header.format_version, seeded.header.scheme) == (3, "ckks_seeded")
    assert (legacy.header.format_version, legacy.header.scheme) == (2, "ckks")
    parsed = EncodedUpdate.from_bytes_list(seeded.to_bytes_list())
    assert type(parsed) is SeededUpdate
    assert isinstance(parsed, EncryptedUpdate)
    assert type(EncodedUpdate.from_bytes_list(legacy.to_bytes_list())) is EncryptedUpdate
    assert b'"format_version":3' in seeded.header.to_bytes()
    fields = {
        "study_id": "s",
        "contract_hash": "ab" * 32,
        "round_number": 1,
        "num_params": 10,
        "chunk_size": 8192,
        "num_chunks": 1,
        "chunk_digests": (hashlib.sha256(b"x").hexdigest(),),
    }
    for version, scheme in ((2, "ckks_seeded"), (3, "ckks"), (3, "plain")):
        with pytest.raises(ValidationError, match="format version"):
            UpdateHeader(format_version=version, scheme=scheme, **fields)
    downgraded = seeded.header.to_bytes().replace(b'"format_version":3', b'"format_version":2')
    with pytest.raises(WireFormatError) as exc:
        UpdateHeader.from_bytes(downgraded)
    assert exc.value.code == "update.malformed_header"


def test_the_layout_reads_a_context_in_a_process_that_imported_only_the_server_side(
    tmp_path: Path,
) -> None:
    # The ServerApp imports no site code: SEAL's pybind11 types must be registered by the
    # shared module itself (found by the demo on real processes).
    from site_node.crypto.ckks import generate_study_context, public_context

    path = tmp_path / "public.ctx"
    path.write_bytes(public_context(generate_study_context()))
    script = (
        "import sys\n"
        "from concord_protocol.wire.ckks import load_context\n"
        "from concord_protocol.wire.seeded import SeededLayout\n"
        "assert 'site_node' not in ' '.join(sys.modules)\n"
        f"ctx = load_context(open({str(path)!r}, 'rb').read(), require_secret=False)\n"
        "print(SeededLayout.from_context(ctx).primes)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("(")
