"""Verify the audit log in the database: the export checks plus the query columns."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import DEFAULT_LOG_ID
from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.verify import Problem, ProblemKind, VerificationReport, verify_export
from consortium_server.audit.export import build_export
from consortium_server.audit.models import AuditLeaf

__all__ = ["verify_live"]


def verify_live(
    session: Session,
    *,
    server_public_key: str,
    site_keys: Mapping[str, str] | None = None,
    quorum: int | None = None,
    log_id: str = DEFAULT_LOG_ID,
) -> VerificationReport:
    """Verify the log in the database: the export checks plus the query columns.

    ``server_public_key`` is the key heads must be signed with (base64 raw);
    ``site_keys`` defaults to the enrolled sites' registered keys; ``quorum`` (when given) is
    enforced on the latest head; ``log_id`` is the log's identity.
    """
    export = build_export(
        session,
        server_public_key=server_public_key,
        site_keys=site_keys,
        witness_quorum=quorum,
        log_id=log_id,
    )
    report = verify_export(
        export,
        trusted_server_key=server_public_key,
        trusted_site_keys={s.site_id: s.signing_public_key for s in export.sites},
        quorum=quorum,
        log_id=log_id,
    )
    for row in session.scalars(
        select(AuditLeaf).order_by(AuditLeaf.index).execution_options(populate_existing=True)
    ):
        try:
            entry = AuditEntry.from_canonical_bytes(bytes(row.entry))
        except ValueError:
            continue  # already reported as entry_invalid
        if (entry.action, entry.actor.subject, entry.at) != (
            row.action,
            row.actor_subject,
            row.at,
        ):
            report.problems.append(
                Problem(
                    kind=ProblemKind.COLUMN_MISMATCH,
                    index=row.index,
                    message="The query columns (action, actor, time) disagree with the entry.",
                )
            )
    return report
