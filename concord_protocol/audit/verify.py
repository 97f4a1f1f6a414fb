"""End-to-end verification of the audit log: every leaf, every root, every signature.

:func:`verify_export` checks an export (a file, or the live log via
:func:`consortium_server.audit.verify.verify_live`):

1. entries: indices dense from 0; each leaf hash recomputed from the exact entry bytes
   and compared with the stored one; each entry decodes and is in canonical form;
2. heads: the server's signature (with the key the caller trusts), and that each head's
   root equals the root recomputed from the entry bytes for that prefix;
3. cosignatures: each site's signature with its key, and that the cosigned root equals the
   recomputed root of that prefix (so a log rewritten and re-signed with the server's key
   is still caught by the witnesses' older cosignatures).

It never stops at the first problem: the report lists every problem with its kind and
index (or tree size / site). A clean report has no problems and gives the counts.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Mapping
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from concord_protocol.audit.cosignatures import verify_cosignature
from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.heads import decode_public_key, verify_tree_head
from concord_protocol.audit.merkle import EMPTY_ROOT, MerkleAccumulator, leaf_hash
from concord_protocol.errors import AuditVerificationError

__all__ = ["Problem", "ProblemKind", "VerificationReport", "verify_export"]


class ProblemKind(StrEnum):
    """What verification found wrong (stable names, used in reports and tests)."""

    EXPORT_INVALID = "export_invalid"
    SERVER_KEY_UNTRUSTED = "server_key_untrusted"
    INDEX_GAP = "index_gap"
    INDEX_OUT_OF_ORDER = "index_out_of_order"
    ENTRY_UNREADABLE = "entry_unreadable"
    LEAF_HASH_MISMATCH = "leaf_hash_mismatch"
    ENTRY_INVALID = "entry_invalid"
    COLUMN_MISMATCH = "column_mismatch"
    HEAD_SIGNATURE_INVALID = "head_signature_invalid"
    HEAD_BEYOND_LOG = "head_beyond_log"
    HEAD_ROOT_MISMATCH = "head_root_mismatch"
    HEAD_OUT_OF_ORDER = "head_out_of_order"
    COSIGNATURE_UNKNOWN_SITE = "cosignature_unknown_site"
    COSIGNATURE_INVALID = "cosignature_invalid"
    COSIGNATURE_BEYOND_LOG = "cosignature_beyond_log"
    COSIGNATURE_ROOT_MISMATCH = "cosignature_root_mismatch"
    COSIGNATURE_UNKNOWN_HEAD = "cosignature_unknown_head"


class Problem(BaseModel):
    """One thing found wrong, located by entry ``index``, ``tree_size`` and/or ``site_id``."""

    model_config = ConfigDict(frozen=True)

    kind: ProblemKind
    message: str
    index: int | None = None
    tree_size: int | None = None
    site_id: str | None = None


class VerificationReport(BaseModel):
    """Result of a verification: counts, the recomputed root, and every problem."""

    entries: int = 0
    root_hash: str = EMPTY_ROOT.hex()
    heads: int = 0
    latest_head_size: int | None = None
    cosignatures: int = 0
    witness_quorum: int | None = None
    witnessed_size: int | None = Field(
        default=None, description="Largest head size with a quorum of valid cosignatures."
    )
    unsigned_entries: int = Field(default=0, description="Entries after the latest head.")
    problems: list[Problem] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def kinds(self) -> set[ProblemKind]:
        """The distinct kinds of problem found."""
        return {p.kind for p in self.problems}

    def summary(self) -> str:
        """One line for humans."""
        if self.ok:
            witnessed = (
                f", witnessed up to {self.witnessed_size}"
                if self.witnessed_size is not None
                else ""
            )
            return (
                f"OK: {self.entries} entries, {self.heads} signed heads, "
                f"{self.cosignatures} cosignatures verified{witnessed}; root {self.root_hash}"
            )
        return f"FAILED: {len(self.problems)} problem(s) in {self.entries} entries"


def _load_key(value: str) -> Ed25519PublicKey | None:
    try:
        return decode_public_key(value)
    except AuditVerificationError:
        return None


def verify_export(
    export: AuditExport,
    *,
    trusted_server_key: str | None = None,
    trusted_site_keys: Mapping[str, str] | None = None,
    quorum: int | None = None,
) -> VerificationReport:
    """Verify an export end to end and report every problem found.

    ``trusted_server_key`` / ``trusted_site_keys`` (base64 raw Ed25519) are keys the
    verifier obtained out of band; without them the keys inside the export are used
    (which proves integrity against the export's own keys only). ``quorum`` defaults to
    the export's ``witness_quorum``.
    """
    problems: list[Problem] = []
    report = VerificationReport(
        entries=len(export.entries),
        heads=len(export.heads),
        cosignatures=len(export.cosignatures),
        witness_quorum=quorum if quorum is not None else export.witness_quorum,
    )

    # -- keys ------------------------------------------------------------------------
    if trusted_server_key is not None and trusted_server_key != export.server_public_key:
        problems.append(
            Problem(
                kind=ProblemKind.SERVER_KEY_UNTRUSTED,
                message="The export names a server key other than the trusted one.",
            )
        )
    server_key = _load_key(trusted_server_key or export.server_public_key)
    if server_key is None:
        problems.append(
            Problem(kind=ProblemKind.EXPORT_INVALID, message="The server key is not Ed25519.")
        )
    site_keys = (
        dict(trusted_site_keys)
        if trusted_site_keys is not None
        else {s.site_id: s.signing_public_key for s in export.sites}
    )

    # -- entries ---------------------------------------------------------------------
    leaves: list[bytes] = []
    previous = -1
    for item in export.entries:
        if item.index > previous + 1:
            problems.append(
                Problem(
                    kind=ProblemKind.INDEX_GAP,
                    index=previous + 1,
                    message=f"Entries {previous + 1}..{item.index - 1} are missing.",
                )
            )
        elif item.index <= previous:
            problems.append(
                Problem(
                    kind=ProblemKind.INDEX_OUT_OF_ORDER,
                    index=item.index,
                    message=f"Entry {item.index} appears after entry {previous}.",
                )
            )
        previous = max(previous, item.index)
        try:
            data = base64.b64decode(item.entry_b64, validate=True)
        except (binascii.Error, ValueError):
            problems.append(
                Problem(
                    kind=ProblemKind.ENTRY_UNREADABLE,
                    index=item.index,
                    message="Entry bytes are not base64.",
                )
            )
            data = b""
        digest = leaf_hash(data)
        leaves.append(digest)
        if digest.hex() != item.leaf_hash:
            problems.append(
                Problem(
                    kind=ProblemKind.LEAF_HASH_MISMATCH,
                    index=item.index,
                    message="The stored leaf hash is not the hash of the entry bytes.",
                )
            )
        try:
            AuditEntry.from_canonical_bytes(data)
        except ValueError as exc:
            problems.append(
                Problem(
                    kind=ProblemKind.ENTRY_INVALID,
                    index=item.index,
                    message=f"The entry does not decode as a canonical audit entry: {exc}",
                )
            )

    # -- roots of every head and cosignature size, in one pass --------------------------
    sizes = sorted({h.tree_size for h in export.heads} | {c.tree_size for c in export.cosignatures})
    roots: dict[int, str] = {}
    accumulator = MerkleAccumulator()
    for size in sizes:
        if size > len(leaves):
            break
        while accumulator.size < size:
            accumulator.append(leaves[accumulator.size])
        roots[size] = accumulator.root().hex()
    while accumulator.size < len(leaves):
        accumulator.append(leaves[accumulator.size])
    report.root_hash = accumulator.root().hex()

    # -- heads -----------------------------------------------------------------------
    valid_heads: set[tuple[int, str]] = set()
    last_time = None
    for head in sorted(export.heads, key=lambda h: (h.tree_size, h.timestamp)):
        ok = True
        if server_key is not None:
            try:
                verify_tree_head(head, server_key)
            except AuditVerificationError:
                ok = False
                problems.append(
                    Problem(
                        kind=ProblemKind.HEAD_SIGNATURE_INVALID,
                        tree_size=head.tree_size,
                        message="The server's signature on this tree head does not verify.",
                    )
                )
        if head.tree_size > len(leaves):
            ok = False
            problems.append(
                Problem(
                    kind=ProblemKind.HEAD_BEYOND_LOG,
                    tree_size=head.tree_size,
                    message=f"A signed head covers {head.tree_size} entries; the log has "
                    f"{len(leaves)} (entries were removed from the end).",
                )
            )
        elif roots[head.tree_size] != head.root_hash:
            ok = False
            problems.append(
                Problem(
                    kind=ProblemKind.HEAD_ROOT_MISMATCH,
                    tree_size=head.tree_size,
                    message="The entries no longer hash to this signed head's root.",
                )
            )
        if last_time is not None and head.timestamp < last_time:
            problems.append(
                Problem(
                    kind=ProblemKind.HEAD_OUT_OF_ORDER,
                    tree_size=head.tree_size,
                    message="A larger tree head was signed earlier than a smaller one.",
                )
            )
        last_time = head.timestamp if last_time is None else max(last_time, head.timestamp)
        if ok:
            valid_heads.add((head.tree_size, head.root_hash))
    if export.heads:
        report.latest_head_size = max(h.tree_size for h in export.heads)
        report.unsigned_entries = max(0, len(leaves) - report.latest_head_size)
    else:
        report.unsigned_entries = len(leaves)

    # -- cosignatures ----------------------------------------------------------------
    head_keys = {(h.tree_size, h.root_hash) for h in export.heads}
    witnesses: dict[tuple[int, str], set[str]] = defaultdict(set)
    for cosig in export.cosignatures:
        key_text = site_keys.get(cosig.site_id)
        site_key = _load_key(key_text) if key_text is not None else None
        valid = True
        if site_key is None:
            valid = False
            problems.append(
                Problem(
                    kind=ProblemKind.COSIGNATURE_UNKNOWN_SITE,
                    tree_size=cosig.tree_size,
                    site_id=cosig.site_id,
                    message="No valid signing key is known for this site.",
                )
            )
        else:
            try:
                verify_cosignature(cosig, site_key)
            except AuditVerificationError:
                valid = False
                problems.append(
                    Problem(
                        kind=ProblemKind.COSIGNATURE_INVALID,
                        tree_size=cosig.tree_size,
                        site_id=cosig.site_id,
                        message="The site's cosignature does not verify.",
                    )
                )
        if cosig.tree_size > len(leaves):
            valid = False
            problems.append(
                Problem(
                    kind=ProblemKind.COSIGNATURE_BEYOND_LOG,
                    tree_size=cosig.tree_size,
                    site_id=cosig.site_id,
                    message=f"A site cosigned {cosig.tree_size} entries; the log has "
                    f"{len(leaves)}.",
                )
            )
        elif roots[cosig.tree_size] != cosig.root_hash:
            valid = False
            problems.append(
                Problem(
                    kind=ProblemKind.COSIGNATURE_ROOT_MISMATCH,
                    tree_size=cosig.tree_size,
                    site_id=cosig.site_id,
                    message="The entries no longer hash to the root this site cosigned.",
                )
            )
        if (cosig.tree_size, cosig.root_hash) not in head_keys:
            problems.append(
                Problem(
                    kind=ProblemKind.COSIGNATURE_UNKNOWN_HEAD,
                    tree_size=cosig.tree_size,
                    site_id=cosig.site_id,
                    message="The cosigned head is not among the signed heads.",
                )
            )
        if valid:
            witnesses[(cosig.tree_size, cosig.root_hash)].add(cosig.site_id)
    if report.witness_quorum is not None:
        witnessed = [
            size
            for (size, root), sites in witnesses.items()
            if len(sites) >= report.witness_quorum and (size, root) in valid_heads
        ]
        report.witnessed_size = max(witnessed) if witnessed else None

    report.problems = problems
    return report
