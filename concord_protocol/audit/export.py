"""The audit-log export: everything a verifier needs, in one versioned JSON document.

``format`` is ``concord.audit.export`` and ``version`` is 2 (version 1 had no ``log_id``
and only version 1 cosignatures; it still loads). Entries carry their exact
stored bytes (base64) and stored leaf hash; heads and cosignatures are exported as stored,
with the server's public key and the sites' registered signing keys. The export copies
what the database holds without judging it: a damaged log exports as damaged, and
:func:`concord_protocol.audit.verify.verify_export` reports what is wrong. The server builds
exports with :func:`consortium_server.audit.export.build_export`.

A verifier should not trust the keys inside an export: pass the server key (and site
keys) obtained out of band to ``verify_export``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer

from concord_protocol.audit.cosignatures import Cosignature, LogId
from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.fields import format_utc, utcnow

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "AuditExport",
    "ExportedEntry",
    "ExportedSite",
    "join_pages",
    "load_export",
    "write_export",
]

EXPORT_FORMAT: Final = "concord.audit.export"
EXPORT_VERSION: Final = 2


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
    version: Literal[1, 2] = EXPORT_VERSION
    exported_at: datetime = Field(default_factory=utcnow)
    server_public_key: str = Field(description="Base64 raw Ed25519 key that signs heads.")
    log_id: LogId | None = Field(
        default=None, description="The log's identity, which version 2 cosignatures bind."
    )
    witness_quorum: int | None = Field(default=None, ge=1)
    entries: list[ExportedEntry]
    heads: list[SignedTreeHead]
    cosignatures: list[Cosignature]
    sites: list[ExportedSite] = Field(default_factory=list)
    next_start: int | None = Field(
        default=None,
        ge=0,
        description="A page of the export: the `start` of the next page (null: the last "
        "page, or a whole export).",
    )

    @field_serializer("exported_at")
    def _serialise_exported_at(self, value: datetime) -> str:
        return format_utc(value)


def join_pages(pages: Iterable[AuditExport]) -> AuditExport:
    """One export from its pages, in order. ``ValueError`` unless each page starts where the
    one before said the next would, the last one says there is no next, and every page is
    of the same log (server key, log id, version)."""
    joined: AuditExport | None = None
    for page in pages:
        if joined is None:
            joined = page.model_copy(deep=True)
            continue
        same_log = (page.server_public_key, page.log_id, page.version) == (
            joined.server_public_key,
            joined.log_id,
            joined.version,
        )
        follows = not page.entries or page.entries[0].index == joined.next_start
        if joined.next_start is None or not follows:
            raise ValueError("the export pages do not follow on from each other")
        if not same_log:
            raise ValueError("the export pages are not of the same log")
        joined.entries.extend(page.entries)
        joined.heads.extend(page.heads)
        joined.cosignatures.extend(page.cosignatures)
        joined.next_start = page.next_start
    if joined is None:
        raise ValueError("no export pages")
    if joined.next_start is not None:
        raise ValueError(f"the export is incomplete: the page from {joined.next_start} is missing")
    return joined


def write_export(export: AuditExport, path: Path) -> None:
    """Write ``export`` as JSON to ``path``."""
    path.write_text(export.model_dump_json(indent=1), encoding="utf-8")


def load_export(path: Path) -> AuditExport:
    """Read and validate an export file (pydantic ``ValidationError`` if malformed)."""
    return AuditExport.model_validate_json(path.read_bytes())
