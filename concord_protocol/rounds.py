"""The one typed record of a federated round: what happened, with no values and no tensors.

The federation writes it (the ServerApp fills one per round), the consortium server's
ledger charges from it, the audit log stores it as the details of ``round.completed`` /
``round.failed``, and the compliance reports read it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RoundRecord"]


@dataclass
class RoundRecord:
    """What happened in one round, JSON-ready for the audit log (no values, no tensors)."""

    study_id: str
    contract_hash: str
    round_number: int
    status: str = "running"  # "aggregated" | "failed"
    started_at: str = ""
    finished_at: str = ""
    wall_seconds: float = 0.0
    train_wall_seconds: float = 0.0
    evaluate_wall_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    site_train_seconds: dict[str, float] = field(default_factory=dict)
    site_encrypt_seconds: dict[str, float] = field(default_factory=dict)
    nodes_contacted: int = 0
    participants: list[str] = field(default_factory=list)
    sample_counts: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float | None] = field(default_factory=dict)
    site_digests: dict[str, str] = field(default_factory=dict)
    aggregate_digest: str | None = None
    total_weight: float = 0.0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    missing_sites: list[str] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)
    failure: str | None = None

    def as_record(self) -> dict[str, Any]:
        """Plain dict for JSON / the audit log."""
        return asdict(self)

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
