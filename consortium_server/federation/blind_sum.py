"""Blind aggregation: sum the sites' encrypted updates with the public context only.

The server never holds the study's secret key: :func:`blind_sum` loads the context with
``require_secret=False``, which refuses a context that could decrypt. Every site's reply
(the blob list of :class:`site_node.crypto.wire.EncodedUpdate`) is checked; a bad reply is
*dropped* with a :class:`RejectedReply` record (site, reason code, digest) for the audit
log, and the others are summed. Only when fewer than ``min_sites`` replies remain does the
round fail, with :class:`NotEnoughSitesError`.

Checks, in order (the first failure is the reason): header parses and is canonical
(``malformed_header``); scheme, study, contract hash, round and parameter count are the
expected ones (``header_mismatch``); chunk size is the context's slot count
(``parameter_mismatch``); chunk count (``wrong_chunk_count``); blob sizes
(``oversized_chunk``); chunk digests (``digest_mismatch``); every chunk parses as a CKKS
vector under the public context (``undecodable_chunk``) with the expected number of values
(``size_mismatch``), the context's scale, level and ring, and two polynomials
(``parameter_mismatch``).

``ckks_seeded`` replies (:mod:`concord_protocol.wire.seeded`) go through the same screen,
then every chunk's prefix is checked and its seed read, before anything is summed: wrong
length, magic, layout version or PRNG type (``undecodable_chunk``), other parameters or
scale (``parameter_mismatch``), and a seed that appears more than once in the round, in
another site's reply or another chunk of the same one (``repeated_seed``: every reply
carrying it is dropped, since the server cannot tell the original from the copy; a repeated
seed is a replayed upload or a broken random generator, and two ciphertexts sharing one
reveal the difference of their plaintexts). The sum then unpacks each chunk, refusing a
coefficient that is not reduced (``undecodable_chunk``), and adds the ``c0`` parts modulo
``q`` with numpy: no SEAL object, no key.

The server cannot tell a well-formed ciphertext of garbage from a real update: integrity
of the *values* is the sites' business (DP clipping, and the digests in the audit log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts

from concord_protocol.errors import CryptoError, WireFormatError
from concord_protocol.rounds import RejectedReply
from concord_protocol.wire.ckks import ContextInfo, context_info, load_context
from concord_protocol.wire.format import (
    PLAIN_CHUNK_SIZE,
    EncodedUpdate,
    EncryptedScheme,
    EncryptedUpdate,
    PlainUpdate,
    RoundInfo,
    Scheme,
    SeededUpdate,
    UpdateHeader,
    chunk_length,
    expected_chunks,
    sha256_hex,
)
from concord_protocol.wire.seeded import (
    AggregateChunk,
    Seed,
    SeededLayout,
    UploadChunk,
    read_upload_seed,
)

__all__ = [
    "BlindSumResult",
    "NotEnoughSitesError",
    "RejectReason",
    "RejectedReply",
    "blind_sum",
    "plain_sum",
]

#: Extra bytes a header may take beyond its digests (fields, JSON punctuation).
_HEADER_BASE_BYTES = 1024
_HEADER_BYTES_PER_CHUNK = 67


class RejectReason(StrEnum):
    """Why a site's reply was dropped (stable codes for the audit log)."""

    MALFORMED_HEADER = "malformed_header"
    HEADER_MISMATCH = "header_mismatch"
    WRONG_CHUNK_COUNT = "wrong_chunk_count"
    OVERSIZED_CHUNK = "oversized_chunk"
    DIGEST_MISMATCH = "digest_mismatch"
    UNDECODABLE_CHUNK = "undecodable_chunk"
    SIZE_MISMATCH = "size_mismatch"
    PARAMETER_MISMATCH = "parameter_mismatch"
    NON_FINITE = "non_finite"
    REPEATED_SEED = "repeated_seed"


@dataclass(frozen=True)
class BlindSumResult:
    """The aggregate (still encrypted for ``ckks``) and who took part."""

    aggregate: EncodedUpdate
    accepted: tuple[str, ...]
    rejected: tuple[RejectedReply, ...]
    site_digests: Mapping[str, str] = field(default_factory=dict)

    @property
    def chunks(self) -> tuple[bytes, ...]:
        """Aggregate chunks, index by index."""
        return self.aggregate.chunks

    @property
    def digest(self) -> str:
        """Update digest of the aggregate."""
        return self.aggregate.digest

    def to_bytes_list(self) -> list[bytes]:
        """The aggregate in the update wire format (header first), to send to the sites."""
        return self.aggregate.to_bytes_list()


class NotEnoughSitesError(CryptoError):
    """Fewer valid replies than ``min_sites``: the round cannot be aggregated."""

    code = "aggregation.not_enough_sites"

    def __init__(
        self,
        message: str,
        *,
        accepted: Sequence[str],
        rejected: Sequence[RejectedReply],
        min_sites: int,
    ) -> None:
        super().__init__(message)
        self.accepted = tuple(accepted)
        self.rejected = tuple(rejected)
        self.min_sites = min_sites


def _rejected(site_id: str, rej: _RejectError, digest: str) -> RejectedReply:
    return RejectedReply(
        site_id=site_id,
        reason=rej.reason.value,
        detail=rej.detail[:2000],
        digest=digest,
        chunk_index=rej.chunk_index,
    )


class _RejectError(Exception):
    def __init__(self, reason: RejectReason, detail: str, chunk_index: int | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.chunk_index = chunk_index


@dataclass
class _Candidate:
    site_id: str
    header: UpdateHeader
    chunks: list[bytes]


def _header_digest(blobs: Sequence[bytes]) -> str:
    return sha256_hex(bytes(blobs[0]) if blobs else b"")


def _screen(
    site_id: str,
    blobs: Sequence[bytes],
    *,
    scheme: Scheme,
    expected: RoundInfo,
    chunk_size: int,
    n_chunks: int,
    max_chunk_bytes: int,
) -> _Candidate:
    """Checks that need no decoding: header, chunk count, sizes, digests."""
    if not isinstance(blobs, Sequence) or isinstance(blobs, bytes | bytearray) or not blobs:
        raise _RejectError(RejectReason.MALFORMED_HEADER, "reply is not a non-empty list of blobs")
    if not all(isinstance(b, bytes | bytearray | memoryview) for b in blobs):
        raise _RejectError(RejectReason.MALFORMED_HEADER, "reply holds something other than bytes")
    if len(blobs[0]) > _HEADER_BASE_BYTES + _HEADER_BYTES_PER_CHUNK * n_chunks:
        raise _RejectError(RejectReason.OVERSIZED_CHUNK, "header blob is too large")
    try:
        header = UpdateHeader.from_bytes(bytes(blobs[0]))
    except WireFormatError as exc:
        raise _RejectError(RejectReason.MALFORMED_HEADER, exc.message) from None
    if header.scheme != scheme:
        raise _RejectError(
            RejectReason.HEADER_MISMATCH, f"scheme {header.scheme!r}, expected {scheme!r}"
        )
    wrong = header.mismatches(expected)
    if wrong:
        raise _RejectError(RejectReason.HEADER_MISMATCH, "unexpected " + ", ".join(wrong))
    if header.chunk_size != chunk_size:
        raise _RejectError(
            RejectReason.PARAMETER_MISMATCH,
            f"chunk size {header.chunk_size}, expected {chunk_size}",
        )
    chunks = [bytes(b) for b in blobs[1:]]
    if header.num_chunks != n_chunks or len(chunks) != n_chunks:
        raise _RejectError(
            RejectReason.WRONG_CHUNK_COUNT,
            f"{len(chunks)} chunks (header says {header.num_chunks}), expected {n_chunks}",
        )
    for index, chunk in enumerate(chunks):
        if len(chunk) > max_chunk_bytes:
            raise _RejectError(
                RejectReason.OVERSIZED_CHUNK,
                f"chunk of {len(chunk)} bytes exceeds {max_chunk_bytes}",
                index,
            )
    for index, (chunk, digest) in enumerate(zip(chunks, header.chunk_digests, strict=True)):
        if sha256_hex(chunk) != digest:
            raise _RejectError(
                RejectReason.DIGEST_MISMATCH, "chunk does not match its digest", index
            )
    return _Candidate(site_id, header, chunks)


def _screen_all(
    updates: Mapping[str, Sequence[bytes]],
    *,
    scheme: Scheme,
    expected: RoundInfo,
    chunk_size: int,
    expected_chunk_count: int,
    max_chunk_bytes: int,
    rejected: list[RejectedReply],
) -> list[_Candidate]:
    n_chunks = expected_chunks(expected.num_values(chunk_size), chunk_size)
    if expected_chunk_count != n_chunks:
        raise ValueError(
            f"expected_chunks={expected_chunk_count} does not fit {expected.num_params} "
            f"parameters and {expected.tag_slots} tag slots per chunk in chunks of "
            f"{chunk_size} ({n_chunks} chunks)"
        )
    if max_chunk_bytes < 1:
        raise ValueError("max_chunk_bytes must be positive")
    candidates = []
    for site_id in sorted(updates):
        blobs = updates[site_id]
        try:
            candidates.append(
                _screen(
                    site_id,
                    blobs,
                    scheme=scheme,
                    expected=expected,
                    chunk_size=chunk_size,
                    n_chunks=n_chunks,
                    max_chunk_bytes=max_chunk_bytes,
                )
            )
        except _RejectError as rej:
            rejected.append(_rejected(site_id, rej, _header_digest(blobs)))
    return candidates


def _require(
    candidates: Sequence[_Candidate], rejected: Sequence[RejectedReply], min_sites: int
) -> None:
    if len(candidates) < min_sites:
        raise NotEnoughSitesError(
            f"{len(candidates)} valid replies, at least {min_sites} needed "
            f"({len(rejected)} rejected)",
            accepted=[c.site_id for c in candidates],
            rejected=rejected,
            min_sites=min_sites,
        )


def _decode_ckks(
    ctx: ts.Context, info: ContextInfo, chunk: bytes, index: int, length: int
) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx, chunk)
        size = int(vec.size())
        cts = vec.ciphertext()
    except (ValueError, RuntimeError, TypeError, IndexError, OverflowError):
        raise _RejectError(
            RejectReason.UNDECODABLE_CHUNK, "not a CKKS vector under this context", index
        ) from None
    if not cts:
        raise _RejectError(RejectReason.UNDECODABLE_CHUNK, "no ciphertext in the chunk", index)
    if len(cts) != 1:
        raise _RejectError(RejectReason.PARAMETER_MISMATCH, "more than one ciphertext", index)
    if size != length:
        raise _RejectError(RejectReason.SIZE_MISMATCH, f"{size} values, expected {length}", index)
    ct = cts[0]
    if (
        ct.size() != 2
        or ct.poly_modulus_degree() != info.poly_modulus_degree
        or tuple(int(x) for x in ct.parms_id()) != info.first_parms_id
        or ct.scale != info.global_scale
        or not ct.is_ntt_form()
    ):
        raise _RejectError(
            RejectReason.PARAMETER_MISMATCH,
            "ciphertext size, ring, level or scale differs from the context",
            index,
        )
    return vec


def _sum_chunk_major(
    candidates: list[_Candidate],
    n_chunks: int,
    *,
    decode: Callable[[bytes, int], Any],
    add: Callable[[Any, Any], Any],
    subtract: Callable[[Any, Any], Any],
    dump: Callable[[Any], bytes],
    load: Callable[[bytes], Any],
    rejected: list[RejectedReply],
) -> list[bytes]:
    """Sum chunk index by index, holding one decoded accumulator at a time.

    A reply that fails at chunk ``j`` is dropped and its (valid) chunks ``0..j-1`` are
    subtracted again from the aggregates already built; ciphertext addition is exact
    modular arithmetic, so this restores exactly the sum without it.
    """
    aggregates: list[bytes] = []
    for index in range(n_chunks):
        acc: Any = None
        for cand in list(candidates):
            try:
                value = decode(cand.chunks[index], index)
                acc = value if acc is None else add(acc, value)
            except _RejectError as rej:
                rejected.append(_rejected(cand.site_id, rej, cand.header.digest))
                candidates.remove(cand)
                if not candidates:  # nothing left to sum (the caller raises)
                    return []
                for k in range(index):
                    aggregates[k] = dump(subtract(load(aggregates[k]), decode(cand.chunks[k], k)))
        if acc is None:  # every candidate was dropped
            return []
        aggregates.append(dump(acc))
    return aggregates


def blind_sum(
    public_context: bytes,
    updates: Mapping[str, Sequence[bytes]],
    *,
    expected: RoundInfo,
    expected_chunks: int,
    max_chunk_bytes: int,
    min_sites: int = 3,
    scheme: EncryptedScheme = "ckks",
) -> BlindSumResult:
    """Sum the sites' CKKS updates without the secret key.

    ``updates`` maps site id to that site's reply (``EncodedUpdate.to_bytes_list()``).
    ``expected`` is the round the server asked for; ``expected_chunks`` must equal
    ``ceil(expected.num_values(chunk_size) / chunk_size)``, where ``chunk_size`` is the
    context's slot count for ``ckks`` and twice that for ``ckks_seeded`` (``scheme``, the
    contract's). Bad replies are dropped and recorded;
    raises :class:`NotEnoughSitesError` when fewer than ``min_sites`` remain, and
    :class:`~site_node.crypto.errors.ContextError` if ``public_context`` holds a secret key.
    """
    ctx = load_context(public_context, require_secret=False)
    info = context_info(ctx)
    if scheme == "ckks_seeded":
        return _seeded_sum(
            SeededLayout.from_context(ctx),
            updates,
            expected=expected,
            expected_chunks=expected_chunks,
            max_chunk_bytes=max_chunk_bytes,
            min_sites=min_sites,
        )
    if scheme != "ckks":
        raise ValueError(f"unknown encryption scheme {scheme!r}")
    rejected: list[RejectedReply] = []
    candidates = _screen_all(
        updates,
        scheme="ckks",
        expected=expected,
        chunk_size=info.slot_count,
        expected_chunk_count=expected_chunks,
        max_chunk_bytes=max_chunk_bytes,
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)

    def decode(chunk: bytes, index: int) -> ts.CKKSVector:
        length = chunk_length(expected.num_values(info.slot_count), info.slot_count, index)
        return _decode_ckks(ctx, info, chunk, index, length)

    def add(acc: ts.CKKSVector, value: ts.CKKSVector) -> ts.CKKSVector:
        try:
            acc.add_(value)
        except (ValueError, RuntimeError) as exc:  # belt and braces: metadata was checked
            raise _RejectError(RejectReason.PARAMETER_MISMATCH, f"cannot add: {exc}") from None
        return acc

    def subtract(acc: ts.CKKSVector, value: ts.CKKSVector) -> ts.CKKSVector:
        acc.sub_(value)
        return acc

    aggregates = _sum_chunk_major(
        candidates,
        expected_chunks,
        decode=decode,
        add=add,
        subtract=subtract,
        dump=lambda vec: bytes(vec.serialize()),
        load=lambda data: ts.ckks_vector_from(ctx, data),
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)
    return BlindSumResult(
        aggregate=EncryptedUpdate.build(expected, chunk_size=info.slot_count, chunks=aggregates),
        accepted=tuple(c.site_id for c in candidates),
        rejected=tuple(rejected),
        site_digests={c.site_id: c.header.digest for c in candidates},
    )


#: How a seeded chunk's parse errors map to reasons (anything else: undecodable).
_SEEDED_REASONS = {"update.parameter_mismatch": RejectReason.PARAMETER_MISMATCH}


def _seeded_reject(exc: WireFormatError, index: int) -> _RejectError:
    reason = _SEEDED_REASONS.get(exc.code, RejectReason.UNDECODABLE_CHUNK)
    return _RejectError(reason, exc.message, index)


def _seeds_of(layout: SeededLayout, cand: _Candidate) -> list[bytes]:
    seeds = []
    for index, chunk in enumerate(cand.chunks):
        try:
            seeds.append(read_upload_seed(layout, chunk).value)
        except WireFormatError as exc:
            raise _seeded_reject(exc, index) from None
    return seeds


def _screen_seeds(
    layout: SeededLayout, candidates: list[_Candidate], rejected: list[RejectedReply]
) -> None:
    """Check every chunk's prefix and read its seed; drop replies with a bad prefix, then
    every reply holding a seed that occurs more than once in the round."""
    where: dict[bytes, list[tuple[str, int]]] = {}
    for cand in list(candidates):
        try:
            seeds = _seeds_of(layout, cand)
        except _RejectError as rej:
            rejected.append(_rejected(cand.site_id, rej, cand.header.digest))
            candidates.remove(cand)
            continue
        for index, value in enumerate(seeds):
            where.setdefault(value, []).append((cand.site_id, index))
    repeated: dict[str, tuple[int, str]] = {}
    for places in where.values():
        if len(places) < 2:
            continue
        for site_id, index in places:
            others = ", ".join(f"{s} chunk {i}" for s, i in places if (s, i) != (site_id, index))
            repeated.setdefault(site_id, (index, others))
    for cand in list(candidates):
        if cand.site_id in repeated:
            index, others = repeated[cand.site_id]
            repeat = _RejectError(
                RejectReason.REPEATED_SEED, f"the seed of chunk {index} is also in {others}", index
            )
            rejected.append(_rejected(cand.site_id, repeat, cand.header.digest))
            candidates.remove(cand)


#: Additions to a reduced sum that a uint64 holds before it must be reduced again: eight
#: values below 2**61 (SEAL's primes have at most 60 bits) sum below 2**64.
_LAZY_ADDS = 7


@dataclass
class _SeededSum:
    """The running sum of one chunk index: the sites' seeds and their ``c0`` parts added
    in place, reduced modulo the primes only every :data:`_LAZY_ADDS` additions (the
    canonical :class:`AggregateChunk` is built once, by :meth:`chunk`)."""

    seeds: list[Seed]
    c0: npt.NDArray[np.uint64]
    pending: int = 0

    @classmethod
    def of(cls, upload: UploadChunk) -> _SeededSum:
        return cls([upload.seed], np.array(upload.c0, dtype=np.uint64))

    def add(self, layout: SeededLayout, other: _SeededSum) -> _SeededSum:
        self.seeds.extend(other.seeds)
        self.c0 += other.c0
        self.pending += 1
        if self.pending >= _LAZY_ADDS:
            self._reduce(layout)
        return self

    def _reduce(self, layout: SeededLayout) -> None:
        np.remainder(self.c0, layout.moduli, out=self.c0)
        self.pending = 0

    def chunk(self, layout: SeededLayout) -> AggregateChunk:
        self._reduce(layout)
        return AggregateChunk(tuple(sorted(self.seeds, key=Seed.to_bytes)), self.c0)


def _seeded_sum(
    layout: SeededLayout,
    updates: Mapping[str, Sequence[bytes]],
    *,
    expected: RoundInfo,
    expected_chunks: int,
    max_chunk_bytes: int,
    min_sites: int,
) -> BlindSumResult:
    """:func:`blind_sum` for ``ckks_seeded``: numpy sums of ``c0`` parts, seeds listed."""
    rejected: list[RejectedReply] = []
    candidates = _screen_all(
        updates,
        scheme="ckks_seeded",
        expected=expected,
        chunk_size=layout.values_per_chunk,
        expected_chunk_count=expected_chunks,
        max_chunk_bytes=max_chunk_bytes,
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)
    _screen_seeds(layout, candidates, rejected)
    _require(candidates, rejected, min_sites)

    def decode(chunk: bytes, index: int) -> _SeededSum:
        try:
            return _SeededSum.of(UploadChunk.from_bytes(layout, chunk))
        except WireFormatError as exc:
            raise _seeded_reject(exc, index) from None

    aggregates = _sum_chunk_major(
        candidates,
        expected_chunks,
        decode=decode,
        add=lambda acc, value: acc.add(layout, value),
        subtract=lambda acc, value: acc.subtract(layout, value.chunk(layout)),
        dump=lambda acc: (acc.chunk(layout) if isinstance(acc, _SeededSum) else acc).to_bytes(
            layout
        ),
        load=lambda data: AggregateChunk.from_bytes(layout, data),
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)
    return BlindSumResult(
        aggregate=SeededUpdate.build(
            expected, chunk_size=layout.values_per_chunk, chunks=aggregates
        ),
        accepted=tuple(c.site_id for c in candidates),
        rejected=tuple(rejected),
        site_digests={c.site_id: c.header.digest for c in candidates},
    )


def plain_sum(
    updates: Mapping[str, Sequence[bytes]],
    *,
    expected: RoundInfo,
    expected_chunks: int,
    max_chunk_bytes: int,
    min_sites: int = 3,
    chunk_size: int = PLAIN_CHUNK_SIZE,
) -> BlindSumResult:
    """Same as :func:`blind_sum` for studies with encryption off (float64 chunks)."""
    rejected: list[RejectedReply] = []
    candidates = _screen_all(
        updates,
        scheme="plain",
        expected=expected,
        chunk_size=chunk_size,
        expected_chunk_count=expected_chunks,
        max_chunk_bytes=max_chunk_bytes,
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)

    def decode(chunk: bytes, index: int) -> npt.NDArray[np.float64]:
        length = chunk_length(expected.num_values(chunk_size), chunk_size, index)
        if len(chunk) != 8 * length:
            raise _RejectError(
                RejectReason.SIZE_MISMATCH, f"{len(chunk)} bytes, expected {8 * length}", index
            )
        values = np.frombuffer(chunk, dtype="<f8")
        if not np.isfinite(values).all():
            raise _RejectError(RejectReason.NON_FINITE, "NaN or infinite values", index)
        return values

    # Float subtraction is not exact: validate every chunk first (cheap), then only sum.
    for cand in list(candidates):
        try:
            for index, chunk in enumerate(cand.chunks):
                decode(chunk, index)
        except _RejectError as rej:
            rejected.append(_rejected(cand.site_id, rej, cand.header.digest))
            candidates.remove(cand)
    _require(candidates, rejected, min_sites)
    aggregates = _sum_chunk_major(
        candidates,
        expected_chunks,
        decode=decode,
        add=lambda acc, value: acc + value,
        subtract=lambda acc, value: acc - value,
        dump=lambda arr: np.asarray(arr, dtype="<f8").tobytes(),
        load=lambda data: np.frombuffer(data, dtype="<f8").copy(),
        rejected=rejected,
    )
    _require(candidates, rejected, min_sites)
    return BlindSumResult(
        aggregate=PlainUpdate.build(expected, chunk_size=chunk_size, chunks=aggregates),
        accepted=tuple(c.site_id for c in candidates),
        rejected=tuple(rejected),
        site_digests={c.site_id: c.header.digest for c in candidates},
    )
