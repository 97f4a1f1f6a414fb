"""SEAL's own serialised form of a seeded ciphertext, and moving SEAL objects through bytes.

Why the site reads SEAL's bytes at all: a seeded ciphertext's seed exists only in its saved
form (``Encryptor.encrypt_symmetric(plaintext)`` returns a ``Serializable`` that stores the
64-byte PRNG seed instead of the second polynomial), and ``tenseal.sealapi`` saves and loads
only through a file path, always compressed with zstd (there is no ``compr_mode`` argument).
So :class:`SealFile` gives SEAL an anonymous in-memory file (``memfd``) with a path,
:func:`parse_seeded` reads ``(c0, seed)`` out of SEAL's bytes, and :func:`build_seeded`
writes SEAL's (uncompressed) bytes of a seeded ciphertext back for ``Ciphertext.load``, which
expands the seed. Only ciphertexts and an empty plaintext (the version probe) ever pass
through the file; never a key or a decrypted value.

The layout is SEAL's (``Ciphertext::save_members`` and ``UniformRandomGeneratorInfo``, SEAL
4.x)::

    header (16)  = magic 0xA15E (u16) | header size 16 (u8) | version major, minor (u8, u8)
                   | compression (u8: 0 none, 1 zlib, 2 zstd) | reserved (u16) | size (u64)
    body         = parms_id (4 x u64) | is_ntt_form (u8) | size 2 (u64) | N (u64)
                   | coeff modulus size (u64) | scale (f64) | correction factor 1 (u64)
                   | header | count (u64) | c0 (count x u64)        (nested, uncompressed)
                   | header | prng type (u8) | seed (64)             (nested, uncompressed)

It depends on SEAL's serialisation version, which :func:`probe_seal_version` reads from a
save at start-up; :data:`SUPPORTED_SEAL_VERSIONS` is what the round-trip tests were run
against (TenSEAL is pinned in ``pyproject.toml``). Sites must also agree on how a seed
expands into a polynomial, which is SEAL's PRNG code: a site on another SEAL would decrypt
other sites' sums to noise, which the integrity tags refuse.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as sealapi
import zstandard

from concord_protocol.errors import ContextError, WireFormatError
from concord_protocol.wire.seeded import SEED_BYTES, Seed, SeededLayout, UploadChunk

__all__ = [
    "SUPPORTED_SEAL_VERSIONS",
    "SealFile",
    "build_seeded",
    "parse_seeded",
    "probe_seal_version",
]

#: SEAL serialisation versions (major, minor) this layout was checked against.
SUPPORTED_SEAL_VERSIONS = frozenset({(4, 3)})

SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, -, size
_META = struct.Struct("<4QBQQQdQ")  # parms_id, is_ntt_form, size, N, moduli, scale, correction
_COUNT = struct.Struct("<Q")
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_SEED_INFO = 1 + SEED_BYTES
_UNDECODABLE = "update.undecodable_chunk"


class SealFile:
    """An in-memory file with a path, for ``sealapi``'s path-only ``save`` and ``load``.

    A ``memfd`` (Linux) has no name in any filesystem and disappears with its descriptor;
    elsewhere a file in a private (0700) temporary directory stands in. Calls are
    serialised by a lock: one file, one object at a time.
    """

    def __init__(self, *, use_memfd: bool = True) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        if use_memfd and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self._fd = os.memfd_create("concord-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}"
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="concord-seal-")
            self.path = os.path.join(self._dir.name, "object")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def save(self, obj: Any) -> bytes:
        """``obj.save(path)`` (any SEAL object or ``Serializable``), returned as bytes."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            obj.save(self.path)
            return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def load(self, obj: Any, context: Any, data: bytes) -> None:
        """``obj.load(context, path)`` from ``data``."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            obj.load(context, self.path)

    def close(self) -> None:
        """Release the file (also done when the object is collected)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __del__(self) -> None:
        self.close()


def probe_seal_version(file: SealFile) -> tuple[int, int]:
    """SEAL's serialisation version, from the header of an empty plaintext's save.

    Raises :class:`ContextError` (``crypto.seal_version_unsupported``) for a version the
    layout was not checked against.
    """
    magic, _, major, minor, _, _, _ = _HEADER.unpack_from(file.save(sealapi.Plaintext()))
    version = (int(major), int(minor))
    if magic != SEAL_MAGIC or version not in SUPPORTED_SEAL_VERSIONS:
        raise ContextError(
            f"SEAL serialisation version {version[0]}.{version[1]} is not one the ckks_seeded "
            "layout was checked against; install the TenSEAL version pyproject.toml pins",
            code="crypto.seal_version_unsupported",
        )
    return version


def _header(version: tuple[int, int], size: int) -> bytes:
    return _HEADER.pack(SEAL_MAGIC, _HEADER.size, version[0], version[1], _COMPR_NONE, 0, size)


def _check_header(data: bytes, offset: int, version: tuple[int, int], size: int | None) -> int:
    magic, hsize, major, minor, compr, _, got = _HEADER.unpack_from(data, offset)
    if magic != SEAL_MAGIC or hsize != _HEADER.size or (major, minor) != version:
        raise WireFormatError("not a SEAL object of this SEAL version", code=_UNDECODABLE)
    if size is not None and (got != size or compr != _COMPR_NONE):
        raise WireFormatError("unexpected nested SEAL object", code=_UNDECODABLE)
    return int(compr)


def _body_size(layout: SeededLayout) -> int:
    return (
        _META.size
        + _HEADER.size
        + _COUNT.size
        + 8 * layout.num_coefficients
        + _HEADER.size
        + _SEED_INFO
    )


def parse_seeded(data: bytes, layout: SeededLayout, version: tuple[int, int]) -> UploadChunk:
    """``(c0, seed)`` of SEAL's saved seeded ciphertext, checked against ``layout``."""
    if len(data) < _HEADER.size or len(data) != _HEADER.unpack_from(data)[6]:
        raise WireFormatError("truncated SEAL object", code=_UNDECODABLE)
    compr = _check_header(data, 0, version, None)
    expected = _body_size(layout)
    try:
        if compr == _COMPR_NONE:
            body = data[_HEADER.size :]
        elif compr == _COMPR_ZLIB:
            # At most one byte past the expected size: a longer body is refused below
            # without inflating the rest (``bufsize`` would only be a starting size).
            body = zlib.decompressobj().decompress(data[_HEADER.size :], expected + 1)
        elif compr == _COMPR_ZSTD:
            body = zstandard.ZstdDecompressor().decompress(
                data[_HEADER.size :], max_output_size=expected
            )
        else:
            raise WireFormatError(f"unknown SEAL compression mode {compr}", code=_UNDECODABLE)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise WireFormatError(
            f"the SEAL object does not decompress: {exc}", code=_UNDECODABLE
        ) from None
    if len(body) != expected:
        raise WireFormatError("not a seeded ciphertext of this context", code=_UNDECODABLE)
    *parms_id, is_ntt, size, n, moduli, scale, correction = _META.unpack_from(body)
    if (
        struct.pack("<4Q", *parms_id) != layout.parms_id
        or (is_ntt, size, n, moduli, correction)
        != (1, 2, layout.poly_modulus_degree, len(layout.primes), 1)
        or scale != layout.scale
    ):
        raise WireFormatError("the ciphertext does not fit the context", code=_UNDECODABLE)
    pos = _META.size
    count = layout.num_coefficients
    _check_header(body, pos, version, _HEADER.size + _COUNT.size + 8 * count)
    if _COUNT.unpack_from(body, pos + _HEADER.size)[0] != count:
        raise WireFormatError("the ciphertext is not seeded", code=_UNDECODABLE)
    pos += _HEADER.size + _COUNT.size
    c0: npt.NDArray[np.uint64] = np.frombuffer(body, dtype="<u8", count=count, offset=pos).astype(
        np.uint64
    )
    pos += 8 * count
    _check_header(body, pos, version, _HEADER.size + _SEED_INFO)
    pos += _HEADER.size
    return UploadChunk(Seed(body[pos], bytes(body[pos + 1 : pos + _SEED_INFO])), c0)


def build_seeded(
    layout: SeededLayout, c0: npt.NDArray[np.uint64], seed: Seed, version: tuple[int, int]
) -> bytes:
    """SEAL's uncompressed bytes of the seeded ciphertext ``(c0, expand(seed))``."""
    coefficients = np.ascontiguousarray(c0, dtype="<u8")
    if coefficients.shape != (layout.num_coefficients,):
        raise ValueError(f"c0 has {layout.num_coefficients} coefficients")
    meta = _META.pack(
        *struct.unpack("<4Q", layout.parms_id),
        1,
        2,
        layout.poly_modulus_degree,
        len(layout.primes),
        layout.scale,
        1,
    )
    array = (
        _header(version, _HEADER.size + _COUNT.size + coefficients.nbytes)
        + _COUNT.pack(coefficients.shape[0])
        + coefficients.tobytes()
    )
    info = _header(version, _HEADER.size + _SEED_INFO) + seed.to_bytes()
    body = meta + array + info
    return _header(version, _HEADER.size + len(body)) + body
