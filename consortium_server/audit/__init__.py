"""Tamper-evident audit log: RFC 9162 Merkle tree, signed tree heads, site witnesses.

Public names for the rest of the code base; see the modules for details:
``entries`` (what is logged), ``log`` (append, proofs), ``heads`` (signing),
``witness`` (site cosigning), ``verify`` / ``export`` (end-to-end checks), ``router``.
"""

from __future__ import annotations

from consortium_server.audit.entries import (
    Actor,
    AuditEntry,
    AuditObject,
    Outcome,
    PolicyDecision,
    PolicyRef,
)
from consortium_server.audit.heads import SignedTreeHead, TreeHeadSigner
from consortium_server.audit.log import AppendedEntry, AuditLog
from consortium_server.audit.verify import VerificationReport, verify_export, verify_live
from consortium_server.audit.witness import Cosignature, Witness, WitnessRefusedError

__all__ = [
    "Actor",
    "AppendedEntry",
    "AuditEntry",
    "AuditLog",
    "AuditObject",
    "Cosignature",
    "Outcome",
    "PolicyDecision",
    "PolicyRef",
    "SignedTreeHead",
    "TreeHeadSigner",
    "VerificationReport",
    "Witness",
    "WitnessRefusedError",
    "verify_export",
    "verify_live",
]
