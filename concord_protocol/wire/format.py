"""The model-update wire format: the one place sites and the server agree on its bytes.

A site flattens its model update into one float vector, multiplies it by its weight (its
sample count) and encodes it in chunks. On the wire an update is a list of byte blobs, one
Flower ``Array`` payload each::

    [header, chunk_0, chunk_1, ..., chunk_{n-1}]

``header`` is canonical JSON (sorted keys, no spaces) of :class:`UpdateHeader`: format
version, scheme (``ckks``, ``ckks_seeded`` or ``plain``), study id, contract hash, round
number, number of parameters, chunk size, tag slots per chunk, number of chunks and the
SHA-256 of every chunk. The format version follows from the scheme
(:data:`FORMAT_VERSIONS`: 3 for ``ckks_seeded``, 2 for the others, whose bytes have not
changed since version 2), so a reader of version 2 refuses the new scheme outright. The *update
digest* is the SHA-256 of the header bytes, so it commits to every chunk; the server records
it in the audit log. The weight (sample count) is not in the header: it travels as plain
round metadata next to the update.

* ``ckks``: each chunk is one serialised TenSEAL ``CKKSVector`` of ``chunk_size`` (= the
  context's slot count) values, the last one shorter. Its last ``tag_slots``
  (:data:`CKKS_TAG_SLOTS`) values are the chunk's secret integrity tags, the rest are model
  values: a chunk holds ``chunk_size - tag_slots`` parameters (``site_node.crypto.tags``).
  The server adds chunks index by index with the public context only
  (``consortium_server.federation.blind_sum``) and cannot tell tags from values.
* ``ckks_seeded`` (version 3): the same values and tags, two reals per slot, so
  ``chunk_size`` is the ring degree N; each chunk is a seeded ciphertext in the compact layout
  of :mod:`concord_protocol.wire.seeded` (an upload chunk from a site, an aggregate chunk from
  the server), about 7.5 bytes per parameter instead of 32.
* ``plain`` (studies with encryption off): each chunk is little-endian float64.

Sites encode and decode with the codecs of :mod:`site_node.crypto.codecs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from concord_protocol.errors import WireFormatError

__all__ = [
    "CKKS_TAG_SLOTS",
    "FORMAT_VERSIONS",
    "PLAIN_CHUNK_SIZE",
    "WIRE_FORMAT_VERSION",
    "EncodedUpdate",
    "EncryptedScheme",
    "EncryptedUpdate",
    "PlainUpdate",
    "RoundInfo",
    "Scheme",
    "SeededUpdate",
    "UpdateHeader",
    "chunk_length",
    "expected_chunks",
    "sha256_hex",
    "tagged_length",
    "update_class",
]

#: The newest format version (``ckks_seeded``); see :data:`FORMAT_VERSIONS`.
WIRE_FORMAT_VERSION: Literal[3] = 3
Scheme = Literal["ckks", "ckks_seeded", "plain"]
#: The schemes that encrypt (the study contract's ``encryption.scheme``).
EncryptedScheme = Literal["ckks", "ckks_seeded"]
#: The format version each scheme's header carries: ``ckks`` and ``plain`` are unchanged
#: since version 2 (their headers, digests and stored checkpoints stay valid).
FORMAT_VERSIONS: Mapping[Scheme, Literal[2, 3]] = MappingProxyType(
    {"ckks": 2, "plain": 2, "ckks_seeded": WIRE_FORMAT_VERSION}
)

#: Values per chunk for plaintext updates (1 MiB of float64).
PLAIN_CHUNK_SIZE = 131_072
#: Integrity tag slots at the end of every CKKS chunk (``site_node.crypto.tags``).
CKKS_TAG_SLOTS = 4

_HEX64 = r"^[0-9a-f]{64}$"


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def expected_chunks(num_values: int, chunk_size: int) -> int:
    """Number of chunks ``num_values`` values (tags included) take."""
    if num_values < 1 or chunk_size < 1:
        raise ValueError("num_values and chunk_size must be positive")
    return -(-num_values // chunk_size)


def tagged_length(num_params: int, chunk_size: int, tag_slots: int) -> int:
    """Values on the wire for ``num_params`` parameters with ``tag_slots`` tags per chunk.

    Each chunk holds ``chunk_size - tag_slots`` parameters followed by its tags (the last
    chunk fewer parameters, the same number of tags).
    """
    if tag_slots < 0 or tag_slots >= chunk_size:
        raise ValueError("tag_slots must be within 0..chunk_size-1")
    if num_params < 1:
        raise ValueError("num_params must be positive")
    return num_params + tag_slots * -(-num_params // (chunk_size - tag_slots))


@dataclass(frozen=True)
class RoundInfo:
    """Which study and round an update belongs to, and its length.

    Sites put these into every header; the server passes the same values to ``blind_sum``
    as what it expects, so a reply from another study or round is dropped. ``tag_slots``
    is :data:`CKKS_TAG_SLOTS` for encrypted studies, 0 for plain ones.
    """

    study_id: str
    contract_hash: str
    round_number: int
    num_params: int
    tag_slots: int = 0

    def num_values(self, chunk_size: int) -> int:
        """Values on the wire in chunks of ``chunk_size`` (parameters plus tags)."""
        return tagged_length(self.num_params, chunk_size, self.tag_slots)


class UpdateHeader(BaseModel):
    """Blob 0 of an update on the wire; its SHA-256 is the update digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[2, 3] = 2
    scheme: Scheme
    study_id: str = Field(min_length=1, max_length=128)
    contract_hash: str = Field(pattern=_HEX64)
    round_number: int = Field(ge=0)
    num_params: int = Field(ge=1)
    chunk_size: int = Field(ge=1)
    tag_slots: int = Field(default=0, ge=0, le=64)
    num_chunks: int = Field(ge=1)
    chunk_digests: tuple[str, ...]

    @model_validator(mode="before")
    @classmethod
    def _version_of_scheme(cls, data: Any) -> Any:
        # Built in code without a version: the scheme's. Parsed bytes must name it (they
        # are refused unless canonical, and the canonical form always carries it).
        if isinstance(data, dict) and "format_version" not in data:
            scheme = data.get("scheme")
            if isinstance(scheme, str) and scheme in FORMAT_VERSIONS:
                return {**data, "format_version": FORMAT_VERSIONS[scheme]}  # type: ignore[index]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> UpdateHeader:
        if self.format_version != FORMAT_VERSIONS[self.scheme]:
            raise ValueError(
                f"scheme {self.scheme} is format version {FORMAT_VERSIONS[self.scheme]}, "
                f"not {self.format_version}"
            )
        if self.tag_slots >= self.chunk_size:
            raise ValueError("tag_slots must be smaller than chunk_size")
        if self.num_chunks != expected_chunks(self.num_values, self.chunk_size):
            raise ValueError("num_chunks does not match num_params, chunk_size and tag_slots")
        if len(self.chunk_digests) != self.num_chunks:
            raise ValueError("one digest per chunk is required")
        for digest in self.chunk_digests:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("chunk digests must be lowercase hex SHA-256")
        return self

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no whitespace, ASCII)."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateHeader:
        """Parse a header blob; only the canonical encoding is accepted."""
        try:
            header = cls.model_validate_json(data)
        except ValidationError as exc:
            raise WireFormatError(
                f"update header is not valid ({exc.error_count()} problem(s))",
                code="update.malformed_header",
            ) from None
        if header.to_bytes() != bytes(data):
            raise WireFormatError(
                "update header is not in canonical form", code="update.malformed_header"
            )
        return header

    @property
    def digest(self) -> str:
        """The update digest: SHA-256 (hex) of the canonical header bytes."""
        return sha256_hex(self.to_bytes())

    @property
    def num_values(self) -> int:
        """Values on the wire: the parameters plus ``tag_slots`` per chunk."""
        return tagged_length(self.num_params, self.chunk_size, self.tag_slots)

    def chunk_length(self, index: int) -> int:
        """Number of values in chunk ``index`` (tags included)."""
        return chunk_length(self.num_values, self.chunk_size, index)

    def round_info(self) -> RoundInfo:
        """The study/round part of the header."""
        return RoundInfo(
            self.study_id, self.contract_hash, self.round_number, self.num_params, self.tag_slots
        )

    def mismatches(self, expected: RoundInfo) -> list[str]:
        """Names of the fields that differ from ``expected`` (empty when all match)."""
        return [
            name
            for name in ("study_id", "contract_hash", "round_number", "num_params", "tag_slots")
            if getattr(self, name) != getattr(expected, name)
        ]


def chunk_length(num_params: int, chunk_size: int, index: int) -> int:
    """Values in chunk ``index`` of an update of ``num_params`` values."""
    start = index * chunk_size
    if index < 0 or start >= num_params:
        raise IndexError("chunk index out of range")
    return min(chunk_size, num_params - start)


@dataclass(frozen=True)
class EncodedUpdate:
    """A header and its chunks; see :class:`EncryptedUpdate` and :class:`PlainUpdate`."""

    header: UpdateHeader
    chunks: tuple[bytes, ...]

    scheme: ClassVar[Scheme | None] = None

    @property
    def digest(self) -> str:
        """Update digest (SHA-256 of the header, which lists every chunk's digest)."""
        return self.header.digest

    @property
    def chunk_digests(self) -> tuple[str, ...]:
        """Per-chunk SHA-256 (hex), as listed in the header."""
        return self.header.chunk_digests

    @property
    def nbytes(self) -> int:
        """Total bytes on the wire, header included."""
        return len(self.header.to_bytes()) + sum(len(c) for c in self.chunks)

    def to_bytes_list(self) -> list[bytes]:
        """``[header, chunk_0, ...]``: one blob per Flower ``Array``."""
        return [self.header.to_bytes(), *self.chunks]

    @staticmethod
    def from_bytes_list(blobs: Sequence[bytes]) -> EncodedUpdate:
        """Parse and check a received blob list (header, chunk count, every digest).

        Returns an :class:`EncryptedUpdate` (a :class:`SeededUpdate` for ``ckks_seeded``)
        or a :class:`PlainUpdate` by the header's scheme. Chunk *contents* are not decoded
        here (that needs a context); see ``blind_sum`` and the codecs. Raises
        :class:`WireFormatError`.
        """
        if len(blobs) < 1:
            raise WireFormatError("no header blob", code="update.malformed_header")
        header = UpdateHeader.from_bytes(bytes(blobs[0]))
        chunks = tuple(bytes(b) for b in blobs[1:])
        if len(chunks) != header.num_chunks:
            raise WireFormatError(
                f"header announces {header.num_chunks} chunks, got {len(chunks)}",
                code="update.wrong_chunk_count",
            )
        for index, (chunk, digest) in enumerate(zip(chunks, header.chunk_digests, strict=True)):
            if sha256_hex(chunk) != digest:
                raise WireFormatError(
                    f"chunk {index} does not match its digest", code="update.digest_mismatch"
                )
        return update_class(header.scheme)(header=header, chunks=chunks)

    @classmethod
    def build(cls, info: RoundInfo, *, chunk_size: int, chunks: Sequence[bytes]) -> Self:
        """Assemble an update from already encoded chunks, computing the digests."""
        if cls.scheme is None:
            raise TypeError("build on EncryptedUpdate or PlainUpdate")
        header = UpdateHeader(
            scheme=cls.scheme,
            study_id=info.study_id,
            contract_hash=info.contract_hash,
            round_number=info.round_number,
            num_params=info.num_params,
            chunk_size=chunk_size,
            tag_slots=info.tag_slots,
            num_chunks=len(chunks),
            chunk_digests=tuple(sha256_hex(c) for c in chunks),
        )
        return cls(header=header, chunks=tuple(chunks))


@dataclass(frozen=True)
class EncryptedUpdate(EncodedUpdate):
    """An update whose chunks are CKKS ciphertexts."""

    scheme: ClassVar[Scheme | None] = "ckks"


@dataclass(frozen=True)
class PlainUpdate(EncodedUpdate):
    """An update whose chunks are little-endian float64 (studies with encryption off)."""

    scheme: ClassVar[Scheme | None] = "plain"


@dataclass(frozen=True)
class SeededUpdate(EncryptedUpdate):
    """An update whose chunks are compact seeded CKKS ciphertexts (:mod:`.seeded`)."""

    scheme: ClassVar[Scheme | None] = "ckks_seeded"


def update_class(scheme: Scheme) -> type[EncodedUpdate]:
    """The :class:`EncodedUpdate` subclass of ``scheme``."""
    classes: dict[Scheme, type[EncodedUpdate]] = {
        "ckks": EncryptedUpdate,
        "ckks_seeded": SeededUpdate,
        "plain": PlainUpdate,
    }
    return classes[scheme]
