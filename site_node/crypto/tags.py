"""Secret integrity tags inside the ciphertexts: an aggregate the server cannot forge.

The server adds ciphertexts it cannot read, so it could add anything else too: a plaintext
of its choice (anyone can encrypt with the public context), another round's ciphertext,
one site's update alone. The manifest says which signed contributions an aggregate claims
to sum (:mod:`concord_protocol.contributions`); the tags make the ciphertexts prove it.

Every CKKS chunk of a site's update ends with ``k`` (:data:`CKKS_TAG_SLOTS`) tag slots. For
chunk ``c`` of round ``r`` of the study, a site ``s`` whose weighted values in that chunk
are ``x`` puts in slot ``j``::

    t_j = sum_i a[r, c, j, i] * x_i  +  b[r, c, s, j]

with coefficients ``a`` uniform in ``[-1, 1) / len(x)`` and per-site terms ``b`` uniform in
``[-1, 1)``, both drawn from a PRF (ChaCha20) keyed by a key derived (HKDF) from the study's
*secret* context: every roster site can compute them, the server cannot. The tags are
linear in ``x``, so they survive the blind sum: the aggregate of the listed sites ``S``
holds ``a . X + sum_{s in S} b[s]`` where ``X`` is the sum of their values. A site decrypts
the aggregate, recomputes that from the decrypted values and the manifest's site list, and
refuses the aggregate when a slot is off by more than :data:`TOLERANCE_GRIDS` rounding grids:

* a plaintext ``p`` added to a chunk shifts the tag check by ``a . p - p_tags``, which
  for coefficients the adder does not know is large unless ``p`` is (``docs/threat-model.md``
  gives the figures);
* a listed contribution dropped, an unlisted one added, or another round's, chunk's or
  study's contribution swapped in leaves a per-site term ``b`` (drawn per round and chunk)
  missing or unmatched: off by about 0.5 against a tolerance of about ``5e-7``.

The check costs ``k`` dot products per chunk at the site and ``k`` slots per ciphertext
(``4 / 4096`` of the bytes at the default parameters); ``benchmarks/round_integrity.py``
measures it. Plain (encryption-off) studies carry no tags: their server reads every update.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from concord_protocol.errors import CryptoError
from concord_protocol.wire.format import CKKS_TAG_SLOTS, RoundInfo
from site_node.errors import SiteError

__all__ = ["CKKS_TAG_SLOTS", "TOLERANCE_GRIDS", "AggregateIntegrityError", "AggregateTags"]

_TAG_INFO = b"concord/aggregate-tags/v1"
#: Rounding grids a tag may be off by in an honest aggregate. Decryption rounds every slot
#: to the grid, so each decrypted value is off by at most half a grid plus the CKKS noise
#: (about 2**-10 of a grid): the tag recomputed from the values is off by at most half a
#: grid (the coefficients sum to at most 1 in magnitude), the decrypted tag slot by another
#: half. One grid of margin on top of that bound.
TOLERANCE_GRIDS = 2.0


class AggregateIntegrityError(SiteError, CryptoError):
    """The aggregate does not sum the contributions it lists (``aggregate.integrity_failed``)."""

    code = "aggregate.integrity_failed"


def _uniform(key: bytes, label: bytes, count: int) -> npt.NDArray[np.float64]:
    """``count`` PRF values uniform in [-1, 1), for the domain-separated ``label``."""
    nonce = hashlib.sha256(label).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8")
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0


def _label(kind: bytes, info: RoundInfo, chunk: int, site_id: str = "") -> bytes:
    return b"\x00".join(
        (
            kind,
            info.study_id.encode(),
            info.contract_hash.encode(),
            struct.pack(">QQ", info.round_number, chunk),
            site_id.encode(),
        )
    )


class AggregateTags:
    """The tag coefficients and per-site terms of one study (from its secret context)."""

    def __init__(self, secret_context: bytes, *, slots: int = CKKS_TAG_SLOTS) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_TAG_INFO).derive(
            bytes(secret_context)
        )

    def coefficients(self, info: RoundInfo, chunk: int, length: int) -> npt.NDArray[np.float64]:
        """``a``: a (slots, length) matrix for ``chunk`` of the round ``info`` names."""
        if length < 1:
            raise ValueError("length must be >= 1")
        values = _uniform(self._key, _label(b"a", info, chunk), self.slots * length)
        return values.reshape(self.slots, length) / float(length)

    def site_term(self, info: RoundInfo, chunk: int, site_id: str) -> npt.NDArray[np.float64]:
        """``b``: the per-site term of ``site_id`` in ``chunk`` (``slots`` values)."""
        return _uniform(self._key, _label(b"b", info, chunk, site_id), self.slots)

    def tag(
        self, values: npt.NDArray[np.float64], info: RoundInfo, chunk: int, site_id: str
    ) -> npt.NDArray[np.float64]:
        """The tag slots a site appends to its weighted ``values`` of ``chunk``."""
        a = self.coefficients(info, chunk, values.shape[0])
        return np.asarray(a @ values + self.site_term(info, chunk, site_id), dtype=np.float64)

    def deviation(
        self,
        values: npt.NDArray[np.float64],
        tags: npt.NDArray[np.float64],
        info: RoundInfo,
        chunk: int,
        sites: Sequence[str],
    ) -> float:
        """How far the decrypted ``tags`` of an aggregate chunk are from what ``values``
        summed over ``sites`` should give (largest absolute difference over the slots)."""
        expected = self.coefficients(info, chunk, values.shape[0]) @ values
        for site_id in sites:
            expected = expected + self.site_term(info, chunk, site_id)
        return float(np.max(np.abs(expected - tags)))

    def check(
        self,
        values: npt.NDArray[np.float64],
        tags: npt.NDArray[np.float64],
        info: RoundInfo,
        chunk: int,
        sites: Sequence[str],
        *,
        grid: float,
    ) -> None:
        """Raise :class:`AggregateIntegrityError` unless the chunk sums exactly ``sites``."""
        off = self.deviation(values, tags, info, chunk, sites)
        if not off <= TOLERANCE_GRIDS * grid:  # also refuses NaN
            # How far off stays here: the refusal travels to the server in the error reply,
            # and a deviation there would be a readout of whatever the server added (a
            # chosen plaintext), from which it could learn the round's secret tag
            # coefficients and forge an aggregate they accept.
            raise AggregateIntegrityError(
                f"chunk {chunk} of the round {info.round_number} aggregate does not sum the "
                f"{len(sites)} contributions it lists: a value was added, or a contribution "
                "dropped or swapped",
            )
