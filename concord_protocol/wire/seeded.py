"""The ``ckks_seeded`` chunk format: seeded CKKS ciphertexts, bit-packed, and their blind sum.

Why this format exists: a CKKS ciphertext is two polynomials ``(c0, c1)`` of N coefficients
per data prime. With symmetric encryption ``c1 = a`` is uniform noise drawn from a PRNG, so
it can travel as the PRNG's 64-byte seed instead (SEAL's "seeded" ciphertexts), and each
coefficient of ``c0`` needs only ``bits(q)`` bits, not the 64 SEAL stores (uniform
coefficients do not compress). Two reals per slot (complex encoding) then put N values in
one ciphertext: about 7.5 bytes per parameter at the default parameters (N=8192, one 60-bit
data prime), against 32 for a serialised TenSEAL ``CKKSVector`` and 4 for float32.

The server adds uploads without any key: the sum of ciphertexts ``(c0_i, a_i)`` is
``(sum c0_i, sum a_i)``, and since ``a_i`` is a function of seed ``i``, the aggregate can be
``sum c0_i mod q`` plus the list of every summed seed. Each site rebuilds ``sum a_i`` from
the seeds (``site_node.crypto.seeded``). The sum needs only numpy and the public context's
parameters; this module is that sum and the byte layout both sides must compute identically.
Both roles import it; it knows nothing of SEAL's own serialisation (that is the site's
business) and refuses anything not in canonical form, so that one aggregate has one digest::

    upload chunk    = b"CKSU" | version (u8) | parms_id (32) | scale (f64) | seed entry | c0
    aggregate chunk = b"CKSA" | version (u8) | parms_id (32) | scale (f64) | count (u16)
                      | count x seed entry | sum of c0
    seed entry      = prng type (u8: 1 blake2xb, 2 shake256) | seed (64)
    c0              = for each data prime q_j, N coefficients < q_j, bits(q_j) bits each,
                      little-endian bit order, no padding (N is a power of two)

Integers are little-endian. ``parms_id`` is SEAL's id of the data-level parameters (it names
the parameters, not the key: a chunk encrypted under another study's key with the same
parameters passes these checks, and only the sites' integrity tags catch it). The seeds are
not authenticated here either: a changed seed decrypts to noise, which the tags refuse.

A seed must never repeat: two ciphertexts with one ``a`` differ by the difference of their
plaintexts plus small noise, so the server (or anyone) could read that difference. Honest
sites draw 512-bit seeds at random; :class:`AggregateChunk` refuses repeats, and the server
refuses every reply carrying a seed seen elsewhere in the round (a replayed upload).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import tenseal as ts

# Registers SEAL's types with pybind11: without it, reading a context's coefficient moduli
# fails ("Unable to convert function return value to a Python type") in a process that has
# not imported it otherwise, such as the ServerApp.
import tenseal.sealapi

from concord_protocol.errors import WireFormatError

__all__ = [
    "AGGREGATE_MAGIC",
    "KNOWN_PRNG_TYPES",
    "SEEDED_CHUNK_VERSION",
    "SEED_BYTES",
    "UPLOAD_MAGIC",
    "AggregateChunk",
    "Seed",
    "SeededLayout",
    "UploadChunk",
    "read_upload_seed",
]

UPLOAD_MAGIC = b"CKSU"
AGGREGATE_MAGIC = b"CKSA"
#: Layout version of the chunks (the update header's ``format_version`` is 3 for them).
SEEDED_CHUNK_VERSION = 1
SEED_BYTES = 64
#: SEAL's ``prng_type`` values: 1 = BLAKE2xb, 2 = SHAKE256 (0, "unknown", is refused).
KNOWN_PRNG_TYPES = frozenset({1, 2})
#: Most seeds an aggregate may list (its count field is 16 bits).
MAX_SEEDS = 0xFFFF

_PREFIX = struct.Struct("<4sB32sd")  # magic, version, parms_id, scale
_SEED_ENTRY = 1 + SEED_BYTES
_COUNT = struct.Struct("<H")
_UNDECODABLE = "update.undecodable_chunk"
_PARAMETERS = "update.parameter_mismatch"


@dataclass(frozen=True)
class Seed:
    """The PRNG seed a site's ``c1`` polynomial is expanded from, and which PRNG expands it."""

    prng_type: int
    value: bytes

    def __post_init__(self) -> None:
        if self.prng_type not in KNOWN_PRNG_TYPES:
            raise WireFormatError(f"unknown PRNG type {self.prng_type}", code=_UNDECODABLE)
        if len(self.value) != SEED_BYTES:
            raise WireFormatError(f"a seed has {SEED_BYTES} bytes", code=_UNDECODABLE)

    def to_bytes(self) -> bytes:
        """The 65-byte seed entry."""
        return bytes([self.prng_type]) + self.value

    @classmethod
    def from_bytes(cls, data: bytes) -> Seed:
        """Parse a 65-byte seed entry."""
        return cls(data[0], bytes(data[1:_SEED_ENTRY]))


@dataclass(frozen=True)
class SeededLayout:
    """What a study context fixes about its chunks: ring degree, data primes, parms id, scale.

    Read from the context (:meth:`from_context`), never from the chunks: a chunk that
    names other parameters is refused (``update.parameter_mismatch``).
    """

    poly_modulus_degree: int
    primes: tuple[int, ...]
    parms_id: bytes
    scale: float

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n < 8 or n & (n - 1):
            raise ValueError("poly_modulus_degree must be a power of two")
        if not self.primes or any(not 1 < q < 2**61 for q in self.primes):
            raise ValueError("data primes must be below 2**61")
        if len(self.parms_id) != 32:
            raise ValueError("parms_id has 32 bytes")

    @classmethod
    def from_context(cls, ctx: ts.Context) -> SeededLayout:
        """The layout of a loaded TenSEAL context (public or secret: the same parameters)."""
        seal = ctx.seal_context().data
        moduli = seal.first_context_data().parms().coeff_modulus()
        return cls(
            poly_modulus_degree=int(seal.first_context_data().parms().poly_modulus_degree()),
            primes=tuple(int(m.value()) for m in moduli),
            parms_id=struct.pack("<4Q", *(int(x) for x in seal.first_parms_id())),
            scale=float(ctx.global_scale),
        )

    @property
    def values_per_chunk(self) -> int:
        """Real values per ciphertext: two per slot (real and imaginary part), N in all."""
        return self.poly_modulus_degree

    @property
    def num_coefficients(self) -> int:
        """Coefficients of one polynomial: N per data prime."""
        return self.poly_modulus_degree * len(self.primes)

    @property
    def prime_bits(self) -> tuple[int, ...]:
        """Bits each coefficient takes on the wire, per data prime."""
        return tuple(q.bit_length() for q in self.primes)

    @property
    def packed_bytes(self) -> int:
        """Bytes of one bit-packed polynomial."""
        return sum(self.poly_modulus_degree * b for b in self.prime_bits) // 8

    @property
    def upload_bytes(self) -> int:
        """Exact size of an upload chunk."""
        return _PREFIX.size + _SEED_ENTRY + self.packed_bytes

    def aggregate_bytes(self, num_seeds: int) -> int:
        """Exact size of an aggregate chunk of ``num_seeds`` summed uploads."""
        return _PREFIX.size + _COUNT.size + _SEED_ENTRY * num_seeds + self.packed_bytes

    @cached_property
    def moduli(self) -> npt.NDArray[np.uint64]:
        """Each coefficient's prime, aligned with a polynomial's coefficient array."""
        return np.repeat(np.array(self.primes, dtype=np.uint64), self.poly_modulus_degree)

    def pack(self, coefficients: npt.NDArray[np.uint64]) -> bytes:
        """Bit-pack a polynomial (every coefficient must already be reduced): each prime's
        ``N`` coefficients as one little-endian bit stream of ``bits`` bits each."""
        c = np.ascontiguousarray(coefficients, dtype="<u8")
        if c.shape != (self.num_coefficients,):
            raise ValueError(f"a polynomial has {self.num_coefficients} coefficients")
        if np.any(c >= self.moduli):
            raise ValueError("coefficients must be reduced modulo their prime")
        n = self.poly_modulus_degree
        parts = []
        for j, bits in enumerate(self.prime_bits):
            block = c[j * n : (j + 1) * n]
            if bits == 60 and n % 2 == 0:
                parts.append(_pack60(block))
                continue
            unpacked = np.unpackbits(block.view(np.uint8).reshape(n, 8), axis=1, bitorder="little")
            parts.append(np.packbits(unpacked[:, :bits], bitorder="little").tobytes())
        return b"".join(parts)

    def unpack(self, data: bytes) -> npt.NDArray[np.uint64]:
        """Inverse of :meth:`pack`; refuses a coefficient that is not below its prime
        (``update.undecodable_chunk``), so a polynomial has exactly one encoding."""
        if len(data) != self.packed_bytes:
            raise WireFormatError("packed polynomial of the wrong length", code=_UNDECODABLE)
        n, pos = self.poly_modulus_degree, 0
        c = np.empty(self.num_coefficients, dtype=np.uint64)
        for j, bits in enumerate(self.prime_bits):
            size = n * bits // 8
            raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=pos)
            c[j * n : (j + 1) * n] = _unpack_bits(raw, n, bits)
            pos += size
        if np.any(c >= self.moduli):
            raise WireFormatError(
                "a coefficient is not reduced modulo its prime", code=_UNDECODABLE
            )
        return c

    def check_prefix(self, data: bytes, magic: bytes) -> None:
        """Refuse a chunk of another kind, layout version, parameter set or scale."""
        if len(data) < _PREFIX.size:
            raise WireFormatError("chunk too short", code=_UNDECODABLE)
        got_magic, version, parms_id, scale = _PREFIX.unpack_from(data)
        if got_magic != magic:
            raise WireFormatError("not a ckks_seeded chunk of this kind", code=_UNDECODABLE)
        if version != SEEDED_CHUNK_VERSION:
            raise WireFormatError(f"unknown chunk layout version {version}", code=_UNDECODABLE)
        if parms_id != self.parms_id:
            raise WireFormatError(
                "the chunk names other encryption parameters than the study's", code=_PARAMETERS
            )
        if scale != self.scale:
            raise WireFormatError(
                f"the chunk's scale {scale!r} is not the study's {self.scale!r}", code=_PARAMETERS
            )

    def prefix(self, magic: bytes) -> bytes:
        """Magic, layout version, parms id and scale: how every chunk starts."""
        return _PREFIX.pack(magic, SEEDED_CHUNK_VERSION, self.parms_id, self.scale)


_MASK60 = np.uint64((1 << 60) - 1)


def _pack60(block: npt.NDArray[np.uint64]) -> bytes:
    """60-bit packing of an even number of coefficients (the default primes' width): each
    pair is one 120-bit little-endian integer, 15 bytes (the generic bit path's layout)."""
    even, odd = block[0::2], block[1::2]
    words = np.empty((len(even), 2), dtype="<u8")
    words[:, 0] = even | (odd << np.uint64(60))
    words[:, 1] = odd >> np.uint64(4)
    return words.view(np.uint8).reshape(-1, 16)[:, :15].tobytes()


def _unpack_bits(raw: npt.NDArray[np.uint8], n: int, bits: int) -> npt.NDArray[np.uint64]:
    """``n`` little-endian ``bits``-bit fields of the stream ``raw`` (the inverse of the
    packing above): 60-bit pairs word by word, any other width bit by bit."""
    if bits == 60 and n % 2 == 0:
        words = np.zeros((n // 2, 16), dtype=np.uint8)
        words[:, :15] = raw.reshape(n // 2, 15)
        lo, hi = words.view("<u8")[:, 0], words.view("<u8")[:, 1]
        out = np.empty(n, dtype=np.uint64)
        out[0::2] = lo & _MASK60
        out[1::2] = ((lo >> np.uint64(60)) | (hi << np.uint64(4))) & _MASK60
        return out
    fields = np.zeros((n, 64), dtype=np.uint8)
    fields[:, :bits] = np.unpackbits(raw, bitorder="little").reshape(n, bits)
    return np.packbits(fields, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


def read_upload_seed(layout: SeededLayout, data: bytes) -> Seed:
    """The seed of an upload chunk, after every check but the coefficients' (cheap: the
    server reads all seeds of a round before summing, to refuse repeats)."""
    if len(data) != layout.upload_bytes:
        raise WireFormatError(
            f"upload chunk of {len(data)} bytes, expected {layout.upload_bytes}",
            code=_UNDECODABLE,
        )
    layout.check_prefix(data, UPLOAD_MAGIC)
    return Seed.from_bytes(data[_PREFIX.size : _PREFIX.size + _SEED_ENTRY])


@dataclass(frozen=True, eq=False)
class UploadChunk:
    """One site's seeded ciphertext: its ``c0`` polynomial and the seed of its ``c1``."""

    seed: Seed
    c0: npt.NDArray[np.uint64]

    def to_bytes(self, layout: SeededLayout) -> bytes:
        """The canonical upload chunk bytes."""
        return layout.prefix(UPLOAD_MAGIC) + self.seed.to_bytes() + layout.pack(self.c0)

    @classmethod
    def from_bytes(cls, layout: SeededLayout, data: bytes) -> UploadChunk:
        """Parse and check an upload chunk (raises :class:`WireFormatError`, codes
        ``update.undecodable_chunk`` and ``update.parameter_mismatch``)."""
        seed = read_upload_seed(layout, data)
        return cls(seed, layout.unpack(data[_PREFIX.size + _SEED_ENTRY :]))


@dataclass(frozen=True, eq=False)
class AggregateChunk:
    """A blind sum of upload chunks: ``sum c0 mod q`` and every summed seed, sorted by their
    65-byte entries.

    Sums and differences are exact (modular arithmetic), so the server can take a reply
    back out of a partial sum when a later chunk of it turns out to be bad. The seed order
    is canonical, and another order is refused: the same sum in other bytes would get
    another dither nonce at the site, so a server could have one ciphertext decrypted and
    rounded up to k! ways, and averaging roundings approaches the exact decryption that
    key recovery needs (``docs/crypto.md``, "Why decrypted aggregates are rounded").
    """

    seeds: tuple[Seed, ...]
    c0: npt.NDArray[np.uint64]

    def __post_init__(self) -> None:
        if not 1 <= len(self.seeds) <= MAX_SEEDS:
            raise WireFormatError(f"an aggregate sums 1 to {MAX_SEEDS} uploads", code=_UNDECODABLE)
        if len({s.value for s in self.seeds}) != len(self.seeds):
            raise WireFormatError("an aggregate lists a seed twice", code=_UNDECODABLE)
        if list(self.seeds) != sorted(self.seeds, key=Seed.to_bytes):
            raise WireFormatError(
                "an aggregate's seeds are not in their canonical (sorted) order",
                code=_UNDECODABLE,
            )

    @classmethod
    def of(cls, upload: UploadChunk) -> AggregateChunk:
        """The sum of one upload."""
        return cls((upload.seed,), np.array(upload.c0, dtype=np.uint64))

    @classmethod
    def sum_of(cls, layout: SeededLayout, uploads: Iterable[UploadChunk]) -> AggregateChunk:
        """The blind sum of ``uploads`` (one chunk index of several sites)."""
        acc: AggregateChunk | None = None
        for upload in uploads:
            acc = cls.of(upload) if acc is None else acc.add(layout, cls.of(upload))
        if acc is None:
            raise ValueError("nothing to sum")
        return acc

    def add(self, layout: SeededLayout, other: AggregateChunk) -> AggregateChunk:
        """``self + other``: coefficients added modulo their primes, seed lists joined."""
        c0 = self.c0 + other.c0  # both below 2**61: no overflow
        np.subtract(c0, layout.moduli, out=c0, where=c0 >= layout.moduli)
        return AggregateChunk(tuple(sorted(self.seeds + other.seeds, key=Seed.to_bytes)), c0)

    def subtract(self, layout: SeededLayout, other: AggregateChunk) -> AggregateChunk:
        """``self - other``; ``other``'s seeds must all be in ``self``."""
        remaining = list(self.seeds)
        for seed in other.seeds:
            if seed not in remaining:
                raise ValueError("cannot subtract an upload that is not in the sum")
            remaining.remove(seed)
        c0 = self.c0 + (layout.moduli - other.c0)
        np.subtract(c0, layout.moduli, out=c0, where=c0 >= layout.moduli)
        return AggregateChunk(tuple(remaining), c0)

    def to_bytes(self, layout: SeededLayout) -> bytes:
        """The canonical aggregate chunk bytes."""
        return (
            layout.prefix(AGGREGATE_MAGIC)
            + _COUNT.pack(len(self.seeds))
            + b"".join(s.to_bytes() for s in self.seeds)
            + layout.pack(self.c0)
        )

    @classmethod
    def from_bytes(cls, layout: SeededLayout, data: bytes) -> AggregateChunk:
        """Parse and check an aggregate chunk (codes as :meth:`UploadChunk.from_bytes`)."""
        layout.check_prefix(data, AGGREGATE_MAGIC)
        if len(data) < _PREFIX.size + _COUNT.size:
            raise WireFormatError("aggregate chunk too short", code=_UNDECODABLE)
        (count,) = _COUNT.unpack_from(data, _PREFIX.size)
        if len(data) != layout.aggregate_bytes(count):
            raise WireFormatError(
                f"aggregate chunk of {len(data)} bytes, expected {layout.aggregate_bytes(count)} "
                f"for {count} seeds",
                code=_UNDECODABLE,
            )
        start = _PREFIX.size + _COUNT.size
        seeds = tuple(
            Seed.from_bytes(data[start + i * _SEED_ENTRY : start + (i + 1) * _SEED_ENTRY])
            for i in range(count)
        )
        return cls(seeds, layout.unpack(data[start + count * _SEED_ENTRY :]))
