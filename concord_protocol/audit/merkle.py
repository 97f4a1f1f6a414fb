"""RFC 9162 Merkle tree hashing, proofs and proof verification (SHA-256).

A small, dependency-free module that both the server (proof generation) and the verifiers
(sites, ``consortium audit verify``) import. It follows RFC 9162 section 2.1 exactly:

* leaf hash ``SHA-256(0x00 || entry)``, node hash ``SHA-256(0x01 || left || right)``;
* the root of the empty tree is ``SHA-256("")``;
* ``MTH(D[n])`` splits at ``k``, the largest power of two smaller than ``n``;
* inclusion proofs are ``PATH(m, D[n])`` and consistency proofs ``PROOF(m, D[n])``, with
  the verification algorithms of sections 2.1.3.2 and 2.1.4.2 (including the final
  ``sn == 0`` checks that catch proofs presented for a wrong tree size).

Indices are zero-based, as in the RFC. Proof generation works on an in-memory sequence of
leaf hashes; the tests cross-check roots and proofs against pymerkle's RFC 9162 mode.
Verification functions raise :class:`InvalidProofError` and never return False.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from concord_protocol.errors import InvalidProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_PROOF_LENGTH",
    "InvalidProofError",
    "MerkleAccumulator",
    "SubtreeHash",
    "consistency_path",
    "consistency_proof",
    "fold_subtrees",
    "inclusion_path",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "perfect_subtrees",
    "root_from_inclusion_proof",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
#: Root hash of the empty tree: SHA-256 of the empty string (RFC 9162 2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()
#: Longest well-formed proof for trees of up to 2**64 leaves.
MAX_PROOF_LENGTH = 2 * 64
_MAX_TREE_SIZE = 1 << 64


def leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)``."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH over the leaf hashes ``hashes[start:end]`` (non-empty range)."""
    width = end - start
    if width == 1:
        return hashes[start]
    k = _split(width)
    return node_hash(_mth(hashes, start, start + k), _mth(hashes, start + k, end))


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of a sequence of leaf hashes (``EMPTY_ROOT`` when empty)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


#: ``subtree(start, end)``: the Merkle tree hash of the leaves ``[start, end)`` (non-empty).
SubtreeHash = Callable[[int, int], bytes]


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """``PATH(index, D[n])`` for the tree of all ``leaf_hashes`` (n = their count)."""
    return inclusion_path(lambda a, b: _mth(leaf_hashes, a, b), len(leaf_hashes), index)


def inclusion_path(subtree: SubtreeHash, size: int, index: int) -> list[bytes]:
    """``PATH(index, D[size])`` from any source of subtree hashes (a list of leaves, or the
    server's stored subtrees: see :func:`subtree_ranges`)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    # Walk from the root down, collecting siblings; the RFC lists them leaf first.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start += k
    path.reverse()
    return path


def consistency_proof(leaf_hashes: Sequence[bytes], first: int) -> list[bytes]:
    """``PROOF(first, D[n])``: the tree of size ``first`` is a prefix of all ``leaf_hashes``.

    The proof is empty when ``first`` is 0 or equals ``n``.
    """
    return consistency_path(lambda a, b: _mth(leaf_hashes, a, b), len(leaf_hashes), first)


def consistency_path(subtree: SubtreeHash, size: int, first: int) -> list[bytes]:
    """``PROOF(first, D[size])`` from any source of subtree hashes."""
    if not 0 <= first <= size:
        raise ValueError(f"size {first} is outside a tree of size {size}")
    if first in (0, size):
        return []
    siblings: list[bytes] = []
    start, end, m, complete = 0, size, first, True
    # Iterative SUBPROOF(m, D[start:end], complete), collecting siblings top-down.
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            siblings.append(subtree(start + k, end))
            end = start + k
        else:
            siblings.append(subtree(start, start + k))
            start += k
            m -= k
            complete = False
    base = [] if complete else [subtree(start, end)]
    # SUBPROOF lists the recursive part first: the base, then siblings bottom-up.
    return base + siblings[::-1]


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The range ``[start, end)`` of an RFC 9162 tree as the perfect subtrees whose hashes
    make up its Merkle tree hash, left to right, as ``(level, index)``: the subtree of
    ``2**level`` leaves starting at leaf ``index * 2**level``.

    ``start`` must be where the tree's own splits put a subtree (as in every range that
    :func:`inclusion_path` and :func:`consistency_path` ask for), so the list has at most
    one subtree per level: O(log n). :func:`fold_subtrees` combines their hashes.
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range [{start}, {end})")
    out: list[tuple[int, int]] = []
    while start < end:
        width = end - start
        k = 1 << (width.bit_length() - 1)  # the largest power of two <= width
        if start % k:
            raise ValueError(f"range [{start}, {end}) is not a subtree of an RFC 9162 tree")
        out.append((k.bit_length() - 1, start // k))
        start += k
    return out


def fold_subtrees(hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of a range from its :func:`perfect_subtrees` hashes (left to
    right): the right spine folds from the right, as the RFC's split puts it."""
    if not hashes:
        raise ValueError("no subtrees to fold")
    digest = hashes[-1]
    for left in reversed(hashes[:-1]):
        digest = node_hash(left, digest)
    return digest


def _check_hashes(proof: Sequence[bytes], *hashes: bytes) -> None:
    if len(proof) > MAX_PROOF_LENGTH:
        raise InvalidProofError("proof is too long")
    for item in (*proof, *hashes):
        if not isinstance(item, bytes) or len(item) != HASH_SIZE:
            raise InvalidProofError("proof or root contains a value that is not a SHA-256 hash")


def root_from_inclusion_proof(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 2.1.3.2, steps 1-5)."""
    if not (isinstance(index, int) and isinstance(tree_size, int)):
        raise InvalidProofError("index and tree size must be integers")
    if not 0 <= index < tree_size < _MAX_TREE_SIZE:
        raise InvalidProofError("leaf index is not inside the tree")
    _check_hashes(proof, leaf)
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            raise InvalidProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProofError("inclusion proof is too short for the tree size")
    return r


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` is at ``index`` in the tree of ``tree_size`` with ``root``."""
    _check_hashes((), root)
    computed = root_from_inclusion_proof(leaf, index, tree_size, proof)
    if not hmac.compare_digest(computed, root):
        raise InvalidProofError("inclusion proof does not lead to the root")


def verify_consistency(
    first_size: int,
    second_size: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Check that the tree (``first_size``, ``first_root``) is a prefix of the second one.

    RFC 9162 2.1.4.2. A tree of size 0 is a prefix of every tree (the proof must be empty
    and ``first_root`` must be the empty root); equal sizes need an empty proof and equal
    roots.
    """
    if not (isinstance(first_size, int) and isinstance(second_size, int)):
        raise InvalidProofError("tree sizes must be integers")
    if not 0 <= first_size <= second_size < _MAX_TREE_SIZE:
        raise InvalidProofError("first tree size must not exceed the second")
    _check_hashes(proof, first_root, second_root)
    if first_size == 0:
        if proof or not hmac.compare_digest(first_root, EMPTY_ROOT):
            raise InvalidProofError("a consistency proof from the empty tree must be empty")
        return
    if first_size == second_size:
        if proof:
            raise InvalidProofError("a consistency proof between equal sizes must be empty")
        if not hmac.compare_digest(first_root, second_root):
            raise InvalidProofError("trees of the same size have different roots")
        return
    if not proof:
        raise InvalidProofError("consistency proof is empty")
    path = list(proof)
    if first_size & (first_size - 1) == 0:  # exact power of two
        path.insert(0, first_root)
    fn, sn = first_size - 1, second_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProofError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProofError("consistency proof is too short for the tree sizes")
    if not hmac.compare_digest(fr, first_root):
        raise InvalidProofError("consistency proof does not lead to the first root")
    if not hmac.compare_digest(sr, second_root):
        raise InvalidProofError("consistency proof does not lead to the second root")


class MerkleAccumulator:
    """Streams leaf hashes and gives the root of every prefix in O(log n) memory.

    Keeps the roots of the maximal perfect subtrees (a "compact range" from the left
    edge). Verifiers use it to check many signed heads in one pass over the log.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self._size = 0

    @classmethod
    def from_frontier(cls, size: int, hashes: Sequence[bytes]) -> MerkleAccumulator:
        """Resume from the tree of ``size`` leaves given its :func:`perfect_subtrees`
        ``(0, size)`` hashes, left to right (what a server stores, checked against a
        signed root first)."""
        widths = [1 << level for level, _ in perfect_subtrees(0, size)] if size else []
        if len(widths) != len(hashes):
            raise ValueError(f"a tree of {size} leaves has {len(widths)} frontier subtrees")
        accumulator = cls()
        accumulator._stack = list(zip(widths, hashes, strict=True))
        accumulator._size = size
        return accumulator

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash."""
        width, digest = 1, leaf
        while self._stack and self._stack[-1][0] == width:
            left_width, left = self._stack.pop()
            digest = node_hash(left, digest)
            width += left_width
        self._stack.append((width, digest))
        self._size += 1

    def root(self) -> bytes:
        """Root of the tree of all leaves appended so far."""
        if not self._stack:
            return EMPTY_ROOT
        digest = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            digest = node_hash(left, digest)
        return digest
