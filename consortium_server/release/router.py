"""/api/v1/studies/{study_id}/release: the release gate over HTTP.

Sites (``site_node`` identities of the study's sites):

* ``GET  /aggregate``: the final encrypted aggregate (completed studies only);
* ``POST /signoffs``: the site's Ed25519 signature of the model hash it decrypted;
* ``POST /model``: the decrypted model bytes (JSON ``{"model_b64", "layout"}`` or
  ``application/octet-stream``, which carries no layout), which must hash to the uploading
  site's sign-off; ``layout`` names the parameter tensors the bytes hold.

The study owner or a consortium admin:

* ``POST ""``: release (state ``completed``, every site signed off one hash, the model
  uploaded, the ``ReleaseModel`` policy allows); a refusal is recorded
  (``release.refused``) and answered with the first reason's code;
* ``GET  /model.safetensors``: the released model as a safetensors file (the released
  bytes as its data, each parameter named; :mod:`concord_protocol.model_file`);
  ``GET /model``: the released bytes alone; ``GET /card``: the model card (JSON, or
  Markdown with ``?format=markdown``; anyone who can see the study may read the card).

``GET ""`` shows where the gate stands to anyone who can see the study. Every step is an
audit entry. Refusals are returned (not raised) so that their audit entry is committed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.types import DecoratedCallable
from pydantic import Field, ValidationError, field_serializer
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import Outcome
from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.fields import format_utc
from concord_protocol.principals import Principal, Role
from concord_protocol.release import MODEL_ENCODING
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    require_roles,
)
from consortium_server.api.errors import error_response
from consortium_server.audit.cosignatures import is_witnessed
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.db.base import utcnow
from consortium_server.errors import CATALOGUE, ForbiddenError, InvalidRequestError, NotFoundError
from consortium_server.policy.checks import PolicyContext
from consortium_server.release import service
from consortium_server.release.card import ModelCard, audit_head, build_card, render_markdown
from consortium_server.release.models import (
    FinalAggregate,
    ReleasedModel,
    ReleaseSignoff,
    StudyRelease,
)
from consortium_server.schemas import Sha256Hex, StrictModel
from consortium_server.sites.models import Site
from consortium_server.studies.models import Study, StudyState
from consortium_server.studies.service import get_visible_study, principal_owns

__all__ = [
    "FinalAggregatePublic",
    "ModelUpload",
    "ModelUploadBody",
    "ModelUploadPublic",
    "ReleaseStatus",
    "SignoffCreate",
    "SignoffPublic",
    "router",
]

router = APIRouter(prefix="/api/v1/studies/{study_id}/release", tags=["release"])


class FinalAggregatePublic(StrictModel):
    """The final encrypted aggregate, as a site needs it to decrypt the model."""

    study_id: str
    contract_hash: str
    round_number: int
    scheme: str = Field(
        description="`ckks` or `ckks_seeded` (encrypted), or `plain` (encryption off)."
    )
    num_params: int
    total_weight: float
    digest: str = Field(description="Update digest: SHA-256 of the header blob.")
    blobs: list[str] = Field(description="Base64 blobs in the update wire format, header first.")
    manifest: str = Field(
        default="",
        description="The signed contributions the aggregate sums (AggregateManifest JSON); "
        "sites check it and the aggregate's integrity tags before they decrypt.",
    )
    audit_index: int | None = Field(
        default=None,
        description="Index of the final round's `round.completed` audit entry, whose "
        "aggregate digest a site checks, with an inclusion proof against a head it "
        "witnessed, before it releases.",
    )
    input_shape: list[int] | None = Field(
        default=None,
        description="One record's shape as the run was sized (from the datasets' feature "
        "summaries): the uploading site builds the catalogue network for it to name the "
        "model's parameters (`layout` of the upload).",
    )
    num_classes: int | None = Field(default=None, description="The class count, likewise.")


class SignoffCreate(StrictModel):
    """A site's sign-off: the SHA-256 of the canonical model bytes and its signature."""

    site_id: str = Field(min_length=1, max_length=64)
    model_sha256: Sha256Hex
    signature: str = Field(
        min_length=1,
        max_length=128,
        description="Base64 Ed25519 signature of canonical_json({study_id, contract_hash, "
        "model_sha256, site_id}) with the site's enrolled signing key.",
    )


class SignoffPublic(StrictModel):
    """A recorded sign-off."""

    site_id: str
    model_sha256: str
    signature: str
    signed_by: str
    signed_at: datetime

    @field_serializer("signed_at")
    def _serialise_at(self, value: datetime) -> str:
        return format_utc(value)

    @classmethod
    def of(cls, row: ReleaseSignoff) -> SignoffPublic:
        """From the ORM row."""
        return cls(
            site_id=row.site_id,
            model_sha256=row.model_sha256,
            signature=row.signature,
            signed_by=row.signed_by,
            signed_at=row.signed_at,
        )


class ModelUpload(StrictModel):
    """The decrypted model as JSON: little-endian float64 bytes, base64, and the layout."""

    model_b64: str = Field(min_length=1)
    layout: dict[str, Any] | None = Field(
        default=None,
        description="The parameter layout (`concord_protocol.release.ModelLayout`): input "
        "shape, class count and each parameter's `name` and `shape` in vector order. "
        "Without it the server keeps the bytes but serves no model file.",
    )


@dataclass(frozen=True)
class ModelUploadBody:
    """What an upload request carries: the model bytes, and the layout (unchecked) if sent."""

    data: bytes
    layout: dict[str, Any] | None


class ModelUploadPublic(StrictModel):
    """What the server kept of an upload."""

    study_id: str
    model_sha256: str
    num_params: int
    size_bytes: int
    uploaded_by_site: str
    layout: bool = Field(description="Whether the server holds the model's parameter layout.")


class ReleaseStatus(StrictModel):
    """Where the release gate stands."""

    study_id: str
    state: str
    aggregate_digest: str | None
    sites: list[str]
    signoffs: list[SignoffPublic]
    pending_sites: list[str]
    hashes_agree: bool
    model_sha256: str | None = Field(description="The uploaded model's hash, if any.")
    model_layout: bool = Field(
        default=False,
        description="Whether the uploaded model came with its parameter layout (needed "
        "for the safetensors file; the same bytes uploaded again with a layout add it).",
    )
    released: bool


def _policy(request: Request) -> PolicyContext:
    context: PolicyContext = request.app.state.policy_context
    return context


def _refusal(
    audit: AuditDep,
    study: Study,
    *,
    stage: str,
    code: str,
    message: str,
    details: list[dict[str, object]],
    check: service.ReleaseCheck | None = None,
) -> JSONResponse:
    decision = check.decision if check is not None else None
    audit.record(
        "release.refused",
        object_type="study",
        object_id=study.id,
        outcome=Outcome.DENIED,
        contract_hash=study.contract_hash,
        policy_set_hash=decision.policy_set_hash if decision is not None else None,
        policy_allowed=decision.allowed if decision is not None else None,
        details={"stage": stage, "code": code, "reasons": details},
    )
    return error_response(CATALOGUE[code].status, code, message, details)


def _site_study(session: Session, study_id: str, principal: Principal) -> tuple[Study, Site]:
    """The study and the caller's site, which must be one of its sites (403 otherwise)."""
    study = session.get(Study, study_id)
    if study is None:
        raise NotFoundError(f"No study with id {study_id!r}.", code="study.not_found")
    return study, service.require_study_site(session, study, principal)


def _owner_or_admin(principal: Principal, study: Study) -> None:
    if not (principal_owns(principal, study) or principal.has(Role.CONSORTIUM_ADMIN)):
        raise ForbiddenError("Only the study owner or a consortium admin may do this.")


# ------------------------------------------------------------------------------- sites


@router.get("/aggregate", dependencies=[require_roles(Role.SITE_NODE)])
def get_final_aggregate(
    study_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FinalAggregatePublic:
    """The final encrypted aggregate, for a site of the study to decrypt and sign off."""
    study, site = _site_study(session, study_id, principal)
    service.require_state(study, StudyState.COMPLETED)
    aggregate = service.get_final_aggregate(session, study)
    given = service.study_model_input(session, study)
    audit.record(
        "release.aggregate_fetched",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        details={"site_id": site.id, "digest": aggregate.digest, "round": aggregate.round_number},
    )
    return FinalAggregatePublic(
        study_id=study.id,
        contract_hash=aggregate.contract_hash,
        round_number=aggregate.round_number,
        scheme=aggregate.scheme,
        num_params=aggregate.num_params,
        total_weight=aggregate.total_weight,
        digest=aggregate.digest,
        blobs=[base64.b64encode(blob.data).decode("ascii") for blob in aggregate.blobs],
        manifest=aggregate.manifest,
        audit_index=service.final_round_entry(session, study.id, aggregate.round_number),
        input_shape=list(given[0]) if given is not None else None,
        num_classes=given[1] if given is not None else None,
    )


@router.post(
    "/signoffs",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.SITE_NODE)],
    response_model=SignoffPublic,
)
def post_signoff(
    study_id: str,
    body: SignoffCreate,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> SignoffPublic | JSONResponse:
    """Sign off the final model hash your site decrypted (once per site)."""
    study, site = _site_study(session, study_id, principal)
    if body.site_id != site.id:
        raise ForbiddenError(f"You act for site {site.id}, not {body.site_id}.")
    service.require_state(study, StudyState.COMPLETED)
    if not service.verify_signoff_signature(
        site, study=study, model_sha256=body.model_sha256, signature_b64=body.signature
    ):
        message = f"The signature does not verify with site {site.id}'s registered signing key."
        return _refusal(
            audit,
            study,
            stage="signoff",
            code="release.signature_invalid",
            message=message,
            details=[{"site_id": site.id, "model_sha256": body.model_sha256}],
        )
    signoff, created = service.record_signoff(
        session,
        study,
        site,
        model_sha256=body.model_sha256,
        signature=body.signature,
        actor=principal,
    )
    if created:
        others = {s.model_sha256 for s in service.list_signoffs(session, study.id)}
        audit.record(
            "release.signed_off",
            object_type="study",
            object_id=study.id,
            contract_hash=study.contract_hash,
            details={
                "site_id": site.id,
                "model_sha256": signoff.model_sha256,
                "agrees_with_other_sites": len(others) == 1,
            },
        )
    return SignoffPublic.of(signoff)


async def _model_upload(request: Request) -> ModelUploadBody:
    """The upload body: raw bytes (no layout), or JSON ``{"model_b64", "layout"}``."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return ModelUploadBody(raw, None)
    try:
        upload = ModelUpload.model_validate_json(raw)
        data = base64.b64decode(upload.model_b64, validate=True)
    except (ValidationError, binascii.Error, ValueError):
        raise InvalidRequestError(
            'Send {"model_b64": "<base64>", "layout": {...}} or application/octet-stream.',
            code="request.invalid",
        ) from None
    return ModelUploadBody(data, upload.layout)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ModelUpload.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/model",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.SITE_NODE)],
    openapi_extra=_UPLOAD_BODY,
)
def post_model(
    study_id: str,
    body: Annotated[ModelUploadBody, Depends(_model_upload)],
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> ModelUploadPublic:
    """Upload the decrypted model (little-endian float64) your site signed off, with its
    parameter layout (a model file is served only for a model with one)."""
    study, site = _site_study(session, study_id, principal)
    layout = service.parse_layout(body.layout) if body.layout is not None else None
    model, outcome = service.upload_model(
        session, study, site, body.data, layout=layout, actor=principal
    )
    if outcome != "unchanged":
        audit.record(
            "release.model_uploaded" if outcome == "created" else "release.layout_uploaded",
            object_type="study",
            object_id=study.id,
            contract_hash=study.contract_hash,
            details={
                "site_id": site.id,
                "model_sha256": model.model_sha256,
                "num_params": model.num_params,
                "size_bytes": len(model.data),
                "layout": model.layout is not None,
            },
        )
    return ModelUploadPublic(
        study_id=study.id,
        model_sha256=model.model_sha256,
        num_params=model.num_params,
        size_bytes=len(model.data),
        uploaded_by_site=model.uploaded_by_site,
        layout=model.layout is not None,
    )


# -------------------------------------------------------------------- owner and admin


@router.get("", dependencies=[ANY_MEMBER])
def get_status(study_id: str, session: SessionDep, principal: CurrentPrincipal) -> ReleaseStatus:
    """Where the release gate stands: sign-offs, pending sites, the uploaded model."""
    study = get_visible_study(session, study_id, principal)
    sites = service.study_site_ids(study)
    signoffs = [s for s in service.list_signoffs(session, study.id) if s.site_id in sites]
    aggregate = session.get(FinalAggregate, study.id)
    model = session.get(ReleasedModel, study.id)
    return ReleaseStatus(
        study_id=study.id,
        state=study.state.value,
        aggregate_digest=aggregate.digest if aggregate is not None else None,
        sites=sites,
        signoffs=[SignoffPublic.of(s) for s in signoffs],
        pending_sites=sorted(set(sites) - {s.site_id for s in signoffs}),
        hashes_agree=len({s.model_sha256 for s in signoffs}) <= 1,
        model_sha256=model.model_sha256 if model is not None else None,
        model_layout=model is not None and model.layout is not None,
        released=session.get(StudyRelease, study.id) is not None,
    )


def _audit(request: Request) -> tuple[AuditLog, TreeHeadSigner]:
    log: AuditLog = request.app.state.audit_log
    signer: TreeHeadSigner = request.app.state.tree_head_signer
    return log, signer


@router.post(
    "",
    dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)],
    response_model=ModelCard,
)
def release_study(
    study_id: str,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> ModelCard | JSONResponse:
    """Release the final model and its card (owner or consortium admin).

    Refused (and recorded) unless the study is completed, every site signed off the same
    model hash, that model was uploaded, and the ``ReleaseModel`` policy allows it.
    """
    study = get_visible_study(session, study_id, principal)
    check = service.check_release_gate(session, study, requester=principal, policy=_policy(request))
    if not check.allowed:
        primary = check.primary()
        return _refusal(
            audit,
            study,
            stage="release",
            code=primary.code,
            message=primary.message,
            details=[p.as_detail() for p in check.problems],
            check=check,
        )
    decision = check.decision
    audit.record(
        "policy.decision",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        policy_set_hash=decision.policy_set_hash if decision is not None else None,
        policy_allowed=decision.allowed if decision is not None else None,
        details={"action": "ReleaseModel", "sites_signed_off": len(check.signoffs)},
    )
    event = service.mark_released(study, actor=principal, check=check)
    session.flush()
    audit.study_events(study, [event])
    log, signer = _audit(request)
    head = signer.sign_latest(session)
    aggregate = service.get_final_aggregate(session, study)
    model = session.get(ReleasedModel, study.id)
    assert model is not None  # the gate checked it
    released_at = utcnow()
    card = build_card(
        session,
        study,
        model=model,
        aggregate=aggregate,
        signoffs=check.signoffs,
        head=audit_head(
            head,
            server_public_key=signer.public_key_b64,
            witnessed=is_witnessed(head, log.witness_quorum, session=session),
            quorum=log.witness_quorum,
        ),
        released_by=principal,
        released_at=released_at,
    )
    service.store_release(session, study, card=card, actor=principal, released_at=released_at)
    return card


def _stored_card(request: Request, session: Session, study: Study) -> ModelCard:
    card = ModelCard.model_validate(service.get_release(session, study).card)
    log, _signer = _audit(request)
    head = SignedTreeHead(
        tree_size=card.audit_head.tree_size,
        root_hash=card.audit_head.root_hash,
        timestamp=datetime.fromisoformat(card.audit_head.timestamp.replace("Z", "+00:00")),
        key_id=card.audit_head.key_id,
        signature=card.audit_head.signature,
    )
    witnessed = is_witnessed(head, log.witness_quorum, session=session)
    return card.model_copy(
        update={"audit_head": card.audit_head.model_copy(update={"witnessed": witnessed})}
    )


@router.get("/card", dependencies=[ANY_MEMBER], response_model=ModelCard)
def get_card(
    study_id: str,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    format: Annotated[Literal["json", "markdown"], Query()] = "json",
) -> ModelCard | PlainTextResponse:
    """The model card of a released study (``witnessed`` is as of now)."""
    study = get_visible_study(session, study_id, principal)
    card = _stored_card(request, session, study)
    if format == "markdown":
        return PlainTextResponse(render_markdown(card), media_type="text/markdown")
    return card


def _download(
    audit: AuditDep, study: Study, model: ReleasedModel, content: bytes, *, name: str, fmt: str
) -> Response:
    """A released model as an attachment, its download recorded (``fmt``: which form)."""
    audit.record(
        "release.model_downloaded",
        object_type="study",
        object_id=study.id,
        contract_hash=study.contract_hash,
        details={"model_sha256": model.model_sha256, "format": fmt},
    )
    return Response(
        content=content,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Model-SHA256": model.model_sha256,
        },
    )


def _download_route(path: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A model download route (the owner or a consortium admin; octet-stream)."""
    return router.get(
        path,
        dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )


@_download_route("/model")
def get_model(
    study_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """The released model: little-endian float64 parameters (owner or consortium admin)."""
    study = get_visible_study(session, study_id, principal)
    _owner_or_admin(principal, study)
    model = service.get_released_model(session, study)
    return _download(
        audit, study, model, model.data, name=f"{study.id}-model.f64", fmt=MODEL_ENCODING
    )


@_download_route("/model.safetensors")
def get_model_file(
    study_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """The released model as a safetensors file (owner or consortium admin).

    Each catalogue parameter is a float64 tensor under its PyTorch name; the metadata names
    the model spec, input shape, class count, study, contract and model hash. The data
    section is the released bytes, so its SHA-256 is the hash every site signed off. Load it
    with ``site_node.training.released.load_released_model`` (which checks all of that), or
    any safetensors reader.
    """
    study = get_visible_study(session, study_id, principal)
    _owner_or_admin(principal, study)
    model, name, blob = service.released_model_file(session, study)
    return _download(audit, study, model, blob, name=name, fmt="safetensors")
