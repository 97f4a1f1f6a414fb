"""Site witnesses: cosign a tree head only if it extends the last head the site cosigned.

Site side, :class:`Witness`: each site node keeps the last head it cosigned in a local
JSON file. For a new head it checks, in order: the server's signature; that the tree did
not shrink; that a head of the same size has the same root; that the consistency proof
from its last head verifies (RFC 9162). Only then does it store the new head (atomic write,
fsync) and return a :class:`Cosignature`. State is re-read from the file on every call, so
the rules hold across restarts and between processes (a file lock serialises them). The
first head a witness ever sees is trusted on first use; seed the state file with a known
head to avoid that.

Server side: :func:`record_cosignature` checks a site's signature with its registered key
and stores it; :func:`is_witnessed` says whether a head has a quorum of cosignatures.

The cosigned message is the canonical JSON of ``{"type": "concord.audit.cosignature.v1",
"site_id", "tree_size", "root_hash", "timestamp"}`` (timestamp: when the site cosigned).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
    field_validator,
)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consortium_server.audit.entries import format_utc
from consortium_server.audit.heads import (
    SignedTreeHead,
    decode_public_key,
    key_id,
    verify_tree_head,
)
from consortium_server.audit.merkle import InvalidProofError, verify_consistency
from consortium_server.audit.models import AuditCosignature, AuditTreeHead
from consortium_server.canonical import canonical_json
from consortium_server.db.base import utcnow
from consortium_server.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.schemas import Sha256Hex

__all__ = [
    "COSIGNATURE_TYPE",
    "Cosignature",
    "Witness",
    "WitnessRefusedError",
    "cosignature_message",
    "cosignatures_for",
    "is_witnessed",
    "record_cosignature",
    "verify_cosignature",
]

COSIGNATURE_TYPE = "concord.audit.cosignature.v1"
STATE_FORMAT = "concord.audit.witness_state.v1"


class WitnessRefusedError(ConflictError):
    """A witness refused to cosign; ``code`` says why (``audit.*``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class Cosignature(BaseModel):
    """A site's signature over a tree head's size and root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    tree_size: int = Field(ge=0)
    root_hash: Sha256Hex
    timestamp: datetime
    signature: str = Field(max_length=128, description="Base64 Ed25519 signature.")

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        format_utc(value)  # refuses naive datetimes
        return value

    @field_serializer("timestamp")
    def _serialise_timestamp(self, value: datetime) -> str:
        return format_utc(value)

    def message(self) -> bytes:
        """The canonical bytes the site signed."""
        return cosignature_message(self.site_id, self.tree_size, self.root_hash, self.timestamp)


def cosignature_message(site_id: str, tree_size: int, root_hash: str, timestamp: datetime) -> bytes:
    """Canonical bytes of a cosignature (what the site's key signs)."""
    return canonical_json(
        {
            "type": COSIGNATURE_TYPE,
            "site_id": site_id,
            "tree_size": tree_size,
            "root_hash": root_hash,
            "timestamp": format_utc(timestamp),
        }
    )


def verify_cosignature(cosignature: Cosignature, public_key: Ed25519PublicKey) -> None:
    """Check a site's cosignature; ``audit.cosignature_invalid`` if it does not verify."""
    try:
        signature = base64.b64decode(cosignature.signature, validate=True)
        public_key.verify(signature, cosignature.message())
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise InvalidRequestError(
            "audit.cosignature_invalid", "The cosignature does not verify with the site's key."
        ) from exc


# -- site side ---------------------------------------------------------------------------


class _WitnessState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    site_id: str
    server_key_id: str
    head: SignedTreeHead


class Witness:
    """A site's witness: remembers the last cosigned head in ``state_file``."""

    def __init__(
        self,
        state_file: Path,
        site_id: str,
        signing_key: Ed25519PrivateKey,
        server_public_key: Ed25519PublicKey,
    ) -> None:
        self.state_file = Path(state_file)
        self.site_id = site_id
        self._signing_key = signing_key
        self._server_key = server_public_key
        self._server_key_id = key_id(server_public_key)
        self._lock = threading.Lock()
        self._load()  # fail early on a damaged or foreign state file

    @property
    def last_head(self) -> SignedTreeHead | None:
        """The last head this site cosigned (read from the state file)."""
        return self._load()

    def _load(self) -> SignedTreeHead | None:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = _WitnessState.model_validate_json(raw)
        except ValidationError as exc:
            raise WitnessRefusedError(
                "audit.witness_state_invalid",
                f"The witness state file {self.state_file} is damaged; restore it from backup "
                "(deleting it would let this site cosign a rewritten log).",
            ) from exc
        if state.format != STATE_FORMAT or state.site_id != self.site_id:
            raise WitnessRefusedError(
                "audit.witness_state_invalid",
                f"The witness state file {self.state_file} belongs to another site or format.",
            )
        if state.server_key_id != self._server_key_id:
            raise WitnessRefusedError(
                "audit.witness_state_invalid",
                "The witness state was recorded for a different server key.",
            )
        return state.head

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        with self._lock, open(lock_path, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _store(self, head: SignedTreeHead) -> None:
        state = _WitnessState(
            format=STATE_FORMAT,
            site_id=self.site_id,
            server_key_id=self._server_key_id,
            head=head,
        )
        data = state.model_dump_json(indent=2).encode("utf-8")
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_file)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.state_file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def check(self, new_head: SignedTreeHead, consistency_proof: Sequence[bytes]) -> None:
        """Raise :class:`WitnessRefusedError` unless ``new_head`` may be cosigned now."""
        self._check(self._load(), new_head, consistency_proof)

    def _check(
        self,
        last: SignedTreeHead | None,
        new_head: SignedTreeHead,
        proof: Sequence[bytes],
    ) -> None:
        try:
            verify_tree_head(new_head, self._server_key)
        except DomainError as exc:
            raise WitnessRefusedError(exc.code, exc.message) from exc
        if last is None:
            return
        if new_head.tree_size < last.tree_size:
            raise WitnessRefusedError(
                "audit.tree_shrunk",
                f"The log shrank from {last.tree_size} to {new_head.tree_size} leaves.",
            )
        if new_head.timestamp < last.timestamp:
            raise WitnessRefusedError(
                "audit.head_stale", "The head is older than the last head this site cosigned."
            )
        try:
            verify_consistency(last.tree_size, new_head.tree_size, last.root, new_head.root, proof)
        except InvalidProofError as exc:
            raise WitnessRefusedError(
                "audit.tree_inconsistent",
                f"The head of size {new_head.tree_size} does not extend the cosigned head of "
                f"size {last.tree_size}: {exc.reason}.",
            ) from exc

    def cosign(
        self,
        new_head: SignedTreeHead,
        consistency_proof: Sequence[bytes],
        *,
        now: datetime | None = None,
    ) -> Cosignature:
        """Cosign ``new_head`` if it is signed by the server and extends the last head.

        ``consistency_proof`` goes from the last cosigned head's size to ``new_head``'s
        (empty for the first head, or for the same size). The new head is persisted
        before the cosignature is returned.
        """
        with self._exclusive():
            last = self._load()
            self._check(last, new_head, consistency_proof)
            self._store(new_head)
        when = now or utcnow()
        message = cosignature_message(self.site_id, new_head.tree_size, new_head.root_hash, when)
        signature = base64.b64encode(self._signing_key.sign(message)).decode("ascii")
        return Cosignature(
            site_id=self.site_id,
            tree_size=new_head.tree_size,
            root_hash=new_head.root_hash,
            timestamp=when,
            signature=signature,
        )


# -- server side -------------------------------------------------------------------------


def _to_model(row: AuditCosignature) -> Cosignature:
    return Cosignature(
        site_id=row.site_id,
        tree_size=row.tree_size,
        root_hash=row.root_hash,
        timestamp=row.timestamp,
        signature=row.signature,
    )


def record_cosignature(
    session: Session, cosignature: Cosignature, *, site_public_key: str
) -> Cosignature:
    """Verify a site's cosignature with its registered key (base64 raw) and store it.

    The head (size and root) must be one the server signed (``audit.head_not_found``).
    Recording the same cosigned head twice is idempotent; a second, different root for
    the same site and size is refused (``audit.cosignature_conflict``). Flushes.
    """
    head_exists = session.scalar(
        select(func.count())
        .select_from(AuditTreeHead)
        .where(
            AuditTreeHead.tree_size == cosignature.tree_size,
            AuditTreeHead.root_hash == cosignature.root_hash,
        )
    )
    if not head_exists:
        raise NotFoundError(
            "audit.head_not_found",
            f"No signed tree head of size {cosignature.tree_size} with that root.",
        )
    verify_cosignature(cosignature, decode_public_key(site_public_key))
    existing = session.scalars(
        select(AuditCosignature).where(
            AuditCosignature.site_id == cosignature.site_id,
            AuditCosignature.tree_size == cosignature.tree_size,
        )
    ).first()
    if existing is not None:
        if existing.root_hash != cosignature.root_hash:
            raise ConflictError(
                "audit.cosignature_conflict", "This site already cosigned another root."
            )
        return _to_model(existing)
    row = AuditCosignature(
        site_id=cosignature.site_id,
        tree_size=cosignature.tree_size,
        root_hash=cosignature.root_hash,
        timestamp=cosignature.timestamp,
        signature=cosignature.signature,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:  # a concurrent request stored it first
        raise ConflictError(
            "audit.cosignature_conflict", "This site's cosignature for this size was just stored."
        ) from exc
    return cosignature


def cosignatures_for(head: SignedTreeHead, *, session: Session) -> list[Cosignature]:
    """Stored cosignatures of exactly this head (size and root), by site id."""
    rows = session.scalars(
        select(AuditCosignature)
        .where(
            AuditCosignature.tree_size == head.tree_size,
            AuditCosignature.root_hash == head.root_hash,
        )
        .order_by(AuditCosignature.site_id)
    ).all()
    return [_to_model(row) for row in rows]


def is_witnessed(head: SignedTreeHead, quorum: int, *, session: Session) -> bool:
    """True if at least ``quorum`` distinct sites cosigned this head's size and root.

    Cosignatures were verified when recorded; ``consortium audit verify`` re-checks them.
    """
    if quorum < 1:
        raise ValueError("a quorum of zero would witness every head")
    return len({c.site_id for c in cosignatures_for(head, session=session)}) >= quorum
