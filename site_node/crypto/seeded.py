"""Seeded symmetric CKKS at a site: one chunk of reals in, one compact upload chunk out, and
back from an aggregate chunk (the ``ckks_seeded`` scheme).

The bytes are :mod:`concord_protocol.wire.seeded`; SEAL's own serialisation is
:mod:`site_node.crypto.seal_format`. What happens to a chunk of at most N reals:

* **encrypt**: the reals pair up into N/2 complex slots ``x_0 + i x_1, x_2 + i x_3, ...``
  (a zero pads an odd count), are encoded at the study's scale and encrypted with the
  secret key into a *seeded* ciphertext ``(c0, seed)``; ``c0`` is bit-packed.
* **decrypt**: the aggregate's ``c0`` and its first seed make one seeded ciphertext, each
  further seed a ciphertext ``(0, expand(seed))``; their SEAL sum is the full blind sum of
  ``(c0_i, a_i)``, which is decrypted and decoded back to N reals.

Complex packing changes how large a plaintext coefficient can get: a coefficient of a
polynomial encoding slots ``z_j`` is at most ``max |z_j| <= sqrt(2) max |x|`` times the
scale, against ``max |x|`` with one real per slot. :data:`COMPLEX_PACKING_FACTOR` is that
factor; :class:`~site_node.crypto.codecs.CkksCodec` divides its overflow guard by it, so
the guard keeps the same margin below ``q/2`` as the ``ckks`` scheme.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import numpy.typing as npt
import tenseal as ts
import tenseal.sealapi as sealapi

from concord_protocol.errors import WireFormatError
from concord_protocol.wire.seeded import AggregateChunk, SeededLayout
from site_node.crypto.seal_format import SealFile, build_seeded, parse_seeded, probe_seal_version

__all__ = ["COMPLEX_PACKING_FACTOR", "SeededCipher"]

#: Worst-case growth of a plaintext coefficient when two reals share a slot.
COMPLEX_PACKING_FACTOR = math.sqrt(2.0)


class SeededCipher:
    """Encrypts chunks into upload chunks and decrypts aggregate chunks with a study's
    secret context (a site's object; the server never needs SEAL for this scheme)."""

    def __init__(self, ctx: ts.Context) -> None:
        if not ctx.is_private():
            raise ValueError("a seeded cipher needs the secret context")
        self.layout = SeededLayout.from_context(ctx)
        self._seal = ctx.seal_context().data
        secret_key = ctx.secret_key().data
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._encryptor = sealapi.Encryptor(self._seal, secret_key)
        self._decryptor = sealapi.Decryptor(self._seal, secret_key)
        self._evaluator = sealapi.Evaluator(self._seal)
        self._file = SealFile()
        self._version = probe_seal_version(self._file)
        self._zeros = np.zeros(self.layout.num_coefficients, dtype=np.uint64)
        self._lock = threading.Lock()

    @property
    def seal_version(self) -> tuple[int, int]:
        """SEAL's serialisation version, read at start-up."""
        return self._version

    def encrypt(self, values: npt.NDArray[np.float64]) -> bytes:
        """The upload chunk of at most N reals (already weighted and tagged)."""
        part = np.asarray(values, dtype=np.float64)
        if part.ndim != 1 or not 1 <= part.shape[0] <= self.layout.values_per_chunk:
            raise ValueError(f"a chunk holds 1 to {self.layout.values_per_chunk} values")
        if part.shape[0] % 2:
            part = np.append(part, 0.0)
        slots = np.ascontiguousarray(part).view(np.complex128)
        with self._lock:
            plaintext = sealapi.Plaintext()
            self._encoder.encode(slots.tolist(), self.layout.scale, plaintext)
            saved = self._file.save(self._encryptor.encrypt_symmetric(plaintext))
            upload = parse_seeded(saved, self.layout, self._version)
        return upload.to_bytes(self.layout)

    def read(self, chunk: bytes) -> AggregateChunk:
        """Parse an aggregate chunk (cheap: before deciding to decrypt it).

        Raises :class:`WireFormatError` (``update.undecodable_chunk``,
        ``update.parameter_mismatch``) for a chunk that is not a canonical aggregate of
        this context.
        """
        return AggregateChunk.from_bytes(self.layout, chunk)

    def decrypt(self, chunk: bytes | AggregateChunk) -> tuple[npt.NDArray[np.float64], int]:
        """The N reals an aggregate chunk decrypts to, and how many uploads it sums.

        Costs one SEAL load per summed upload. Raises as :meth:`read`. The values are the
        raw CKKS decryption: the caller rounds them.
        """
        aggregate = chunk if isinstance(chunk, AggregateChunk) else self.read(chunk)
        with self._lock:
            try:
                total = self._load(aggregate.c0, aggregate, 0)
                for index in range(1, len(aggregate.seeds)):
                    self._evaluator.add_inplace(total, self._load(self._zeros, aggregate, index))
            except (RuntimeError, ValueError, TypeError) as exc:
                raise WireFormatError(
                    f"SEAL refuses the aggregate chunk ({type(exc).__name__})",
                    code="update.undecodable_chunk",
                ) from None
            plaintext = sealapi.Plaintext()
            self._decryptor.decrypt(total, plaintext)
            slots = np.asarray(self._encoder.decode_complex(plaintext), dtype=np.complex128)
        return slots.view(np.float64), len(aggregate.seeds)

    def _load(
        self, c0: npt.NDArray[np.uint64], aggregate: AggregateChunk, index: int
    ) -> sealapi.Ciphertext:
        ciphertext = sealapi.Ciphertext()
        data = build_seeded(self.layout, c0, aggregate.seeds[index], self._version)
        self._file.load(ciphertext, self._seal, data)
        return ciphertext
