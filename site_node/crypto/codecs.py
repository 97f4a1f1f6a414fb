"""Encoding a site's weighted update and decoding an aggregate: the site's codecs.

The bytes are the shared wire format (:mod:`concord_protocol.wire.format`). A site
multiplies its update by its weight (its sample count) and encodes it in chunks;
:meth:`UpdateCodec.decrypt_aggregate` divides the server's sum by the total weight.
:class:`CkksCodec` encrypts with the study's secret context and rounds each decrypted sum to
a grid coarser than the CKKS noise, after a keyed dither, before the values leave the codec:
published CKKS decryptions next to their ciphertexts otherwise let anyone recover the secret
key (Li and Micciancio, EUROCRYPT 2021). See ``docs/crypto.md``. :class:`PlainCodec` is
float64 for studies with encryption off.

:class:`CkksCodec` speaks both encrypted schemes of the contract's ``encryption.scheme``:
``ckks`` (one TenSEAL ``CKKSVector`` per chunk, one value per slot, 32 bytes per parameter)
and ``ckks_seeded`` (seeded ciphertexts, two values per slot, bit-packed, about 7.5 bytes per
parameter: :mod:`site_node.crypto.seeded`). The checks, tags, rounding and dither are the
same for both; only the ciphertext bytes differ.

With ``tag_slots`` (:data:`~concord_protocol.wire.format.CKKS_TAG_SLOTS`, what a study's
ClientApp uses) every chunk ends with secret integrity tags (:mod:`site_node.crypto.tags`):
:meth:`CkksCodec.encode` appends them and :meth:`CkksCodec.decrypt_aggregate` checks them
against the sites the aggregate lists (:class:`ListedSum`) before anything leaves it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from concord_protocol.errors import WireFormatError
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
    chunk_length,
    expected_chunks,
    tagged_length,
)
from site_node.crypto.errors import NonFiniteUpdateError, UpdateRangeError, UpdateShapeError
from site_node.crypto.seeded import COMPLEX_PACKING_FACTOR, SeededCipher
from site_node.crypto.tags import AggregateIntegrityError, AggregateTags

__all__ = [
    "DEFAULT_MAX_SITES",
    "CkksCodec",
    "ListedSum",
    "PlainCodec",
    "UpdateCodec",
    "decrypt_aggregate",
    "encode_update",
]

#: Sites a CKKS sum is sized for by default: each site keeps its weighted values below
#: ``max_abs_sum / max_sites`` so that the sum of all cannot overflow.
DEFAULT_MAX_SITES = 32
#: Bits between the CKKS scale and the rounding grid of a decrypted sum: the grid is
#: ``2**14`` times the scale's resolution, above the noise (about 2**10 of it) at the
#: default parameters.
_ROUNDING_GRID_BITS = 14
_DITHER_INFO = b"concord/ckks-decrypt-dither/v1"


@dataclass(frozen=True)
class ListedSum:
    """What a tagged aggregate must be the sum of: the round's ``info`` and the sites its
    (verified) manifest lists."""

    info: RoundInfo
    sites: tuple[str, ...]


@runtime_checkable
class UpdateCodec(Protocol):
    """Encodes a site's weighted update and decodes an aggregate: one path for both schemes."""

    @property
    def scheme(self) -> Scheme:
        """``ckks`` or ``plain``."""
        ...

    @property
    def chunk_size(self) -> int:
        """Values per chunk."""
        ...

    @property
    def tag_slots(self) -> int:
        """Integrity tag slots per chunk (0: none)."""
        ...

    def encode(
        self,
        vector: npt.NDArray[np.floating],
        *,
        weight: float,
        info: RoundInfo,
        site_id: str = "",
    ) -> EncodedUpdate:
        """Validate ``vector``, multiply it by ``weight`` and encode it in chunks (tagged
        for ``site_id`` when the codec has tag slots)."""
        ...

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        *,
        num_params: int,
        total_weight: float,
        listed: ListedSum | None = None,
    ) -> npt.NDArray[np.float64]:
        """Decode an aggregate (sum of weighted updates), check its tags against ``listed``
        (required when the codec has tag slots) and divide by ``total_weight``."""
        ...


def _check_weight(weight: float, name: str = "weight") -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
        raise UpdateRangeError(f"{name} must be a number", code="update.invalid_weight")
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise UpdateRangeError(f"{name} must be finite and > 0", code="update.invalid_weight")
    return value


def _check_vector(vector: npt.NDArray[np.floating], num_params: int) -> None:
    if not isinstance(vector, np.ndarray):
        raise UpdateShapeError("the update must be a numpy array", code="update.bad_shape")
    if vector.ndim != 1:
        raise UpdateShapeError(
            f"the update must be one flat vector, got {vector.ndim} dimensions",
            code="update.bad_shape",
        )
    if not (np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)):
        raise UpdateShapeError(
            f"the update must hold real numbers, got dtype {vector.dtype}", code="update.bad_dtype"
        )
    if vector.shape[0] != num_params:
        raise UpdateShapeError(
            f"the update has {vector.shape[0]} parameters, the round expects {num_params}",
            code="update.length_mismatch",
        )


def _scan_chunks(
    vector: npt.NDArray[np.floating], chunk_size: int, weight: float, limit: float
) -> None:
    """Refuse non-finite values and weighted magnitudes above ``limit``, chunk by chunk."""
    for start in range(0, vector.shape[0], chunk_size):
        part = vector[start : start + chunk_size]
        finite = np.isfinite(part)
        if not finite.all():
            bad = int(part.shape[0] - np.count_nonzero(finite))
            first = start + int(np.argmin(finite))
            raise NonFiniteUpdateError(
                f"the update holds {bad}+ NaN/infinite values (first at index {first}); "
                "refusing to send it"
            )
        if part.size and float(np.max(np.abs(part))) * weight > limit:
            raise UpdateRangeError(
                f"weighted update exceeds the safe magnitude {limit:.3g} near index {start}; "
                "send deltas instead of full weights, clip, or use a smaller weight",
                code="update.out_of_range",
            )


class CkksCodec:
    """CKKS encoding with the study's secret context (sites only).

    ``max_sites`` sizes the overflow guard: each site's weighted values must stay below
    ``max_abs_sum / max_sites`` (divided by :data:`COMPLEX_PACKING_FACTOR` for
    ``ckks_seeded``) so that the server's sum of up to ``max_sites`` updates decrypts
    correctly. ``tag_slots``: integrity tag values per chunk (see the module docs).
    ``scheme``: the contract's ``encryption.scheme``.
    """

    def __init__(
        self,
        secret_context: bytes,
        *,
        max_sites: int = DEFAULT_MAX_SITES,
        tag_slots: int = 0,
        scheme: EncryptedScheme = "ckks",
    ) -> None:
        if max_sites < 1:
            raise ValueError("max_sites must be >= 1")
        if scheme not in ("ckks", "ckks_seeded"):
            raise ValueError(f"unknown encryption scheme {scheme!r}")
        self._ctx = load_context(secret_context, require_secret=True)
        self._info: ContextInfo = context_info(self._ctx)
        self._scheme: EncryptedScheme = scheme
        self._chunk_size = self._info.chunk_size(scheme)
        self._seeded = SeededCipher(self._ctx) if scheme == "ckks_seeded" else None
        if not 0 <= tag_slots < self._chunk_size:
            raise ValueError("tag_slots must be within 0..chunk_size-1")
        self._max_sites = max_sites
        self._tag_slots = tag_slots
        self._tags = AggregateTags(secret_context, slots=tag_slots) if tag_slots else None
        self._dither_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_DITHER_INFO
        ).derive(bytes(secret_context))
        scale_bits = math.log2(self._info.global_scale)
        self._grid = float(2.0 ** -(scale_bits - _ROUNDING_GRID_BITS))

    @property
    def scheme(self) -> Scheme:
        """``ckks`` or ``ckks_seeded``."""
        return self._scheme

    @property
    def chunk_size(self) -> int:
        """Values per ciphertext: the slot count (N/2) for ``ckks``, N for ``ckks_seeded``."""
        return self._chunk_size

    @property
    def tag_slots(self) -> int:
        """Integrity tag slots at the end of each chunk (0: untagged)."""
        return self._tag_slots

    @property
    def values_per_chunk(self) -> int:
        """Model values per chunk (the chunk size less the tag slots)."""
        return self._chunk_size - self._tag_slots

    @property
    def per_site_limit(self) -> float:
        """Largest ``|weight * value|`` a site may send."""
        packing = COMPLEX_PACKING_FACTOR if self._seeded is not None else 1.0
        return self._info.max_abs_sum / packing / self._max_sites

    @property
    def rounding_grid(self) -> float:
        """Grid the decrypted weighted sum is rounded to (before dividing by the weight)."""
        return self._grid

    def iter_encrypted_chunks(
        self,
        vector: npt.NDArray[np.floating],
        *,
        weight: float,
        info: RoundInfo,
        site_id: str = "",
    ) -> Iterator[bytes]:
        """Check the whole vector, then yield serialised ciphertexts one chunk at a time.

        Only one chunk of weighted float64 values and one ciphertext exist at a time, so a
        caller that writes each chunk out does not hold the update twice.
        """
        w = _check_weight(weight)
        _check_vector(vector, info.num_params)
        if info.tag_slots != self._tag_slots:
            raise ValueError(
                f"the round expects {info.tag_slots} tag slots, the codec has {self._tag_slots}"
            )
        if self._tags is not None and not site_id:
            raise ValueError("a tagged update needs the site id")
        _scan_chunks(vector, self.values_per_chunk, w, self.per_site_limit)
        return self._encrypt(vector, w, info, site_id)

    def _encrypt(
        self, vector: npt.NDArray[np.floating], weight: float, info: RoundInfo, site_id: str
    ) -> Iterator[bytes]:
        step = self.values_per_chunk
        for index, start in enumerate(range(0, vector.shape[0], step)):
            part = np.asarray(vector[start : start + step], dtype=np.float64) * weight
            if self._tags is not None:
                tags = self._tags.tag(part, info, index, site_id)
                if float(np.max(np.abs(tags))) > self.per_site_limit:
                    raise UpdateRangeError(
                        f"chunk {index}'s integrity tags exceed the safe magnitude",
                        code="update.out_of_range",
                    )
                part = np.concatenate([part, tags])
            if self._seeded is not None:
                yield self._seeded.encrypt(part)
            else:
                yield bytes(ts.ckks_vector(self._ctx, part).serialize())

    def encode(
        self,
        vector: npt.NDArray[np.floating],
        *,
        weight: float,
        info: RoundInfo,
        site_id: str = "",
    ) -> EncryptedUpdate:
        """Encrypt ``weight * vector`` for the round described by ``info`` (tagged as
        ``site_id``'s contribution when the codec has tag slots); a
        :class:`~concord_protocol.wire.format.SeededUpdate` for ``ckks_seeded``."""
        chunks = list(self.iter_encrypted_chunks(vector, weight=weight, info=info, site_id=site_id))
        cls = SeededUpdate if self._seeded is not None else EncryptedUpdate
        return cls.build(info, chunk_size=self.chunk_size, chunks=chunks)

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        *,
        num_params: int,
        total_weight: float,
        listed: ListedSum | None = None,
    ) -> npt.NDArray[np.float64]:
        """Decrypt the aggregate, round it (see module docs), check its integrity tags
        against ``listed`` and divide by ``total_weight``.

        Raises :class:`~site_node.crypto.tags.AggregateIntegrityError` when a tag is off, or
        when a ``ckks_seeded`` chunk sums another number of uploads than ``listed`` names:
        nothing decrypted leaves the codec then.
        """
        total = _check_weight(total_weight, "total_weight")
        if self._tags is not None and listed is None:
            raise AggregateIntegrityError(
                "a tagged aggregate is only decrypted against the contributions it lists",
                code="aggregate.manifest_missing",
            )
        num_values = tagged_length(num_params, self.chunk_size, self._tag_slots)
        n_chunks = expected_chunks(num_values, self.chunk_size)
        if len(chunks) != n_chunks:
            raise WireFormatError(
                f"aggregate has {len(chunks)} chunks, expected {n_chunks}",
                code="update.wrong_chunk_count",
            )
        out = np.empty(num_params, dtype=np.float64)
        for index, chunk in enumerate(chunks):
            length = chunk_length(num_values, self.chunk_size, index)
            raw = self._decrypt_chunk(bytes(chunk), index, length, listed)
            values = self._round(raw, bytes(chunk))
            model = values[: length - self._tag_slots]
            if self._tags is not None and listed is not None:
                self._tags.check(
                    model,
                    values[length - self._tag_slots :],
                    listed.info,
                    index,
                    listed.sites,
                    grid=self._grid,
                )
            start = index * self.values_per_chunk
            out[start : start + model.shape[0]] = model / total
        return out

    def _decrypt_chunk(
        self, chunk: bytes, index: int, length: int, listed: ListedSum | None
    ) -> npt.NDArray[np.float64]:
        """The ``length`` raw (unrounded) values of aggregate chunk ``index``."""
        if self._seeded is not None:
            try:
                aggregate = self._seeded.read(chunk)
                # Before decrypting: each listed seed costs a SEAL load.
                if listed is not None and len(aggregate.seeds) != len(listed.sites):
                    raise AggregateIntegrityError(
                        f"aggregate chunk {index} sums {len(aggregate.seeds)} uploads, the "
                        f"manifest lists {len(listed.sites)} contributions"
                    )
                values, _ = self._seeded.decrypt(aggregate)
            except WireFormatError as exc:
                raise WireFormatError(
                    f"aggregate chunk {index}: {exc.message}", code=exc.code
                ) from None
            return values[:length]
        try:
            vec = ts.ckks_vector_from(self._ctx, chunk)
            size = int(vec.size())
        except (ValueError, RuntimeError, TypeError, IndexError):
            raise WireFormatError(
                f"aggregate chunk {index} cannot be decoded", code="update.undecodable_chunk"
            ) from None
        if size != length:
            raise WireFormatError(
                f"aggregate chunk {index} holds {size} values, expected {length}",
                code="update.size_mismatch",
            )
        return np.asarray(vec.decrypt(), dtype=np.float64)

    def _round(self, values: npt.NDArray[np.float64], chunk: bytes) -> npt.NDArray[np.float64]:
        # Keyed dither in [-grid/2, grid/2), the same at every site (it depends only on the
        # shared secret and the ciphertext), then rounding to the grid: the output no longer
        # carries the exact CKKS error that a key-recovery attack needs.
        nonce = hashlib.sha256(chunk).digest()[:16]
        stream = Cipher(algorithms.ChaCha20(self._dither_key, nonce), mode=None).encryptor()
        raw = np.frombuffer(stream.update(bytes(8 * values.shape[0])), dtype="<u8")
        dither = ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5) * self._grid
        return np.round((values + dither) / self._grid) * self._grid


class PlainCodec:
    """Float64 chunks for studies with encryption off; same interface as :class:`CkksCodec`."""

    def __init__(self, *, chunk_size: int = PLAIN_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self._chunk_size = chunk_size

    @property
    def scheme(self) -> Scheme:
        """Always ``plain``."""
        return "plain"

    @property
    def chunk_size(self) -> int:
        """Values per chunk."""
        return self._chunk_size

    @property
    def tag_slots(self) -> int:
        """Always 0: the server reads plain updates anyway, so tags would prove nothing."""
        return 0

    def encode(
        self,
        vector: npt.NDArray[np.floating],
        *,
        weight: float,
        info: RoundInfo,
        site_id: str = "",
    ) -> PlainUpdate:
        """``weight * vector`` as little-endian float64 chunks (``site_id`` is unused)."""
        w = _check_weight(weight)
        _check_vector(vector, info.num_params)
        _scan_chunks(vector, self._chunk_size, w, math.inf)
        chunks = [
            (np.asarray(vector[s : s + self._chunk_size], dtype=np.float64) * w)
            .astype("<f8")
            .tobytes()
            for s in range(0, vector.shape[0], self._chunk_size)
        ]
        return PlainUpdate.build(info, chunk_size=self._chunk_size, chunks=chunks)

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        *,
        num_params: int,
        total_weight: float,
        listed: ListedSum | None = None,
    ) -> npt.NDArray[np.float64]:
        """Decode the summed float64 chunks and divide by ``total_weight`` (``listed`` is
        unused: a plain aggregate carries no tags)."""
        total = _check_weight(total_weight, "total_weight")
        n_chunks = expected_chunks(num_params, self._chunk_size)
        if len(chunks) != n_chunks:
            raise WireFormatError(
                f"aggregate has {len(chunks)} chunks, expected {n_chunks}",
                code="update.wrong_chunk_count",
            )
        out = np.empty(num_params, dtype=np.float64)
        for index, chunk in enumerate(chunks):
            length = chunk_length(num_params, self._chunk_size, index)
            if len(chunk) != 8 * length:
                raise WireFormatError(
                    f"aggregate chunk {index} has {len(chunk)} bytes, expected {8 * length}",
                    code="update.size_mismatch",
                )
            start = index * self._chunk_size
            out[start : start + length] = np.frombuffer(chunk, dtype="<f8") / total
        if not np.isfinite(out).all():
            raise NonFiniteUpdateError("the aggregate holds NaN/infinite values")
        return out


def encode_update(
    vector: npt.NDArray[np.floating],
    *,
    weight: float,
    secret_context: bytes,
    study_id: str,
    contract_hash: str,
    round_number: int,
    num_params: int,
    max_sites: int = DEFAULT_MAX_SITES,
) -> EncryptedUpdate:
    """Encrypt ``weight * vector`` with the study's secret context (one-shot helper).

    Raises :class:`NonFiniteUpdateError` (NaN/inf), :class:`UpdateShapeError` (length,
    shape, dtype), :class:`UpdateRangeError` (weight, overflow guard). Build one
    :class:`CkksCodec` instead when encoding several updates with the same context.
    """
    codec = CkksCodec(secret_context, max_sites=max_sites)
    info = RoundInfo(study_id, contract_hash, round_number, num_params)
    return codec.encode(vector, weight=weight, info=info)


def decrypt_aggregate(
    chunks: Sequence[bytes], *, secret_context: bytes, num_params: int, total_weight: float
) -> npt.NDArray[np.float64]:
    """Decrypt the server's aggregate chunks and divide by the total weight (one-shot helper)."""
    return CkksCodec(secret_context).decrypt_aggregate(
        chunks, num_params=num_params, total_weight=total_weight
    )
