"""Who may read which audit entry: audit reads are scoped like study reads.

Compliance officers and consortium admins read every entry. Data stewards and site nodes
read the entries of studies their site is part of (the rule of
:func:`consortium_server.studies.service.can_see_study`) and the consortium-wide ones
(site enrolments and revocations, dataset publications, policy versions, report
downloads). Entries about refused sign-ins (object type ``endpoint``, with client
addresses) and any object type not listed here stay with the compliance officers: new
kinds of entry are hidden until someone decides they are consortium-wide. A hidden entry
answers exactly like a missing one (``audit.entry_not_found``), so a site cannot learn that
a study it is not part of exists.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.principals import Principal, Role
from consortium_server.studies.service import can_see_study

__all__ = ["CONSORTIUM_WIDE", "entry_visible"]

#: Object types every member organisation may read.
CONSORTIUM_WIDE = frozenset({"site", "dataset", "policy_set", "report"})


def entry_visible(session: Session, principal: Principal, entry: AuditEntry) -> bool:
    """Whether ``principal`` may read ``entry`` (see the module docstring)."""
    if principal.has(Role.COMPLIANCE_OFFICER, Role.CONSORTIUM_ADMIN):
        return True
    if entry.object.type == "study":
        return can_see_study(session, principal, entry.object.id)
    return entry.object.type in CONSORTIUM_WIDE
