"""The published audit-format vectors (``docs/audit-vectors.json``) are what the code
computes, and a verifier written from ``docs/audit-format.md`` alone reproduces each one.

The second half uses only the primitives the document names (SHA-256, Ed25519, the JSON
layouts) and the RFC 9162 algorithms written out again here, never Concord's own Merkle
or message code: a third party's verifier in miniature.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from concord_protocol.audit.vectors import build_vectors

DOCS = Path(__file__).resolve().parents[4] / "docs"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    published: dict[str, Any] = json.loads((DOCS / "audit-vectors.json").read_text("utf-8"))
    return published


def test_the_published_vectors_are_what_the_code_computes(vectors: dict[str, Any]) -> None:
    assert vectors == json.loads(json.dumps(build_vectors(), ensure_ascii=False)), (
        "docs/audit-vectors.json is stale: python -m concord_protocol.audit.vectors "
        "docs/audit-vectors.json"
    )


# --- an independent verifier, from the document ----------------------------------------------


def _jcs(value: Any) -> bytes:
    """RFC 8785 for the values the messages hold (strings, integers, objects): sorted keys,
    no whitespace, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _node(_mth(leaves[:k]), _mth(leaves[k:]))


def _root_from_inclusion(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        assert sn != 0
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    assert sn == 0
    return r


def _roots_from_consistency(
    first: int, second: int, first_root: bytes, path: list[bytes]
) -> tuple[bytes, bytes]:
    """RFC 9162 section 2.1.4.2: the two roots the proof commits to."""
    if first & (first - 1) == 0:  # a power of two: the first root starts the path
        path = [first_root, *path]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        assert sn != 0
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    assert sn == 0
    return fr, sr


def _public(seed_hex: str) -> Ed25519PublicKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key()


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_entries_are_canonical_json_and_leaves_hash_them(vectors: dict[str, Any]) -> None:
    for item in vectors["entries"]:
        data = item["entry_utf8"].encode("utf-8")
        assert _jcs(json.loads(data)) == data
        assert _leaf(data).hex() == item["leaf_hash"]
    leaves = [bytes.fromhex(e["leaf_hash"]) for e in vectors["entries"]]
    assert _node(leaves[0], leaves[1]).hex() == vectors["node_hash_of_leaves_0_1"]


def test_roots_and_proofs_follow_rfc_9162(vectors: dict[str, Any]) -> None:
    leaves = [bytes.fromhex(e["leaf_hash"]) for e in vectors["entries"]]
    roots = {int(n): bytes.fromhex(r) for n, r in vectors["roots"].items()}
    assert roots[0] == hashlib.sha256(b"").digest()
    for n, root in roots.items():
        assert _mth(leaves[:n]) == root
    for proof in vectors["inclusion_proofs"]:
        path = [bytes.fromhex(p) for p in proof["path"]]
        index, size = proof["index"], proof["tree_size"]
        assert _root_from_inclusion(index, size, leaves[index], path) == roots[size]
    for proof in vectors["consistency_proofs"]:
        path = [bytes.fromhex(p) for p in proof["path"]]
        m, n = proof["first"], proof["second"]
        assert _roots_from_consistency(m, n, roots[m], path) == (roots[m], roots[n])


def test_the_tree_head_message_and_signature(vectors: dict[str, Any]) -> None:
    keys, head = vectors["keys"], vectors["tree_head"]
    server = _public(keys["server_seed_hex"])
    assert base64.b64encode(_raw(server)).decode() == keys["server_public_key_b64"]
    assert hashlib.sha256(_raw(server)).hexdigest() == keys["server_key_id"] == head["key_id"]
    message = _jcs(
        {
            "type": "concord.audit.tree_head.v1",
            "key_id": head["key_id"],
            "tree_size": head["tree_size"],
            "root_hash": head["root_hash"],
            "timestamp": head["timestamp"],
        }
    )
    assert message == head["message_utf8"].encode()
    assert head["root_hash"] == vectors["roots"][str(head["tree_size"])]
    server.verify(base64.b64decode(head["signature"]), message)


def test_the_cosignature_message_and_signature(vectors: dict[str, Any]) -> None:
    keys, head, cosig = vectors["keys"], vectors["tree_head"], vectors["cosignature"]
    site = _public(keys["site_seed_hex"])
    assert base64.b64encode(_raw(site)).decode() == keys["site_public_key_b64"]
    message = _jcs(
        {
            "type": "concord.audit.cosignature.v2",
            "log_id": vectors["log_id"],
            "key_id": head["key_id"],
            "site_id": keys["site_id"],
            "tree_size": head["tree_size"],
            "root_hash": head["root_hash"],
            "head_timestamp": head["timestamp"],
            "timestamp": cosig["timestamp"],
        }
    )
    assert message == cosig["message_utf8"].encode()
    site.verify(base64.b64decode(cosig["signature"]), message)
    assert (cosig["log_id"], cosig["key_id"], cosig["head_timestamp"]) == (
        vectors["log_id"],
        head["key_id"],
        head["timestamp"],
    )


def test_the_document_quotes_the_vectors_it_explains(vectors: dict[str, Any]) -> None:
    doc = (DOCS / "audit-format.md").read_text("utf-8")
    for value in (
        vectors["entries"][0]["leaf_hash"],
        vectors["roots"]["7"],
        vectors["keys"]["server_key_id"],
        vectors["tree_head"]["message_utf8"],
        vectors["cosignature"]["message_utf8"],
    ):
        assert value in doc, value
