"""What the ServerApp and the consortium server say to each other about a run.

The ServerApp runs in the SuperLink's pod; it reaches the server only through the internal
API (:mod:`consortium_server.federation.internal_router`), authenticated with the
federation token. After every round it reports the round and waits for the verdict: it
sends the next round's train messages only after a ``continue``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from concord_protocol.rounds import RoundRecord

__all__ = ["CHECKPOINT_MEDIA_TYPE", "RoundReport", "RunFailure", "RunVerdict", "Verdict"]

#: Media type of a checkpoint body: the aggregate's blobs, length-prefixed.
CHECKPOINT_MEDIA_TYPE = "application/vnd.concord.blobs"

Verdict = Literal["continue", "stop"]


class RoundReport(BaseModel):
    """A finished round, as the ServerApp posts it (its checkpoint was uploaded first)."""

    model_config = ConfigDict(extra="forbid")

    record: RoundRecord


class RunVerdict(BaseModel):
    """The server's answer: go on with ``next_round``, or stop (with the reason)."""

    model_config = ConfigDict(extra="forbid")

    action: Verdict
    reason: str = ""
    next_round: int | None = Field(default=None, ge=1)

    @property
    def goes_on(self) -> bool:
        """True for ``continue``."""
        return self.action == "continue"


class RunFailure(BaseModel):
    """The ServerApp stopped on an error it could not handle (the run can be restarted)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=4000)
