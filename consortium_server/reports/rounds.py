"""Reading rounds from the audit log: the ``round.completed`` entries, decoded.

The report takes its rounds (the rounds of each study, contributions per site, epsilon
spent over time) from these entries only, never from the federation's own tables: an
entry is covered by the signed tree head, so what the report says about a round can be
checked against the log. The entry's details are
:class:`~concord_protocol.rounds.RoundAuditDetails`, the one typed shape the coordinator
writes: the round's :class:`~concord_protocol.rounds.RoundRecord` as the ServerApp reported
it and ``charged_epsilon``, what the ledger charged per dataset (the study's cumulative
epsilon on that dataset after the round).

Decoding is strict: an entry whose bytes do not match its leaf hash, whose details do not
validate as round details, that is not about a study, or whose charged epsilon is not a
finite non-negative decimal is counted as malformed and otherwise ignored, so one bad entry
shows up in the report as a number instead of failing it or skewing its sums.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry
from concord_protocol.audit.merkle import leaf_hash
from concord_protocol.rounds import RoundAuditDetails
from consortium_server.audit.models import AuditLeaf
from consortium_server.reports.rows import Amount, amount_or_none

__all__ = ["ROUND_ACTION", "AuditedRound", "load_rounds"]

#: The audit action the federation records for every completed round.
ROUND_ACTION = "round.completed"


class AuditedRound(BaseModel):
    """A decoded ``round.completed`` entry: what the report sections read of a round."""

    model_config = ConfigDict(frozen=True)

    index: int
    at: datetime
    study_id: str
    round: int
    participants: list[str]
    samples: dict[str, int]
    epsilon: dict[str, Amount]
    digests: dict[str, str]
    #: The round's evaluation: metrics of the sites' summed noisy histograms.
    evaluation: dict[str, float] = {}


def _parse_round(index: int, entry: AuditEntry) -> AuditedRound | None:
    """Decode one ``round.completed`` entry (None if its details are not round details)."""
    if entry.object.type != "study":
        return None
    try:
        details = RoundAuditDetails.model_validate(entry.details)
    except ValidationError:
        return None
    spent: dict[str, Decimal] = {}
    for dataset_id, value in details.charged_epsilon.items():
        amount = amount_or_none(value)
        if amount is None:
            return None
        spent[dataset_id] = amount
    record = details.record
    return AuditedRound(
        index=index,
        at=entry.at,
        study_id=entry.object.id,
        round=record.round_number,
        participants=sorted(record.participants),
        samples=dict(record.sample_counts),
        epsilon=spent,
        digests=dict(record.site_digests),
        evaluation=dict(record.evaluation),
    )


def load_rounds(
    session: Session, *, tree_size: int | None = None
) -> tuple[list[AuditedRound], int]:
    """Every ``round.completed`` entry below ``tree_size``, decoded, in log order.

    Returns ``(rounds, malformed)``: entries whose details do not have the documented
    shape (or whose bytes do not match their leaf hash) are counted, not returned.
    """
    query = select(AuditLeaf).where(AuditLeaf.action == ROUND_ACTION).order_by(AuditLeaf.index)
    if tree_size is not None:
        query = query.where(AuditLeaf.index < tree_size)
    rounds: list[AuditedRound] = []
    malformed = 0
    for row in session.scalars(query):
        data = bytes(row.entry)
        try:
            if leaf_hash(data) != bytes(row.leaf_hash):
                raise ValueError("leaf hash mismatch")
            entry = AuditEntry.from_canonical_bytes(data)
        except ValueError:
            malformed += 1
            continue
        record = _parse_round(row.index, entry)
        if record is None:
            malformed += 1
            continue
        rounds.append(record)
    return rounds, malformed
