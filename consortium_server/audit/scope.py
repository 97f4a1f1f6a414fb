"""Who may read which audit entry: audit reads are scoped like study reads.

Compliance officers and consortium admins read every entry. Data stewards and site nodes
read the entries of studies their site is part of (the rule of
:func:`consortium_server.studies.service.can_see_study`) and the consortium-wide ones
(site enrolments and revocations, dataset publications, policy versions), except a
consortium-wide entry that names a study they may not see (a revocation lists the studies
it aborted). Entries about refused sign-ins (object type ``endpoint``, with client
addresses), the compliance officer's report views (their filters name studies and users)
and any object type not listed here stay with the compliance officers: new kinds of entry
are hidden until someone decides they are consortium-wide. A hidden entry answers exactly
like a missing one (``audit.entry_not_found``).

What stays visible by construction: the log is one tree, so its size (every head) shows
that entries exist, and proofs carry the leaf hashes of hidden entries. A leaf hash is the
SHA-256 of the whole canonical entry (its time to the microsecond, request id, actor and
details), so confirming a guess needs the entry's every field.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.principals import Principal, Role
from consortium_server.studies.service import can_see_study

__all__ = ["CONSORTIUM_WIDE", "entry_visible"]

#: Object types every member organisation may read.
CONSORTIUM_WIDE = frozenset({"site", "dataset", "policy_set"})
#: Details that name studies, in consortium-wide entries.
_STUDY_LISTS = ("aborted_studies",)


def _named_studies(entry: AuditEntry) -> set[str]:
    named: set[str] = set()
    for key in _STUDY_LISTS:
        value = entry.details.get(key)
        if isinstance(value, list):
            named.update(str(v) for v in value)
        elif value is not None:
            named.add(str(value))
    return named


def entry_visible(session: Session, principal: Principal, entry: AuditEntry) -> bool:
    """Whether ``principal`` may read ``entry`` (see the module docstring)."""
    if principal.has(Role.COMPLIANCE_OFFICER, Role.CONSORTIUM_ADMIN):
        return True
    if entry.object.type == "study":
        return can_see_study(session, principal, entry.object.id)
    if entry.object.type not in CONSORTIUM_WIDE:
        return False
    return all(can_see_study(session, principal, study) for study in _named_studies(entry))
