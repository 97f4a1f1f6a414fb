"""Checkpoints of a running study: each round's encrypted aggregate, kept in the database.

After every aggregated round the ServerApp hands the server the new aggregate (still
encrypted: the server can read it no more than the live one) before it reports the round;
a run that restarts after a crash starts from the checkpoint of the last recorded round,
and the final round's checkpoint becomes the aggregate the release gate keeps. Only the
newest :data:`KEEP` rounds of a study are kept.

On the wire (the ServerApp's ``PUT`` and ``GET``) a checkpoint is :func:`pack_checkpoint`:
its manifest (the signed contributions it sums, JSON) and then its blobs, each framed by
:func:`pack_blobs` (preceded by its length as 8 bytes big-endian). Functions take
a session and flush; the caller commits.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, ForeignKey, Integer, LargeBinary, String, Text, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from concord_protocol.errors import WireFormatError
from concord_protocol.wire.format import EncodedUpdate
from consortium_server.db.base import Base, UTCDateTime, utcnow

__all__ = [
    "KEEP",
    "GlobalModel",
    "RoundCheckpoint",
    "blobs_sha256",
    "get_checkpoint",
    "pack_blobs",
    "pack_checkpoint",
    "store_checkpoint",
    "unpack_blobs",
    "unpack_checkpoint",
]

#: Checkpoints kept per study (the newest rounds).
KEEP = 2
_LENGTH = struct.Struct(">Q")


@dataclass(frozen=True)
class GlobalModel:
    """The current global model as the server holds it: an aggregate it cannot read, and
    the manifest of signed contributions it sums (JSON; ``""`` for a plain test model)."""

    round_number: int
    blobs: tuple[bytes, ...]
    total_weight: float
    digest: str
    manifest: str = ""


def pack_blobs(blobs: Iterable[bytes]) -> bytes:
    """Length-prefixed (8 bytes, big-endian) concatenation of ``blobs``."""
    return b"".join(_LENGTH.pack(len(blob)) + bytes(blob) for blob in blobs)


def unpack_blobs(data: bytes) -> list[bytes]:
    """Inverse of :func:`pack_blobs`; ``update.malformed`` if the framing is broken."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + _LENGTH.size > len(data):
            raise WireFormatError("a checkpoint blob's length is cut short")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + size > len(data):
            raise WireFormatError("a checkpoint blob is cut short")
        out.append(bytes(data[pos : pos + size]))
        pos += size
    return out


def pack_checkpoint(model: GlobalModel) -> bytes:
    """The checkpoint on the wire: the manifest, then the aggregate's blobs."""
    return pack_blobs([model.manifest.encode(), *model.blobs])


def unpack_checkpoint(data: bytes) -> tuple[str, list[bytes]]:
    """Inverse of :func:`pack_checkpoint`: (manifest, blobs)."""
    blobs = unpack_blobs(data)
    if not blobs:
        raise WireFormatError("a checkpoint without its manifest")
    try:
        manifest = blobs[0].decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError("a checkpoint's manifest is not text") from None
    return manifest, blobs[1:]


def blobs_sha256(blobs: Iterable[bytes]) -> str:
    """SHA-256 (hex) of the packed blobs: what a checkpoint's integrity is checked against."""
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(_LENGTH.pack(len(blob)))
        digest.update(blob)
    return digest.hexdigest()


class RoundCheckpoint(Base):
    """The encrypted aggregate of one round of a study (packed blobs)."""

    __tablename__ = "round_checkpoints"

    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    round_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    total_weight: Mapped[float] = mapped_column(Float)
    blobs_sha256: Mapped[str] = mapped_column(String(64))
    blobs: Mapped[bytes] = mapped_column(LargeBinary)
    manifest: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def model(self) -> GlobalModel:
        """The aggregate, checked against the digest it was stored with."""
        blobs = unpack_blobs(bytes(self.blobs))
        if blobs_sha256(blobs) != self.blobs_sha256:
            raise WireFormatError(
                f"the checkpoint of round {self.round_number} is corrupt",
                code="update.digest_mismatch",
            )
        return GlobalModel(
            self.round_number, tuple(blobs), self.total_weight, self.digest, self.manifest
        )


def store_checkpoint(
    session: Session, study_id: str, model: GlobalModel, *, expect: Sequence[str] = ()
) -> RoundCheckpoint:
    """Keep ``model`` as the checkpoint of its round (replacing an earlier upload of the same
    round), then drop all but the newest :data:`KEEP` rounds of the study.

    The blobs must parse as an update of the wire format whose digest is ``model.digest``
    (``update.*`` codes otherwise). ``expect``: scheme names the update may have.
    """
    update = EncodedUpdate.from_bytes_list(list(model.blobs))
    if update.digest != model.digest:
        raise WireFormatError(
            "the checkpoint's blobs do not have the digest it names",
            code="update.digest_mismatch",
        )
    if expect and update.header.scheme not in expect:
        raise WireFormatError(
            f"the checkpoint is a {update.header.scheme} update", code="update.header_mismatch"
        )
    row = session.get(RoundCheckpoint, (study_id, model.round_number))
    if row is None:
        row = RoundCheckpoint(study_id=study_id, round_number=model.round_number)
        session.add(row)
    row.digest = model.digest
    row.total_weight = float(model.total_weight)
    row.blobs = pack_blobs(model.blobs)
    row.blobs_sha256 = blobs_sha256(model.blobs)
    row.manifest = model.manifest
    row.created_at = utcnow()
    session.flush()
    newest = session.scalars(
        select(RoundCheckpoint.round_number)
        .where(RoundCheckpoint.study_id == study_id)
        .order_by(RoundCheckpoint.round_number.desc())
        .limit(KEEP)
    ).all()
    session.execute(
        delete(RoundCheckpoint)
        .where(RoundCheckpoint.study_id == study_id, RoundCheckpoint.round_number.not_in(newest))
        .execution_options(synchronize_session=False)
    )
    return row


def get_checkpoint(session: Session, study_id: str, round_number: int) -> RoundCheckpoint | None:
    """The stored checkpoint of ``round_number`` of the study, if it is still kept."""
    return session.get(RoundCheckpoint, (study_id, round_number))
