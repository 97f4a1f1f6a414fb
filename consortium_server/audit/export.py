"""Export the stored audit log (the format is :mod:`concord_protocol.audit.export`)."""

from __future__ import annotations

import base64
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import DEFAULT_LOG_ID
from concord_protocol.audit.export import AuditExport, ExportedEntry, ExportedSite
from consortium_server.audit.models import AuditCosignature, AuditLeaf, AuditTreeHead
from consortium_server.sites.models import Site

__all__ = ["build_export"]


def build_export(
    session: Session,
    *,
    server_public_key: str,
    site_keys: Mapping[str, str] | None = None,
    witness_quorum: int | None = None,
    log_id: str = DEFAULT_LOG_ID,
) -> AuditExport:
    """Export the log as stored. ``site_keys`` (site id -> base64 key) defaults to the
    signing keys of the enrolled sites."""
    if site_keys is None:
        site_keys = {
            site_id: key
            for site_id, key in session.execute(select(Site.id, Site.signing_public_key))
        }
    entries = [
        ExportedEntry(
            index=row.index,
            entry_b64=base64.b64encode(bytes(row.entry)).decode("ascii"),
            leaf_hash=bytes(row.leaf_hash).hex(),
        )
        for row in session.scalars(
            select(AuditLeaf).order_by(AuditLeaf.index).execution_options(populate_existing=True)
        )
    ]
    heads = [
        row.signed_head()
        for row in session.scalars(
            select(AuditTreeHead)
            .order_by(AuditTreeHead.tree_size, AuditTreeHead.id)
            .execution_options(populate_existing=True)
        )
    ]
    cosignatures = [
        row.cosignature()
        for row in session.scalars(
            select(AuditCosignature)
            .order_by(AuditCosignature.tree_size, AuditCosignature.site_id)
            .execution_options(populate_existing=True)
        )
    ]
    return AuditExport(
        server_public_key=server_public_key,
        log_id=log_id,
        witness_quorum=witness_quorum,
        entries=entries,
        heads=heads,
        cosignatures=cosignatures,
        sites=[ExportedSite(site_id=s, signing_public_key=k) for s, k in sorted(site_keys.items())],
    )
