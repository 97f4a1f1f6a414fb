"""The run plan: everything the ServerApp needs for one run of a study.

The consortium server builds it (:func:`consortium_server.federation.coordinator.plan_for`)
and hands it to Flower as the run config (:meth:`RunPlan.to_run_config`, the keys of the app
bundle's ``[tool.flwr.app.config]``); the ServerApp reads it back
(:meth:`RunPlan.from_run_config`). The run config is not secret: sites see it too.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from concord_protocol.contract import StudyContract
from concord_protocol.site_keys import site_key_fingerprint

__all__ = ["ATTEMPT_PATTERN", "POLICY_MIN_SITES", "RunPlan", "SitePeer"]

#: The consortium policy's floor: no aggregation of fewer sites, whatever a contract says.
POLICY_MIN_SITES = 3
#: A run attempt's id (random, from the server).
ATTEMPT_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SitePeer:
    """A roster site as the ServerApp knows it: its enrolled SuperNode and its keys.

    ``node_id`` is the SuperLink's id of the SuperNode key the site enrolled (``None`` when
    the server does not register SuperNode keys: then any node may answer for the site, and
    only the signature on its contribution tells). The keys must hash to the fingerprint
    the contract's roster names for the site (checked by :class:`RunPlan`).
    """

    site_id: str
    node_id: int | None
    signing_public_key: str
    exchange_public_key: str

    def to_json(self) -> dict[str, Any]:
        """The run-config form of the peer."""
        return {
            "site_id": self.site_id,
            "node_id": self.node_id,
            "signing_public_key": self.signing_public_key,
            "exchange_public_key": self.exchange_public_key,
        }

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> SitePeer:
        """Inverse of :meth:`to_json`."""
        node = item.get("node_id")
        return cls(
            site_id=str(item["site_id"]),
            node_id=int(node) if node is not None else None,
            signing_public_key=str(item["signing_public_key"]),
            exchange_public_key=str(item["exchange_public_key"]),
        )


@dataclass(frozen=True)
class RunPlan:
    """Everything the ServerApp needs for one study run (carried in the Flower run config).

    ``public_context`` is ``None`` when the contract turns encryption off. ``sites`` are the
    study's approved sites. ``start_round`` is 1 for a new run; a run restarted after a crash
    starts after the last recorded round, from that round's checkpoint (which the ServerApp
    asks the server for). ``attempt`` names this run to the server: the reports of a run the
    server replaced are refused. ``peers``: the roster's sites with their enrolled node ids
    and keys (the ServerApp contacts only these nodes and checks each reply's signed
    contribution with these keys); empty only in tests of the round loop alone.
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
    peers: tuple[SitePeer, ...] = ()

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
        for peer in self.peers:
            member = self.contract.member(peer.site_id)
            if member is None:
                raise ValueError(f"peer {peer.site_id!r} is not in the contract's roster")
            keys = site_key_fingerprint(peer.signing_public_key, peer.exchange_public_key)
            if keys != member.key_fingerprint:
                raise ValueError(f"peer {peer.site_id!r}'s keys are not the roster's")

    def peer(self, site_id: str) -> SitePeer | None:
        """The roster peer ``site_id``, if the plan names it."""
        return next((p for p in self.peers if p.site_id == site_id), None)

    @property
    def node_sites(self) -> dict[int, str]:
        """Enrolled node id -> the site it belongs to (peers with a known node only)."""
        return {p.node_id: p.site_id for p in self.peers if p.node_id is not None}

    def max_examples(self, site_id: str) -> int | None:
        """The most weight ``site_id``'s update may carry (its roster entry)."""
        member = self.contract.member(site_id)
        return member.max_examples if member is not None else None

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
            "site-peers": json.dumps([p.to_json() for p in self.peers], sort_keys=True),
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
            peers=tuple(
                SitePeer.from_json(item) for item in json.loads(str(config.get("site-peers", "[]")))
            ),
        )
