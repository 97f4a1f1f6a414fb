"""Test vectors of the audit-log format (``docs/audit-format.md``, ``docs/audit-vectors.json``).

:func:`build_vectors` computes them with this package's own code from fixed inputs: seven
entries, Ed25519 keys from fixed seeds (Ed25519 signing is deterministic, so signatures are
stable), fixed times. The test suite checks that the published file equals what the code
computes now, and recomputes every vector from the primitives alone (SHA-256, Ed25519, the
byte layouts the document gives), so the document, the file and the code cannot drift
apart. Regenerate the file with
``python -m concord_protocol.audit.vectors docs/audit-vectors.json``.
"""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from concord_protocol.audit.cosignatures import Cosignature, cosignature_message
from concord_protocol.audit.entries import Actor, AuditEntry, AuditObject, Outcome
from concord_protocol.audit.heads import encode_public_key, key_id, tree_head_message
from concord_protocol.audit.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
)

__all__ = ["SERVER_SEED", "SITE_SEED", "build_vectors", "vector_entries"]

#: Seeds of the vectors' keys (never use these anywhere else).
SERVER_SEED = bytes(range(32))
SITE_SEED = bytes(range(32, 64))
_T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LOG_ID = "concord.example.org/audit"


def vector_entries() -> list[AuditEntry]:
    """The seven entries the vectors hash (one with non-ASCII text and a nested object)."""
    actions = [
        "site.enrolled",
        "dataset.published",
        "study.submitted",
        "study.approved",
        "study.run_started",
        "round.aggregated",
        "release.published",
    ]
    return [
        AuditEntry(
            actor=Actor(subject=f"user-{n}", organisation="Hôpital A", roles=("data_steward",)),
            action=action,
            object=AuditObject(type="study", id=f"study-{n}"),
            outcome=Outcome.SUCCESS,
            at=_T0 + timedelta(seconds=n),
            request_id=f"req-{n}",
            source="consortium-server/api",
            details={"n": n, "nested": {"b": [1, 2.5, True, None], "a": "é"}},
        )
        for n, action in enumerate(actions)
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def build_vectors() -> dict[str, Any]:
    """Every vector, as the JSON document published in ``docs/audit-vectors.json``."""
    server = Ed25519PrivateKey.from_private_bytes(SERVER_SEED)
    site = Ed25519PrivateKey.from_private_bytes(SITE_SEED)
    server_kid = key_id(server.public_key())
    entries = [e.canonical_bytes() for e in vector_entries()]
    leaves = [leaf_hash(e) for e in entries]
    head_time = _T0 + timedelta(minutes=1)
    head_msg = tree_head_message(len(leaves), root_hash(leaves).hex(), head_time, server_kid)
    cosig_time = head_time + timedelta(seconds=30)
    cosig_msg = cosignature_message(
        log_id=LOG_ID,
        key_id=server_kid,
        site_id="hospital-a",
        tree_size=len(leaves),
        root_hash=root_hash(leaves).hex(),
        head_timestamp=head_time,
        timestamp=cosig_time,
    )
    cosig = Cosignature(
        site_id="hospital-a",
        tree_size=len(leaves),
        root_hash=root_hash(leaves).hex(),
        timestamp=cosig_time,
        signature=_b64(site.sign(cosig_msg)),
        log_id=LOG_ID,
        key_id=server_kid,
        head_timestamp=head_time,
    )
    return {
        "about": "Concord audit-log test vectors; see docs/audit-format.md.",
        "keys": {
            "server_seed_hex": SERVER_SEED.hex(),
            "server_public_key_b64": encode_public_key(server.public_key()),
            "server_key_id": server_kid,
            "site_id": "hospital-a",
            "site_seed_hex": SITE_SEED.hex(),
            "site_public_key_b64": encode_public_key(site.public_key()),
        },
        "log_id": LOG_ID,
        "entries": [
            {"index": i, "entry_utf8": e.decode("utf-8"), "leaf_hash": h.hex()}
            for i, (e, h) in enumerate(zip(entries, leaves, strict=True))
        ],
        "node_hash_of_leaves_0_1": node_hash(leaves[0], leaves[1]).hex(),
        "roots": {str(n): root_hash(leaves[:n]).hex() for n in range(len(leaves) + 1)},
        "inclusion_proofs": [
            {
                "index": i,
                "tree_size": n,
                "path": [p.hex() for p in inclusion_proof(leaves[:n], i)],
            }
            for i, n in ((0, 1), (2, 7), (6, 7), (4, 5))
        ],
        "consistency_proofs": [
            {"first": m, "second": n, "path": [p.hex() for p in consistency_proof(leaves[:n], m)]}
            for m, n in ((1, 7), (3, 7), (4, 7), (6, 7), (2, 5))
        ],
        "tree_head": {
            "tree_size": len(leaves),
            "root_hash": root_hash(leaves).hex(),
            "timestamp": head_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "key_id": server_kid,
            "message_utf8": head_msg.decode("utf-8"),
            "signature": _b64(server.sign(head_msg)),
        },
        "cosignature": {
            **cosig.model_dump(mode="json"),
            "message_utf8": cosig_msg.decode("utf-8"),
        },
    }


def main(argv: list[str]) -> int:
    """Write the vectors to ``argv[0]`` (standard output without an argument)."""
    text = json.dumps(build_vectors(), indent=1, ensure_ascii=False) + "\n"
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
