"""Export the stored audit log (the format is :mod:`concord_protocol.audit.export`)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

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
    start: int = 0,
    limit: int | None = None,
) -> AuditExport:
    """Export the log as stored. ``site_keys`` (site id -> base64 key) defaults to the
    signing keys of the enrolled sites.

    A page (``limit`` set) holds the entries ``[start, start + limit)`` and the heads and
    cosignatures of sizes ``(start, start + limit]`` (size 0 too on the first page), and
    ``next_start`` names the next page while entries remain: the pages of a log, joined,
    are its whole export (:func:`concord_protocol.audit.export.join_pages`)."""
    if site_keys is None:
        site_keys = {
            site_id: key
            for site_id, key in session.execute(select(Site.id, Site.signing_public_key))
        }
    end = None if limit is None else start + limit
    leaves = select(AuditLeaf).where(AuditLeaf.index >= start).order_by(AuditLeaf.index)
    if end is not None:
        leaves = leaves.where(AuditLeaf.index < end + 1)  # one more: is there a next page?
    rows = list(session.scalars(leaves.execution_options(populate_existing=True)))
    more = end is not None and bool(rows) and rows[-1].index >= end
    entries = [
        ExportedEntry(
            index=row.index,
            entry_b64=base64.b64encode(bytes(row.entry)).decode("ascii"),
            leaf_hash=bytes(row.leaf_hash).hex(),
        )
        for row in rows
        if end is None or row.index < end
    ]

    def sizes(column: Any) -> Any:
        low = column >= start if start == 0 else column > start
        return low if end is None else low & (column <= end)

    heads = [
        row.signed_head()
        for row in session.scalars(
            select(AuditTreeHead)
            .where(sizes(AuditTreeHead.tree_size))
            .order_by(AuditTreeHead.tree_size, AuditTreeHead.id)
            .execution_options(populate_existing=True)
        )
    ]
    cosignatures = [
        row.cosignature()
        for row in session.scalars(
            select(AuditCosignature)
            .where(sizes(AuditCosignature.tree_size))
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
        next_start=end if more else None,
    )
