"""/api/v1/audit: signed tree heads, entries with inclusion proofs, consistency, export,
and site witnesses' cosignatures.

Wiring (in ``create_app``), two objects on ``app.state``:

``app.state.audit_log``
    an :class:`consortium_server.audit.log.AuditLog`, built once:
    ``AuditLog(witness_quorum=settings...)`` (default quorum 2). It holds no session:
    every method takes the request's ``session``.

``app.state.tree_head_signer``
    a :class:`consortium_server.audit.heads.TreeHeadSigner`, built once from the
    server's key file: ``TreeHeadSigner.load_or_create(data_dir / "audit-head-key.pem")``
    (PEM PKCS#8 Ed25519, created with mode 0600 if missing; an existing file readable
    by group or others is refused).

Heads are signed lazily: ``GET /heads/latest`` and ``GET /entries/{index}`` (without
``tree_size``) sign and store a new head when the log has grown since the latest one
(``TreeHeadSigner.sign_latest``), so no scheduler is needed; a log that fails its
integrity check is never signed (``audit.log_corrupt``).

Who may call: heads and consistency proofs (hashes only) any authenticated caller;
entries: compliance officers and consortium admins, and data stewards and site nodes for
their own studies' and the consortium-wide entries (:mod:`consortium_server.audit.scope`);
export: compliance officers and consortium admins; cosignatures: site nodes, for the
site of their own organisation.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, status
from pydantic import Field, field_serializer, field_validator
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import Cosignature, LogId
from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.fields import format_utc
from concord_protocol.principals import Role
from consortium_server.api.deps import CurrentPrincipal, SessionDep, require_roles
from consortium_server.audit.cosignatures import cosignatures_for, is_witnessed, record_cosignature
from consortium_server.audit.export import build_export
from consortium_server.audit.log import AuditLog
from consortium_server.audit.scope import entry_visible
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import (
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.schemas import Sha256Hex, StrictModel
from consortium_server.sites.models import Site, SiteStatus

__all__ = [
    "ConsistencyProofPublic",
    "CosignatureCreate",
    "CosignaturePublic",
    "EntryPublic",
    "TreeHeadPublic",
    "router",
]

#: The largest log position a request may name: far beyond any log, within every database's
#: 64-bit integers (SQLite's included), so a huge number is a 422, never a database error.
MAX_POSITION = 2**53
#: Entries in one page of the export (about 500 bytes each as JSON).
EXPORT_PAGE_MAX = 10_000

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


class CosignaturePublic(StrictModel):
    """A site witness's cosignature of a tree head (``version`` 1: stored before the
    binding to log, key and head time; it counts towards no quorum)."""

    version: int
    site_id: str
    tree_size: int
    root_hash: str
    timestamp: datetime
    signature: str
    log_id: str | None
    key_id: str | None
    head_timestamp: datetime | None

    @field_serializer("timestamp", "head_timestamp")
    def _serialise_timestamp(self, value: datetime | None) -> str | None:
        return None if value is None else format_utc(value)


class TreeHeadPublic(StrictModel):
    """A signed tree head, with its cosignatures and whether a quorum witnessed it."""

    tree_size: int
    root_hash: str
    timestamp: datetime
    key_id: str
    signature: str
    server_public_key: str = Field(description="Base64 raw Ed25519 key that signed it.")
    log_id: str = Field(description="The log's identity, which cosignatures bind.")
    witnessed: bool
    witness_quorum: int
    cosignatures: list[CosignaturePublic]

    @field_serializer("timestamp")
    def _serialise_timestamp(self, value: datetime) -> str:
        return format_utc(value)

    def signed_head(self) -> SignedTreeHead:
        """The head without the witness information (what sites verify and cosign)."""
        return SignedTreeHead(
            tree_size=self.tree_size,
            root_hash=self.root_hash,
            timestamp=self.timestamp,
            key_id=self.key_id,
            signature=self.signature,
        )


class EntryPublic(StrictModel):
    """An entry, its exact bytes and an inclusion proof against a tree of ``tree_size``."""

    index: int
    entry: dict[str, Any] = Field(description="The decoded audit entry.")
    entry_b64: str = Field(description="The exact hashed bytes (canonical JSON), base64.")
    leaf_hash: str
    tree_size: int
    root_hash: str
    inclusion_proof: list[str] = Field(description="RFC 9162 audit path, leaf first, hex.")
    head: TreeHeadPublic | None = Field(
        default=None, description="The signed head of ``tree_size`` leaves, when there is one."
    )


class ConsistencyProofPublic(StrictModel):
    """RFC 9162 consistency proof between two tree sizes."""

    first: int
    second: int
    first_root: str
    second_root: str
    proof: list[str]


class CosignatureCreate(StrictModel):
    """A site's version 2 cosignature of the head ``(size, root_hash, key_id,
    head_timestamp)`` of the log ``log_id`` (:mod:`concord_protocol.audit.cosignatures`)."""

    version: Literal[2] = 2
    site_id: str = Field(min_length=1, max_length=64)
    root_hash: Sha256Hex
    timestamp: datetime
    signature: str = Field(min_length=1, max_length=128)
    log_id: LogId
    key_id: Sha256Hex
    head_timestamp: datetime

    @field_validator("timestamp", "head_timestamp")
    @classmethod
    def _representable(cls, value: datetime) -> datetime:
        """A time that UTC can hold (``0001-01-01T00:00+05:00`` cannot): else a 422."""
        try:
            return value.astimezone(UTC) if value.tzinfo is not None else value
        except OverflowError:
            raise ValueError("timestamp is out of the range of UTC times") from None


def _audit_log(request: Request) -> AuditLog:
    log: AuditLog = request.app.state.audit_log
    return log


def _signer(request: Request) -> TreeHeadSigner:
    signer: TreeHeadSigner = request.app.state.tree_head_signer
    return signer


def _head_public(head: SignedTreeHead, request: Request, session: Session) -> TreeHeadPublic:
    log = _audit_log(request)
    cosigs = cosignatures_for(head, session=session)
    return TreeHeadPublic(
        **head.model_dump(),
        server_public_key=_signer(request).public_key_b64,
        log_id=log.log_id,
        witnessed=is_witnessed(head, log.witness_quorum, session=session),
        witness_quorum=log.witness_quorum,
        cosignatures=[CosignaturePublic(**c.model_dump()) for c in cosigs],
    )


@router.get("/heads/latest")
def latest_head(request: Request, session: SessionDep, _: CurrentPrincipal) -> TreeHeadPublic:
    """The latest signed tree head (signed now if the log grew since the last one)."""
    head = _signer(request).sign_latest(session)
    return _head_public(head, request, session)


@router.get(
    "/entries/{index}",
    dependencies=[
        require_roles(
            Role.COMPLIANCE_OFFICER, Role.CONSORTIUM_ADMIN, Role.DATA_STEWARD, Role.SITE_NODE
        )
    ],
)
def get_entry(
    index: Annotated[int, Path(ge=0, le=MAX_POSITION)],
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    tree_size: Annotated[int | None, Query(ge=1, le=MAX_POSITION)] = None,
) -> EntryPublic:
    """Entry ``index`` with its inclusion proof against the latest head (or ``tree_size``).
    Stewards and site nodes read only their studies' and the consortium-wide entries
    (:mod:`consortium_server.audit.scope`)."""
    log = _audit_log(request)
    stored = log.get_entry(index, session=session)
    if not entry_visible(session, principal, stored.entry):
        raise NotFoundError(f"No audit entry {index}.", code="audit.entry_not_found")
    if tree_size is None:
        head: SignedTreeHead | None = _signer(request).sign_latest(session)
        size = head.tree_size if head is not None else 0
    else:
        size = tree_size
        head = log.head_for_size(size, session=session)
    proof = log.prove_inclusion(index, session=session, tree_size=size)
    return EntryPublic(
        index=stored.index,
        entry=stored.entry.model_dump(mode="json"),
        entry_b64=base64.b64encode(stored.entry_bytes).decode("ascii"),
        leaf_hash=stored.leaf_hash.hex(),
        tree_size=proof.tree_size,
        root_hash=proof.root.hex(),
        inclusion_proof=[p.hex() for p in proof.path],
        head=_head_public(head, request, session) if head is not None else None,
    )


@router.get("/consistency")
def get_consistency(
    request: Request,
    session: SessionDep,
    _: CurrentPrincipal,
    first: Annotated[int, Query(ge=0, le=MAX_POSITION)],
    second: Annotated[int | None, Query(ge=0, le=MAX_POSITION)] = None,
) -> ConsistencyProofPublic:
    """Consistency proof from the tree of ``first`` leaves to ``second`` (default: latest
    signed head)."""
    log = _audit_log(request)
    if second is None:
        head = log.latest_head(session=session)
        if head is None:
            raise NotFoundError("No tree head has been signed yet.", code="audit.head_not_found")
        second = head.tree_size
    if first > second:
        raise InvalidRequestError("`first` must not exceed `second`.", code="audit.invalid_range")
    proof = log.prove_consistency(first, second, session=session)
    return ConsistencyProofPublic(
        first=proof.first_size,
        second=proof.second_size,
        first_root=proof.first_root.hex(),
        second_root=proof.second_root.hex(),
        proof=[p.hex() for p in proof.path],
    )


@router.get(
    "/export",
    dependencies=[require_roles(Role.COMPLIANCE_OFFICER, Role.CONSORTIUM_ADMIN)],
)
def export_log(
    request: Request,
    session: SessionDep,
    start: Annotated[int, Query(ge=0, le=MAX_POSITION, description="First entry.")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=EXPORT_PAGE_MAX, description="Entries in this page.")
    ] = EXPORT_PAGE_MAX,
) -> AuditExport:
    """One page of the log (entries from ``start``, the heads and cosignatures of those
    sizes, the keys) for offline verification; ``next_start`` names the next page.
    ``consortium audit export`` fetches every page and writes them as one file."""
    return build_export(
        session,
        start=start,
        limit=limit,
        server_public_key=_signer(request).public_key_b64,
        witness_quorum=_audit_log(request).witness_quorum,
        log_id=_audit_log(request).log_id,
    )


@router.post(
    "/heads/{size}/cosignatures",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.SITE_NODE)],
)
def post_cosignature(
    size: Annotated[int, Path(ge=1, le=MAX_POSITION)],
    body: CosignatureCreate,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
) -> CosignaturePublic:
    """Store a site witness's cosignature of the head ``(size, root_hash)``."""
    site = session.get(Site, body.site_id)
    if site is None:
        raise NotFoundError(code="site.not_found")
    if principal.organisation is None or principal.organisation != site.organisation:
        raise ForbiddenError("Sites may only cosign for themselves.")
    if site.status != SiteStatus.ACTIVE:
        raise ForbiddenError(code="auth.site_revoked")
    try:
        cosignature = Cosignature(
            site_id=body.site_id,
            tree_size=size,
            root_hash=body.root_hash,
            timestamp=body.timestamp,
            signature=body.signature,
            log_id=body.log_id,
            key_id=body.key_id,
            head_timestamp=body.head_timestamp,
        )
    except (ValueError, OverflowError) as exc:
        raise InvalidRequestError(str(exc), code="request.invalid") from exc
    stored = record_cosignature(
        session,
        cosignature,
        site_public_key=site.signing_public_key,
        log_id=_audit_log(request).log_id,
    )
    return CosignaturePublic(**stored.model_dump())
