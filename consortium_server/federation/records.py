"""Round records as the ServerApp fills them, and the outcome of a run.

The record itself is the shared :class:`~concord_protocol.rounds.RoundRecord`; here are the
ServerApp's helpers to start and finish one, the error a round that cannot be aggregated
raises, and :class:`StudyOutcome`, what the round loop
(:func:`consortium_server.federation.serverapp.run_study_rounds`) returns. The consortium
server learns each round from its report, not from the outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from concord_protocol.rounds import RoundRecord
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.plan import RunPlan

__all__ = ["RoundFailedError", "StudyOutcome", "finish_record", "new_record"]


@dataclass
class StudyOutcome:
    """The result of a study run: per-round records and the final (encrypted) model."""

    study_id: str
    contract_hash: str
    status: str  # "completed" | "failed"
    rounds: list[RoundRecord] = field(default_factory=list)
    final_model: GlobalModel | None = None
    failure: str | None = None

    def settle(self, record: RoundRecord, goes_on: bool, reason: str, total_rounds: int) -> bool:
        """Take the server's verdict on a reported round; True when the run ends here.

        A failed round fails the run. A stop after the last round is how a study
        completes; a stop before it (a policy denial, a budget spent, a researcher's
        stop) leaves the run ``stopped`` with the server's reason.
        """
        if record.status != "aggregated":
            self.status = "failed"
            self.failure = f"round {record.round_number}: {record.failure}"
            return True
        if not goes_on:
            done = record.round_number >= total_rounds
            self.status = "completed" if done else "stopped"
            self.failure = None if done else reason
            return True
        return False

    def as_record(self) -> dict[str, Any]:
        """JSON-ready summary (the final model's blobs are not included, only its digest)."""
        return {
            "study_id": self.study_id,
            "contract_hash": self.contract_hash,
            "status": self.status,
            "failure": self.failure,
            "rounds": [r.as_record() for r in self.rounds],
            "final_model": None
            if self.final_model is None
            else {
                "round_number": self.final_model.round_number,
                "total_weight": self.final_model.total_weight,
                "digest": self.final_model.digest,
            },
        }


class RoundFailedError(Exception):
    """The round cannot be aggregated (too few valid replies); carries its record."""

    def __init__(self, message: str, record: RoundRecord) -> None:
        super().__init__(message)
        self.record = record


def _now() -> str:
    return datetime.now(UTC).isoformat()


def new_record(plan: RunPlan, round_number: int) -> RoundRecord:
    """An empty record for ``round_number`` with its start time."""
    return RoundRecord(
        study_id=plan.study_id,
        contract_hash=plan.contract_hash,
        round_number=round_number,
        started_at=_now(),
    )


def finish_record(record: RoundRecord, started: float) -> None:
    """Stamp the end time and wall time of ``record``."""
    record.finished_at = _now()
    record.wall_seconds = time.perf_counter() - started
