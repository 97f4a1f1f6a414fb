"""RFC 9162 hashing and proofs: known vectors, pymerkle cross-checks, every mutation rejected."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from pymerkle import InmemoryTree
from pymerkle import verify_consistency as pymerkle_verify_consistency

from concord_protocol.audit.merkle import (
    EMPTY_ROOT,
    InvalidProofError,
    MerkleAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

MAX_N = 40
# Leaf data and roots from the Certificate Transparency reference tests (RFC 6962/9162).
CT_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_LEAF_HASHES = [leaf_hash(bytes.fromhex(d)) for d in CT_LEAVES]

ENTRIES = [f"entry-{i}".encode() for i in range(MAX_N)]
LEAVES = [leaf_hash(e) for e in ENTRIES]
ROOTS = [root_hash(LEAVES[:n]) for n in range(MAX_N + 1)]


@pytest.fixture(scope="module")
def pymerkle_tree() -> InmemoryTree:
    tree = InmemoryTree(algorithm="sha256")  # security on: 0x00 / 0x01 prefixes
    for entry in ENTRIES:
        tree.append_entry(entry)
    return tree


def test_hashing_is_rfc9162() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert root_hash([]) == EMPTY_ROOT
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert (
        node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )


@pytest.mark.parametrize("size", range(1, 9))
def test_certificate_transparency_root_vectors(size: int) -> None:
    assert root_hash(CT_LEAF_HASHES[:size]).hex() == CT_ROOTS[size - 1]


def test_certificate_transparency_proof_vectors() -> None:
    h = bytes.fromhex
    path_0_8 = [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]
    assert inclusion_proof(CT_LEAF_HASHES, 0) == path_0_8
    assert consistency_proof(CT_LEAF_HASHES, 1) == path_0_8
    assert consistency_proof(CT_LEAF_HASHES, 6) == [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]
    assert consistency_proof(CT_LEAF_HASHES[:5], 2) == [
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]


def test_roots_equal_pymerkle_and_accumulator(pymerkle_tree: InmemoryTree) -> None:
    assert pymerkle_tree.get_root(0) == EMPTY_ROOT
    accumulator = MerkleAccumulator()
    assert accumulator.root() == EMPTY_ROOT
    for n in range(1, MAX_N + 1):
        accumulator.append(LEAVES[n - 1])
        assert pymerkle_tree.get_leaf(n) == LEAVES[n - 1]
        assert pymerkle_tree.get_root(n) == ROOTS[n] == accumulator.root()


def test_inclusion_paths_equal_pymerkle(pymerkle_tree: InmemoryTree) -> None:
    for n in range(1, MAX_N + 1):
        for i in range(n):
            # pymerkle's path is [leaf, *RFC 9162 audit path]; its indices count from 1.
            assert pymerkle_tree.prove_inclusion(i + 1, n).path[1:] == inclusion_proof(
                LEAVES[:n], i
            )


def test_consistency_agrees_with_pymerkle(pymerkle_tree: InmemoryTree) -> None:
    # pymerkle's consistency proofs have their own layout; both must accept the same roots.
    for n in range(1, MAX_N + 1):
        for m in range(1, n + 1):
            theirs = pymerkle_tree.prove_consistency(m, n)
            pymerkle_verify_consistency(ROOTS[m], ROOTS[n], theirs)
            verify_consistency(m, n, ROOTS[m], ROOTS[n], consistency_proof(LEAVES[:n], m))


def _flip(data: bytes, bit: int = 0) -> bytes:
    return bytes([data[0] ^ (1 << bit)]) + data[1:]


def _rejects(check: Callable[[], None]) -> bool:
    try:
        check()
    except InvalidProofError:
        return True
    return False


def test_every_inclusion_proof_verifies_and_every_mutation_is_rejected() -> None:
    for n in range(1, MAX_N + 1):
        root = ROOTS[n]
        for i in range(n):
            proof = inclusion_proof(LEAVES[:n], i)
            verify_inclusion(LEAVES[i], i, n, proof, root)

            def rejected(leaf: bytes, index: int, size: int, path: list[bytes], r: bytes) -> bool:
                return _rejects(lambda: verify_inclusion(leaf, index, size, path, r))

            for k in range(len(proof)):  # flip a bit in each proof hash
                mutated = list(proof)
                mutated[k] = _flip(mutated[k], k % 8)
                assert rejected(LEAVES[i], i, n, mutated, root), (n, i, k)
            assert rejected(_flip(LEAVES[i]), i, n, proof, root)  # another leaf
            for wrong in (i - 1, i + 1):  # wrong index
                assert rejected(LEAVES[i], wrong, n, proof, root), (n, i, wrong)
            for size in (n - 1, n + 1):  # wrong size, with that size's real root
                if 1 <= size <= MAX_N:
                    assert rejected(LEAVES[i], i, size, proof, ROOTS[size]), (n, i, size)
            if proof:  # truncated, from either end
                assert rejected(LEAVES[i], i, n, proof[:-1], root)
                assert rejected(LEAVES[i], i, n, proof[1:], root)
            assert rejected(LEAVES[i], i, n, [*proof, LEAVES[0]], root)  # extended
            assert rejected(LEAVES[i], i, n, proof, ROOTS[n - 1])  # swapped root
            assert rejected(LEAVES[i], i, n, proof, _flip(root, 7))
            if proof:  # a truncated hash
                assert rejected(LEAVES[i], i, n, [proof[0][:31], *proof[1:]], root)


def test_every_consistency_proof_verifies_and_every_mutation_is_rejected() -> None:
    for n in range(1, MAX_N + 1):
        for m in range(0, n + 1):
            proof = consistency_proof(LEAVES[:n], m)
            verify_consistency(m, n, ROOTS[m], ROOTS[n], proof)
            if m in (0, n):
                assert proof == []
                if m == n and n > 1:
                    r1, r2 = ROOTS[n - 1], ROOTS[n]
                    assert _rejects(lambda: verify_consistency(m, m, r1, r2, []))  # noqa: B023
                continue

            def rejected(first: int, second: int, r1: bytes, r2: bytes, path: list[bytes]) -> bool:
                return _rejects(lambda: verify_consistency(first, second, r1, r2, path))

            for k in range(len(proof)):
                mutated = list(proof)
                mutated[k] = _flip(mutated[k], k % 8)
                assert rejected(m, n, ROOTS[m], ROOTS[n], mutated), (m, n, k)
            for first in (m - 1, m + 1):  # wrong first size (with its real root)
                if 0 <= first <= n:
                    assert rejected(first, n, ROOTS[first], ROOTS[n], proof), (m, n, first)
            for second in (n - 1, n + 1):  # wrong second size
                if m <= second <= MAX_N:
                    assert rejected(m, second, ROOTS[m], ROOTS[second], proof), (m, n, second)
            assert rejected(m, n, ROOTS[m], ROOTS[n], proof[:-1])  # truncated
            assert rejected(m, n, ROOTS[m], ROOTS[n], proof[1:])
            assert rejected(m, n, ROOTS[m], ROOTS[n], [*proof, LEAVES[0]])  # extended
            assert rejected(m, n, ROOTS[n], ROOTS[m], proof)  # swapped roots
            assert rejected(m, n, _flip(ROOTS[m]), ROOTS[n], proof)
            assert rejected(m, n, ROOTS[m], _flip(ROOTS[n]), proof)
            assert rejected(n, m, ROOTS[n], ROOTS[m], proof)  # swapped sizes


def test_bad_arguments_are_rejected() -> None:
    proof = inclusion_proof(LEAVES[:4], 1)
    assert _rejects(lambda: verify_inclusion(LEAVES[1], 4, 4, proof, ROOTS[4]))
    assert _rejects(lambda: verify_inclusion(LEAVES[1], -1, 4, proof, ROOTS[4]))
    assert _rejects(lambda: verify_inclusion(LEAVES[1], 1, 0, [], EMPTY_ROOT))
    assert _rejects(lambda: verify_inclusion(LEAVES[1], 1, 4, [b"\x00" * 32] * 200, ROOTS[4]))
    assert _rejects(lambda: verify_consistency(0, 3, ROOTS[1], ROOTS[3], []))
    assert _rejects(lambda: verify_consistency(2, 3, ROOTS[2], ROOTS[3], []))
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(LEAVES[:3], 3)
    with pytest.raises(ValueError, match="outside"):
        consistency_proof(LEAVES[:3], 4)
