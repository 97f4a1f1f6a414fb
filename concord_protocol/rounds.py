"""The one typed record of a federated round: what happened, with no values and no tensors.

The ServerApp fills one :class:`RoundRecord` per round and posts it to the consortium
server; the server's ledger charges each site's reported epsilon from it, the audit log
stores it as the details of the ``round.completed`` / ``round.failed`` entry
(:class:`RoundAuditDetails`: the record plus what the ledger charged), and the compliance
reports read it back from those entries. Nothing else reshapes a round.

Epsilon is the site accountant's value for the whole study so far (cumulative, per site);
``None`` means the site reported nothing usable. ``spend`` holds each site's signed spend
report, from every reply of the site's node, summed or not: the ledger charges those.
``rejected`` lists replies that were dropped, each with its site (or ``node-<id>``), a
stable reason and a detail.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt

__all__ = [
    "ROUND_ACTIONS",
    "RejectedReply",
    "RoundAuditDetails",
    "RoundRecord",
    "RoundStatus",
    "SiteSpend",
]

RoundStatus = Literal["running", "aggregated", "failed"]
#: The audit actions of a finished round.
ROUND_ACTIONS = ("round.completed", "round.failed")

SiteId = Annotated[str, Field(min_length=1, max_length=128)]


class RejectedReply(BaseModel):
    """A reply the round did not sum, and why (``reason`` is a stable code)."""

    model_config = ConfigDict(extra="forbid")

    site_id: str = Field(max_length=128, description="The site, or `node-<id>` if unknown.")
    reason: str = Field(max_length=64)
    detail: str = Field(default="", max_length=2000)
    digest: str | None = Field(default=None, description="Update digest, when it had one.")
    chunk_index: int | None = Field(default=None, description="The offending chunk, if one.")

    def as_record(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return self.model_dump(mode="json")


class SiteSpend(BaseModel):
    """A site's verified spend report for the round (see :mod:`concord_protocol.spend_reports`).

    Taken from every train reply that came from the site's enrolled node with a report its
    key signed, whether or not the update was summed: the site spent once it trained.
    """

    model_config = ConfigDict(extra="forbid")

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: NonNegativeInt
    num_samples: NonNegativeInt
    evaluations: NonNegativeInt = 0
    evaluation_noise_multiplier: float | None = None


class RoundRecord(BaseModel):
    """What happened in one round of a study (JSON-ready; no values, no tensors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    study_id: str = Field(min_length=1, max_length=128)
    contract_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    round_number: int = Field(ge=1, le=100_000)
    status: RoundStatus = "running"
    started_at: str = ""
    finished_at: str = ""
    wall_seconds: NonNegativeFloat = 0.0
    train_wall_seconds: NonNegativeFloat = 0.0
    evaluate_wall_seconds: NonNegativeFloat = 0.0
    aggregate_seconds: NonNegativeFloat = 0.0
    site_train_seconds: dict[SiteId, float] = Field(default_factory=dict)
    site_encrypt_seconds: dict[SiteId, float] = Field(default_factory=dict)
    nodes_contacted: NonNegativeInt = 0
    participants: list[SiteId] = Field(default_factory=list)
    sample_counts: dict[SiteId, NonNegativeInt] = Field(default_factory=dict)
    epsilon: dict[SiteId, float | None] = Field(default_factory=dict)
    #: Every site's verified spend report this round (accepted or rejected reply alike).
    spend: dict[SiteId, SiteSpend] = Field(default_factory=dict)
    #: Sites whose reply came from their node without a usable signed spend report, and why.
    spend_problems: dict[SiteId, str] = Field(default_factory=dict)
    site_digests: dict[SiteId, str] = Field(default_factory=dict)
    aggregate_digest: str | None = None
    total_weight: NonNegativeFloat = 0.0
    rejected: list[RejectedReply] = Field(default_factory=list)
    missing_sites: list[SiteId] = Field(default_factory=list)
    evaluation: dict[str, float] = Field(default_factory=dict)
    #: Sites that refused to evaluate the round's aggregate (an ``aggregate.*`` or
    #: ``evaluation.*`` code in ``detail``): a site that finds the aggregate forged says so.
    evaluation_refusals: list[RejectedReply] = Field(default_factory=list)
    failure: str | None = Field(default=None, max_length=4000)

    def as_record(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for the audit log and files)."""
        return self.model_dump(mode="json")

    @property
    def orchestration_seconds(self) -> float:
        """Train-phase wall time not spent training/encrypting at the slowest site."""
        busiest = max(
            (
                self.site_train_seconds.get(s, 0.0) + self.site_encrypt_seconds.get(s, 0.0)
                for s in self.participants
            ),
            default=0.0,
        )
        return max(0.0, self.train_wall_seconds - busiest)


class RoundAuditDetails(BaseModel):
    """The details of a ``round.completed`` / ``round.failed`` audit entry.

    ``record`` is the round as the federation reported it; ``charged_epsilon`` what the
    ledger charged for it, per **dataset**: the study's cumulative epsilon on that dataset
    after this round (as a decimal string), for every round a site trained in, from its
    signed spend report; ``overcharged`` is kept only to read entries written before
    overspends were charged (the charges the ledger then refused).
    """

    model_config = ConfigDict(extra="forbid")

    record: RoundRecord
    charged_epsilon: dict[str, str] = Field(default_factory=dict)
    overcharged: list[str] = Field(default_factory=list)
    #: Per dataset, epsilon charged beyond the study's reservation (it blocks the release).
    overspent: dict[str, str] = Field(default_factory=dict)
    #: Per site, the ledger's own recomputation of the cumulative epsilon (decimal string).
    recomputed_epsilon: dict[str, str] = Field(default_factory=dict)
    #: Site reports the ledger refused (negative, falling, missing, off-plan) or disputed.
    refused_reports: list[str] = Field(default_factory=list)
