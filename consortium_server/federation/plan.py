"""The run plan: everything the ServerApp needs for one run of a study.

The consortium server builds it (:func:`consortium_server.federation.coordinator.plan_for`)
and hands it to Flower as the run config (:meth:`RunPlan.to_run_config`, the keys of the app
bundle's ``[tool.flwr.app.config]``); the ServerApp reads it back
(:meth:`RunPlan.from_run_config`). The run config is not secret: sites see it too.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from concord_protocol.contract import StudyContract

__all__ = ["ATTEMPT_PATTERN", "POLICY_MIN_SITES", "RunPlan"]

#: The consortium policy's floor: no aggregation of fewer sites, whatever a contract says.
POLICY_MIN_SITES = 3
#: A run attempt's id (random, from the server).
ATTEMPT_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RunPlan:
    """Everything the ServerApp needs for one study run (carried in the Flower run config).

    ``public_context`` is ``None`` when the contract turns encryption off. ``sites`` are the
    study's approved sites. ``start_round`` is 1 for a new run; a run restarted after a crash
    starts after the last recorded round, from that round's checkpoint (which the ServerApp
    asks the server for). ``attempt`` names this run to the server: the reports of a run the
    server replaced are refused.
    """

    study_id: str
    contract: StudyContract
    contract_hash: str
    num_params: int
    sites: tuple[str, ...]
    public_context: bytes | None = None
    node_wait_s: float = 60.0
    start_round: int = 1
    attempt: str = "0" * 32

    def __post_init__(self) -> None:
        if self.contract.contract_hash() != self.contract_hash:
            raise ValueError("contract does not hash to contract_hash")
        if self.contract.encryption.enabled and self.public_context is None:
            raise ValueError("encryption is on but no public context was given")
        if self.num_params < 1:
            raise ValueError("num_params must be positive")
        # rounds + 1: a resumed study whose rounds are all done (nothing is started for it).
        if not 1 <= self.start_round <= self.rounds + 1:
            raise ValueError(f"start_round must be within 1..{self.rounds + 1}")
        if not ATTEMPT_PATTERN.match(self.attempt):
            raise ValueError("attempt must be 32 lowercase hex digits")

    @property
    def rounds(self) -> int:
        """Rounds to run (from the contract)."""
        return self.contract.training.rounds

    @property
    def min_sites(self) -> int:
        """Valid replies needed per aggregation: the contract's, never below the policy 3."""
        return max(POLICY_MIN_SITES, self.contract.federation.min_sites)

    @property
    def round_timeout_s(self) -> float:
        """Seconds to wait for the sites' replies each round."""
        return float(self.contract.federation.round_timeout_s)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flat run-config values (keys exist in the app's ``[tool.flwr.app.config]``)."""
        return {
            "study-id": self.study_id,
            "contract-hash": self.contract_hash,
            "contract": self.contract.canonical().decode(),
            "num-params": self.num_params,
            "sites": ",".join(self.sites),
            "public-context": base64.b64encode(self.public_context or b"").decode(),
            "node-wait-s": float(self.node_wait_s),
            "start-round": self.start_round,
            "attempt": self.attempt,
        }

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunPlan:
        """Parse the run config written by :meth:`to_run_config`."""
        contract = StudyContract.model_validate_json(str(config["contract"]))
        public = base64.b64decode(str(config.get("public-context", "")), validate=True)
        return cls(
            study_id=str(config["study-id"]),
            contract=contract,
            contract_hash=str(config["contract-hash"]),
            num_params=int(config["num-params"]),
            sites=tuple(s for s in str(config["sites"]).split(",") if s),
            public_context=public or None,
            node_wait_s=float(config.get("node-wait-s", 60.0)),
            start_round=int(config.get("start-round", 1)),
            attempt=str(config.get("attempt", "0" * 32)),
        )
