"""Study key relay: the generating site uploads the public context and sealed keys; each
other approved site fetches the key sealed to it.

The server never receives a secret: a public context that holds the secret key is refused
(``keys.secret_context``), and sealed keys are stored as the opaque JSON of
:class:`site_node.crypto.SealedKey`. The server still checks what it can without opening
them: one sealed key per other approved site, addressed from the caller's site, for this
study and contract hash, bound to this public context and fingerprint, and signed with the
caller site's enrolled Ed25519 key (so a relay of garbage is refused early). Recipients
check everything again when they open the key (``open_study_key``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.errors import ContextError
from concord_protocol.principals import Principal
from concord_protocol.sealed_key import SealedKey, ed25519_public_from_b64
from concord_protocol.wire.ckks import load_context
from consortium_server.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.federation.models import SealedStudyKey, StudyKeyRelay
from consortium_server.schemas import Sha256Hex
from consortium_server.sites.models import Site, SiteStatus
from consortium_server.studies.models import ApprovalDecision, Study, StudyApproval, StudyState

__all__ = [
    "KEY_RELAY_STATES",
    "MySealedKey",
    "StudyKeysCreate",
    "StudyKeysPublic",
    "approved_sites",
    "caller_site",
    "my_sealed_key",
    "upload_study_keys",
]

#: Study states in which keys may be relayed.
KEY_RELAY_STATES = frozenset({StudyState.APPROVED, StudyState.RUNNING})
_MAX_PUBLIC_CONTEXT = 1 << 20


class StudyKeysCreate(BaseModel):
    """Body of ``POST /studies/{id}/keys``: the public context and one sealed key per
    other approved site."""

    model_config = ConfigDict(extra="forbid")

    public_context: str = Field(description="Base64 of the public CKKS context (no secret key).")
    key_fingerprint: Sha256Hex
    sealed_keys: list[SealedKey] = Field(max_length=1000)


class StudyKeysPublic(BaseModel):
    """What the server holds for a study's key."""

    study_id: str
    sender_site_id: str
    contract_hash: str
    public_context_sha256: str
    key_fingerprint: str
    recipients: list[str]


class MySealedKey(BaseModel):
    """``GET /studies/{id}/keys/mine``: the caller site's sealed key and who sealed it."""

    study_id: str
    sender_site_id: str
    sender_signing_public_key: str
    public_context: str
    key_fingerprint: str
    sealed_key: SealedKey | None = Field(
        description="Null for the site that generated the key (it holds it already)."
    )


def caller_site(session: Session, principal: Principal) -> Site:
    """The enrolled, active site of a ``site_node`` principal (by organisation)."""
    site = None
    if principal.organisation is not None:
        site = session.scalars(
            select(Site).where(Site.organisation == principal.organisation)
        ).one_or_none()
    if site is None:
        raise ForbiddenError(
            "This identity belongs to no enrolled site.", code="keys.not_study_site"
        )
    if site.status != SiteStatus.ACTIVE:
        raise ForbiddenError(code="auth.site_revoked")
    return site


def approved_sites(session: Session, study: Study) -> set[str]:
    """Study sites whose steward approved the study's current contract hash."""
    study_sites = {s.site_id for s in study.sites}
    rows = session.scalars(
        select(StudyApproval).where(
            StudyApproval.study_id == study.id,
            StudyApproval.decision == ApprovalDecision.APPROVED,
            StudyApproval.contract_hash == study.contract_hash,
        )
    )
    return {r.site_id for r in rows} & study_sites


def _study_for_site(session: Session, study_id: str, site: Site) -> tuple[Study, set[str]]:
    study = session.get(Study, study_id)
    if study is None:
        raise NotFoundError(code="study.not_found")
    approved = approved_sites(session, study)
    if site.id not in {s.site_id for s in study.sites}:
        raise ForbiddenError("Your site takes no part in this study.", code="keys.not_study_site")
    if study.state not in KEY_RELAY_STATES:
        raise ConflictError(f"The study is {study.state.value}.", code="keys.study_not_ready")
    if site.id not in approved:
        raise ForbiddenError("Your site has not approved this study.", code="keys.not_study_site")
    return study, approved


def _decode_public_context(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("public_context is not base64", code="keys.invalid") from None
    if not data or len(data) > _MAX_PUBLIC_CONTEXT:
        raise InvalidRequestError("public_context is empty or too large", code="keys.invalid")
    try:
        load_context(data, require_secret=False)
    except ContextError as exc:
        if exc.code == "crypto.context_has_secret":
            raise InvalidRequestError(
                "The context holds the secret key: upload only the public context.",
                code="keys.secret_context",
            ) from None
        raise InvalidRequestError(
            "public_context is not a CKKS context", code="keys.invalid"
        ) from None
    return data


def upload_study_keys(
    session: Session, *, study_id: str, principal: Principal, body: StudyKeysCreate
) -> StudyKeysPublic:
    """Store a study's public context and sealed keys sent by the generating site."""
    site = caller_site(session, principal)
    study, approved = _study_for_site(session, study_id, site)
    if session.get(StudyKeyRelay, study.id) is not None:
        raise ConflictError("This study's key has already been relayed.", code="keys.exists")
    public = _decode_public_context(body.public_context)
    public_sha = hashlib.sha256(public).hexdigest()
    expected = approved - {site.id}
    recipients = [k.recipient_id for k in body.sealed_keys]
    if sorted(recipients) != sorted(expected) or len(set(recipients)) != len(recipients):
        raise InvalidRequestError(
            f"Send exactly one sealed key for each other approved site: {sorted(expected)}.",
            code="keys.invalid",
        )
    signer = ed25519_public_from_b64(site.signing_public_key)
    for key in body.sealed_keys:
        problems = [
            name
            for name, ok in (
                ("sender_id", key.sender_id == site.id),
                ("study_id", key.study_id == study.id),
                ("contract_hash", key.contract_hash == study.contract_hash),
                ("public_context_sha256", key.public_context_sha256 == public_sha),
                ("key_fingerprint", key.key_fingerprint == body.key_fingerprint),
            )
            if not ok
        ]
        if problems:
            raise InvalidRequestError(
                f"Sealed key for {key.recipient_id} has wrong {', '.join(problems)}.",
                code="keys.invalid",
            )
        try:
            signer.verify(key.signature, key.signed_bytes())
        except InvalidSignature:
            raise InvalidRequestError(
                f"Sealed key for {key.recipient_id} is not signed by your site's enrolled key.",
                code="keys.invalid",
            ) from None
    relay = StudyKeyRelay(
        study_id=study.id,
        sender_site_id=site.id,
        contract_hash=study.contract_hash,
        public_context=public,
        public_context_sha256=public_sha,
        key_fingerprint=body.key_fingerprint,
        uploaded_by=principal.subject,
    )
    session.add(relay)
    for key in body.sealed_keys:
        session.add(
            SealedStudyKey(
                study_id=study.id,
                recipient_site_id=key.recipient_id,
                sender_site_id=site.id,
                sealed=key.model_dump(mode="json"),
            )
        )
    session.flush()
    return StudyKeysPublic(
        study_id=study.id,
        sender_site_id=site.id,
        contract_hash=study.contract_hash,
        public_context_sha256=public_sha,
        key_fingerprint=body.key_fingerprint,
        recipients=sorted(recipients),
    )


def my_sealed_key(session: Session, *, study_id: str, principal: Principal) -> MySealedKey:
    """The caller site's sealed key (null for the generating site)."""
    site = caller_site(session, principal)
    study, _ = _study_for_site(session, study_id, site)
    relay = session.get(StudyKeyRelay, study.id)
    if relay is None or relay.contract_hash != study.contract_hash:
        raise NotFoundError("No key has been relayed for this study yet.", code="keys.not_found")
    sender = session.get(Site, relay.sender_site_id)
    assert sender is not None  # foreign key
    sealed: SealedKey | None = None
    if site.id != relay.sender_site_id:
        row = session.get(SealedStudyKey, (study.id, site.id))
        if row is None:
            raise NotFoundError("No key was sealed to your site.", code="keys.not_found")
        sealed = SealedKey.model_validate(row.sealed)
    return MySealedKey(
        study_id=study.id,
        sender_site_id=relay.sender_site_id,
        sender_signing_public_key=sender.signing_public_key,
        public_context=base64.b64encode(relay.public_context).decode(),
        key_fingerprint=relay.key_fingerprint,
        sealed_key=sealed,
    )


def public_context_for(session: Session, study_id: str) -> bytes | None:
    """The study's public context (for starting its run), or ``None`` if not relayed yet."""
    relay = session.get(StudyKeyRelay, study_id)
    return None if relay is None else relay.public_context
