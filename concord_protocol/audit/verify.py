"""End-to-end verification of the audit log: every leaf, every root, every signature.

:func:`verify_export` checks an export (a file, or the live log via
:func:`consortium_server.audit.verify.verify_live`):

1. entries: indices dense from 0; each leaf hash recomputed from the exact entry bytes
   and compared with the stored one; each entry decodes and is in canonical form;
2. heads: the server's signature (with the key the caller trusts), and that each head's
   root equals the root recomputed from the entry bytes for that prefix;
3. cosignatures: each site's signature with a key the verifier trusts, that the cosigned
   root equals the recomputed root of that prefix (so a log rewritten and re-signed with
   the server's key is still caught by the witnesses' older cosignatures), and, for version
   2, that it names this log, the trusted server key and a signed head, and was made after
   that head;
4. the quorum the verifier asks for: the latest valid head must carry that many valid
   version 2 cosignatures of distinct sites (a log whose cosignatures were dropped or
   re-made with other keys fails), and an expected tree size or root given out of band
   must match (a truncated export fails).

Keys and quorum come from the caller: an export names keys too, but whoever rewrote the
log could have replaced them, so they are used only when the caller passes none, and the
report says so (``keys_from_export``).

It never stops at the first problem: the report lists every problem with its kind and
index (or tree size / site). A clean report has no problems and gives the counts.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from concord_protocol.audit.cosignatures import CLOCK_SKEW, Cosignature, verify_cosignature
from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.heads import decode_public_key, key_id, verify_tree_head
from concord_protocol.audit.merkle import EMPTY_ROOT, MerkleAccumulator, leaf_hash
from concord_protocol.errors import AuditVerificationError
from concord_protocol.fields import format_utc, utcnow

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
    COSIGNATURE_WRONG_LOG = "cosignature_wrong_log"
    COSIGNATURE_WRONG_KEY = "cosignature_wrong_key"
    COSIGNATURE_TIME_INVALID = "cosignature_time_invalid"
    QUORUM_NOT_MET = "quorum_not_met"
    EXPORT_TRUNCATED = "export_truncated"
    EXPECTED_ROOT_MISMATCH = "expected_root_mismatch"


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
    legacy_cosignatures: int = Field(
        default=0, description="Valid version 1 cosignatures (they count towards no quorum)."
    )
    log_id: str | None = None
    witness_quorum: int | None = None
    quorum_enforced: bool = Field(
        default=False, description="The quorum was the caller's, so missing it is a problem."
    )
    keys_from_export: bool = Field(
        default=False, description="Some keys were taken from the export (not trusted)."
    )
    witnessed_size: int | None = Field(
        default=None, description="Largest head size with a quorum of valid cosignatures."
    )
    unwitnessed_entries: int = Field(
        default=0, description="Entries after the largest witnessed head (quorum set)."
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


def _raw(value: str) -> bytes | str:
    """A key's raw bytes, to compare keys however their base64 was written."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value


def _site_keys(keys: Mapping[str, str | Sequence[str]]) -> dict[str, list[Ed25519PublicKey]]:
    """Each site's valid keys (a site that rotated its key has several)."""
    loaded: dict[str, list[Ed25519PublicKey]] = {}
    for site_id, value in keys.items():
        texts = [value] if isinstance(value, str) else list(value)
        loaded[site_id] = [k for k in (_load_key(t) for t in texts) if k is not None]
    return loaded


def _verifier(cosignature: Cosignature, keys: Sequence[Ed25519PublicKey]) -> bytes | None:
    """The raw bytes of the key among ``keys`` that the cosignature verifies with."""
    for key in keys:
        try:
            verify_cosignature(cosignature, key)
        except AuditVerificationError:
            continue
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return None


def verify_export(
    export: AuditExport,
    *,
    trusted_server_key: str | None = None,
    trusted_site_keys: Mapping[str, str | Sequence[str]] | None = None,
    quorum: int | None = None,
    log_id: str | None = None,
    expected_size: int | None = None,
    expected_root: str | None = None,
    now: datetime | None = None,
) -> VerificationReport:
    """Verify an export end to end and report every problem found.

    ``trusted_server_key`` / ``trusted_site_keys`` (base64 raw Ed25519; a site may have
    several) are keys the verifier obtained out of band; without them the keys inside the
    export are used, which proves integrity against the export's own keys only
    (``keys_from_export``). ``quorum``: the latest valid head must carry this many valid
    version 2 cosignatures of distinct sites (``quorum_not_met`` otherwise); without it the
    export's ``witness_quorum`` only sets ``witnessed_size``. ``log_id`` defaults to the
    export's. ``expected_size`` / ``expected_root``: the log must hold at least that many
    entries, and the root of that prefix (of the whole log without a size) must be that.
    ``now`` (default: the clock) bounds cosignature times.
    """
    if quorum is not None and quorum < 1:
        raise ValueError("a quorum must be at least 1")
    if quorum is not None and trusted_site_keys is None:
        raise ValueError("a quorum means nothing without site keys the caller trusts")
    if expected_size is not None and expected_size < 0:
        raise ValueError("an expected tree size cannot be negative")
    problems: list[Problem] = []
    report = VerificationReport(
        entries=len(export.entries),
        heads=len(export.heads),
        cosignatures=len(export.cosignatures),
        witness_quorum=quorum if quorum is not None else export.witness_quorum,
        quorum_enforced=quorum is not None,
        log_id=log_id if log_id is not None else export.log_id,
        keys_from_export=trusted_server_key is None or trusted_site_keys is None,
    )
    moment = now if now is not None else utcnow()

    # -- keys ------------------------------------------------------------------------
    if trusted_server_key is not None and _raw(trusted_server_key) != _raw(
        export.server_public_key
    ):
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
    site_keys = _site_keys(
        trusted_site_keys
        if trusted_site_keys is not None
        else {s.site_id: s.signing_public_key for s in export.sites}
    )
    server_kid = key_id(server_key) if server_key is not None else None

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
    sizes = sorted(
        {h.tree_size for h in export.heads}
        | {c.tree_size for c in export.cosignatures}
        | ({expected_size} if expected_size is not None and expected_size >= 0 else set())
    )
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
    signed_heads = {(h.tree_size, h.root_hash): h for h in export.heads}
    head_times = {(h.tree_size, h.root_hash, h.key_id, h.timestamp) for h in export.heads}
    # Witnesses of each head, by the key that verified (one key under two site ids is one
    # witness).
    witnesses: dict[tuple[int, str], set[bytes]] = defaultdict(set)
    for cosig in export.cosignatures:

        def problem(kind: ProblemKind, message: str, cosig: Cosignature = cosig) -> None:
            problems.append(
                Problem(
                    kind=kind, tree_size=cosig.tree_size, site_id=cosig.site_id, message=message
                )
            )

        keys = site_keys.get(cosig.site_id, [])
        valid = True
        signer = _verifier(cosig, keys) if keys else None
        if not keys:
            valid = False
            problem(
                ProblemKind.COSIGNATURE_UNKNOWN_SITE, "No valid signing key is known for this site."
            )
        elif signer is None:
            valid = False
            problem(ProblemKind.COSIGNATURE_INVALID, "The site's cosignature does not verify.")
        if cosig.tree_size > len(leaves):
            valid = False
            problem(
                ProblemKind.COSIGNATURE_BEYOND_LOG,
                f"A site cosigned {cosig.tree_size} entries; the log has {len(leaves)}.",
            )
        elif roots[cosig.tree_size] != cosig.root_hash:
            valid = False
            problem(
                ProblemKind.COSIGNATURE_ROOT_MISMATCH,
                "The entries no longer hash to the root this site cosigned.",
            )
        if cosig.version == 2:
            if cosig.log_id != report.log_id:
                valid = False
                problem(
                    ProblemKind.COSIGNATURE_WRONG_LOG,
                    f"The cosignature is for the log {cosig.log_id!r}, not {report.log_id!r}.",
                )
            if server_kid is not None and cosig.key_id != server_kid:
                valid = False
                problem(
                    ProblemKind.COSIGNATURE_WRONG_KEY,
                    "The cosigned head names another server key than the trusted one.",
                )
            assert cosig.head_timestamp is not None  # version 2
            key = (cosig.tree_size, cosig.root_hash, cosig.key_id, cosig.head_timestamp)
            if key not in head_times:
                valid = False
                problem(
                    ProblemKind.COSIGNATURE_UNKNOWN_HEAD,
                    "The cosigned head (size, root, key, time) is not among the signed heads.",
                )
            try:
                in_time = (
                    cosig.head_timestamp - CLOCK_SKEW <= cosig.timestamp <= moment + CLOCK_SKEW
                )
            except OverflowError:  # a time at the edge of the calendar is no real time
                in_time = False
            if not in_time:
                valid = False
                problem(
                    ProblemKind.COSIGNATURE_TIME_INVALID,
                    f"Cosigned at {format_utc(cosig.timestamp)}, before the head it cosigns "
                    f"({format_utc(cosig.head_timestamp)}) or after now.",
                )
        elif (cosig.tree_size, cosig.root_hash) not in signed_heads:
            problem(
                ProblemKind.COSIGNATURE_UNKNOWN_HEAD,
                "The cosigned head is not among the signed heads.",
            )
        if valid and cosig.version == 1:
            report.legacy_cosignatures += 1
        elif valid and signer is not None:
            witnesses[(cosig.tree_size, cosig.root_hash)].add(signer)

    # -- quorum and what the caller expects ---------------------------------------------
    latest_valid = max(valid_heads, default=None)
    if report.witness_quorum is not None:
        witnessed = [
            size
            for (size, root), sites in witnesses.items()
            if len(sites) >= report.witness_quorum and (size, root) in valid_heads
        ]
        report.witnessed_size = max(witnessed) if witnessed else None
        report.unwitnessed_entries = len(leaves) - (report.witnessed_size or 0)
        if report.quorum_enforced:
            cosigners = len(witnesses.get(latest_valid, set())) if latest_valid else 0
            if latest_valid is None or cosigners < report.witness_quorum:
                problems.append(
                    Problem(
                        kind=ProblemKind.QUORUM_NOT_MET,
                        tree_size=latest_valid[0] if latest_valid else None,
                        message=(
                            f"The latest valid head has {cosigners} valid cosignature(s) of "
                            f"the {report.witness_quorum} asked for; "
                            f"{report.unwitnessed_entries} entries are not witnessed."
                            if latest_valid
                            else "No valid signed head: nothing is witnessed."
                        ),
                    )
                )
    if expected_size is not None and expected_size > len(leaves):
        problems.append(
            Problem(
                kind=ProblemKind.EXPORT_TRUNCATED,
                tree_size=expected_size,
                message=f"Expected at least {expected_size} entries; the export has {len(leaves)}.",
            )
        )
    elif expected_root is not None:
        actual = roots[expected_size] if expected_size is not None else report.root_hash
        if actual != expected_root.lower():
            problems.append(
                Problem(
                    kind=ProblemKind.EXPECTED_ROOT_MISMATCH,
                    tree_size=expected_size if expected_size is not None else len(leaves),
                    message="The log's root at that size is not the root expected.",
                )
            )

    report.problems = problems
    return report
