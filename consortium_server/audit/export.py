"""The audit-log export: everything a verifier needs, in one versioned JSON document.

``format`` is ``concord.audit.export`` and ``version`` is 1. Entries carry their exact
stored bytes (base64) and stored leaf hash; heads and cosignatures are exported as stored,
with the server's public key and the sites' registered signing keys. The export copies
what the database holds without judging it: a damaged log exports as damaged, and
:func:`consortium_server.audit.verify.verify_export` reports what is wrong.

A verifier should not trust the keys inside an export: pass the server key (and site
keys) obtained out of band to ``verify_export``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from consortium_server.audit.entries import format_utc
from consortium_server.audit.heads import SignedTreeHead
from consortium_server.audit.models import AuditCosignature, AuditLeaf, AuditTreeHead
from consortium_server.audit.witness import Cosignature
from consortium_server.db.base import utcnow
from consortium_server.sites.models import Site

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "AuditExport",
    "ExportedEntry",
    "ExportedSite",
    "build_export",
    "load_export",
    "write_export",
]

EXPORT_FORMAT: Final = "concord.audit.export"
EXPORT_VERSION: Final = 1


class ExportedEntry(BaseModel):
    """One stored leaf: index, exact entry bytes (base64), stored leaf hash (hex)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    entry_b64: str
    leaf_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]*$")]


class ExportedSite(BaseModel):
    """A site's registered signing key (base64 raw Ed25519), to check cosignatures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_id: str
    signing_public_key: str


class AuditExport(BaseModel):
    """A complete, self-describing copy of the audit log."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["concord.audit.export"] = EXPORT_FORMAT
    version: Literal[1] = EXPORT_VERSION
    exported_at: datetime = Field(default_factory=utcnow)
    server_public_key: str = Field(description="Base64 raw Ed25519 key that signs heads.")
    witness_quorum: int | None = Field(default=None, ge=1)
    entries: list[ExportedEntry]
    heads: list[SignedTreeHead]
    cosignatures: list[Cosignature]
    sites: list[ExportedSite] = Field(default_factory=list)

    @field_serializer("exported_at")
    def _serialise_exported_at(self, value: datetime) -> str:
        return format_utc(value)


def build_export(
    session: Session,
    *,
    server_public_key: str,
    site_keys: Mapping[str, str] | None = None,
    witness_quorum: int | None = None,
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
        SignedTreeHead.from_row(row)
        for row in session.scalars(
            select(AuditTreeHead)
            .order_by(AuditTreeHead.tree_size, AuditTreeHead.id)
            .execution_options(populate_existing=True)
        )
    ]
    cosignatures = [
        Cosignature(
            site_id=row.site_id,
            tree_size=row.tree_size,
            root_hash=row.root_hash,
            timestamp=row.timestamp,
            signature=row.signature,
        )
        for row in session.scalars(
            select(AuditCosignature)
            .order_by(AuditCosignature.tree_size, AuditCosignature.site_id)
            .execution_options(populate_existing=True)
        )
    ]
    return AuditExport(
        server_public_key=server_public_key,
        witness_quorum=witness_quorum,
        entries=entries,
        heads=heads,
        cosignatures=cosignatures,
        sites=[ExportedSite(site_id=s, signing_public_key=k) for s, k in sorted(site_keys.items())],
    )


def write_export(export: AuditExport, path: Path) -> None:
    """Write ``export`` as JSON to ``path``."""
    path.write_text(export.model_dump_json(indent=1), encoding="utf-8")


def load_export(path: Path) -> AuditExport:
    """Read and validate an export file (pydantic ``ValidationError`` if malformed)."""
    return AuditExport.model_validate_json(path.read_bytes())
