"""Flower SecAgg+ as the train phase of a study's rounds (the comparison's ``secagg+``).

Per round, Flower 1.41's ``SecAggPlusWorkflow`` (with the legacy ``FedAvg`` it wraps) runs
the train phase over every connected node in four message waves (setup, share keys, collect
masked vectors, unmask); the sites answer through Flower's ``secaggplus_mod``
(:mod:`benchmarks.apps.compare_client`). The unmasked weighted average becomes the new
global model, sent to the sites for evaluation in Concord's plaintext wire format
(``PlainCodec``, total weight 1) with Concord's evaluate content, and the round is recorded
in the same :class:`~concord_protocol.rounds.RoundRecord` as Concord's own rounds, then
handed to the run's round gate, as Concord's round loop does.

SecAgg+ hides each site's update but shows the server the sum: the loop refuses a
contract that asks for encrypted aggregation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from benchmarks.apps.metering import MeteredGrid
from concord_protocol.rounds import RejectedReply, RoundRecord
from concord_protocol.wire.messages import REC_METRICS
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.gate_client import RoundGate
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import (
    RoundFailedError,
    StudyOutcome,
    finish_record,
    new_record,
)
from consortium_server.federation.serverapp import site_of, wait_for_nodes
from consortium_server.federation.strategy import BlindAggregationStrategy

__all__ = ["SecAggPlusSettings", "run_secaggplus_rounds"]

log = logging.getLogger("concord.benchmarks.compare")

#: Flower's reason for a node that went away (the node is missing, not misbehaving).
_UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class SecAggPlusSettings:
    """``SecAggPlusWorkflow`` parameters (Flower's defaults, every site a neighbour).

    ``max_weight`` must bound a site's sample count (quantisation scales by ``n_i /
    max_weight``); values outside ``±clipping_range`` are clipped (the sites report how
    many in ``clipped-values``).
    """

    num_shares: float = 1.0
    reconstruction_fraction: float = 2 / 3
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    def workflow(self, timeout: float | None) -> Any:
        """A fresh ``SecAggPlusWorkflow`` with these settings."""
        from flwr.server.workflow import SecAggPlusWorkflow

        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_fraction,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=timeout,
        )


def _legacy_context(
    grid: Grid, plan: RunPlan, nodes: list[int], round_number: int, vector: Any
) -> Any:
    """The ``LegacyContext`` SecAggPlusWorkflow runs on: legacy FedAvg over ``nodes``."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Parameters, ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    run = getattr(grid, "run", None)
    run_id = int(getattr(run, "run_id", 0) or 0)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=run_id))

    def fit_config(server_round: int) -> dict[str, Any]:
        return {
            "round": server_round,
            "study-id": plan.study_id,
            "contract-hash": plan.contract_hash,
        }

    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=plan.min_sites,
        min_available_clients=plan.min_sites,
        on_fit_config_fn=fit_config,
    )
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=plan.rounds),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: round_number}
    )
    params = (
        ndarrays_to_parameters([np.asarray(vector, dtype=np.float64)])
        if vector is not None
        else Parameters(tensors=[], tensor_type="numpy.ndarray")
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        params, keep_input=True
    )
    return context


def _aggregate_of(context: Any, before: ArrayRecord, num_params: int) -> Any:
    """The unmasked average the workflow stored, or ``None`` if it halted."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    after = context.state.array_records[MAIN_PARAMS_RECORD]
    if after is before:
        return None
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
    vector = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    if vector.shape[0] != num_params or not np.isfinite(vector).all():
        raise ValueError(f"the unmasked aggregate has {vector.shape[0]} values or is not finite")
    return vector


@dataclass
class _CollectReply:
    node: int
    site_id: str
    num_examples: int
    epsilon: float | None
    train_seconds: float
    mask_seconds: float
    clipped: int


class _Replies:
    """Observer of one SecAgg+ round's replies: collect-stage metadata and errors."""

    def __init__(self, grid: MeteredGrid) -> None:
        self.grid = grid
        self.collected: dict[str, _CollectReply] = {}
        self.errors: list[RejectedReply] = []
        self.unavailable: set[int] = set()

    def __call__(self, msg: Message) -> None:
        node = msg.metadata.src_node_id
        if msg.has_error():
            reason = msg.error.reason or ""
            if _UNAVAILABLE in reason.lower():
                self.unavailable.add(node)
                return
            label = self.grid.node_sites.get(node, f"node-{node}")
            self.errors.append(
                RejectedReply(
                    site_id=label,
                    reason="error_reply",
                    detail=f"code {msg.error.code}: {reason[:300]}",
                )
            )
            return
        content = msg.content
        site = site_of(msg)
        if site is None or REC_METRICS not in content.metric_records:
            return  # setup, share-keys and unmask replies carry only SecAgg+ records
        metrics = content.metric_records[REC_METRICS]

        def num(key: str, default: float = 0.0) -> float:
            value = metrics.get(key, default)
            return float(value) if isinstance(value, int | float) else default

        eps = num("epsilon", -1.0)
        self.collected[site] = _CollectReply(
            node=node,
            site_id=site,
            num_examples=int(num("num-examples")),
            epsilon=eps if eps >= 0 else None,
            train_seconds=num("train-seconds"),
            mask_seconds=num("encrypt-seconds"),
            clipped=int(num("clipped-values")),
        )


def run_secaggplus_rounds(
    grid: Grid,
    plan: RunPlan,
    *,
    gate: RoundGate,
    settings: SecAggPlusSettings | None = None,
) -> StudyOutcome:
    """The study's rounds with Flower SecAgg+ as the train phase; same records as Concord's.

    Per round: wait for ``plan.min_sites`` nodes; run ``SecAggPlusWorkflow`` (legacy FedAvg
    over every connected node, round timeout per wave); the unmasked weighted average is
    the new global model, sent in Concord's plaintext wire format (``PlainCodec``, total
    weight 1) with Concord's evaluate content. The round fails, as Concord's does, when
    the workflow halts or fewer than ``plan.min_sites`` study sites contributed. Each
    record (and the round's model, when aggregated) goes to ``gate``, and the next round
    runs only after a ``continue``, as in Concord's loop. The record's
    ``aggregate_seconds`` is the server's own protocol time (the train phase minus the time
    spent waiting for the sites), ``site_encrypt_seconds`` the sites' masking.
    """
    from site_node.crypto.codecs import PlainCodec

    if plan.contract.encryption.enabled:
        raise ValueError("SecAgg+ reveals the sum to the server: the contract asks for encryption")
    settings = settings or SecAggPlusSettings()
    meter = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
    strategy = BlindAggregationStrategy(plan)  # evaluate contents and metrics only
    codec = PlainCodec()
    outcome = StudyOutcome(plan.study_id, plan.contract_hash, status="running")
    vector: Any = None
    model: GlobalModel | None = None
    for round_number in range(1, plan.rounds + 1):  # no resume: a benchmark reruns
        if gate.stop_requested:
            outcome.status = "stopped"
            outcome.failure = "the run was asked to stop"
            break
        started = time.perf_counter()
        record = new_record(plan, round_number)
        replies = _Replies(meter)
        meter.observer = replies
        aggregate: GlobalModel | None = None
        try:
            aggregate, vector = _secaggplus_round(
                meter, plan, record, replies, settings, strategy, codec, vector
            )
        except RoundFailedError as exc:
            record = exc.record
            record.status = "failed"
            record.failure = str(exc)
            log.warning("SecAgg+ round %d failed: %s", round_number, exc)
        finally:
            meter.observer = None
        finish_record(record, started)
        outcome.rounds.append(record)
        if aggregate is not None:
            model = aggregate
        verdict = gate.report(record, aggregate)
        if outcome.settle(record, verdict.goes_on, verdict.reason, plan.rounds):
            break
    else:
        outcome.status = "completed"
    outcome.final_model = model
    return outcome


def _secaggplus_round(
    meter: MeteredGrid,
    plan: RunPlan,
    record: RoundRecord,
    replies: _Replies,
    settings: SecAggPlusSettings,
    strategy: BlindAggregationStrategy,
    codec: Any,
    vector: Any,
) -> tuple[GlobalModel, Any]:
    """One round (see :func:`run_secaggplus_rounds`): the new model and its vector; raises
    :class:`RoundFailedError` with the record filled in."""
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    round_number = record.round_number
    nodes = wait_for_nodes(meter, plan.min_sites, plan.node_wait_s)
    record.nodes_contacted = len(nodes)
    if len(nodes) < plan.min_sites:
        record.missing_sites = list(plan.sites)
        raise RoundFailedError(
            f"{len(nodes)} SuperNodes connected, at least {plan.min_sites} needed", record
        )
    context = _legacy_context(meter, plan, nodes, round_number, vector)
    before = context.state.array_records[MAIN_PARAMS_RECORD]
    wait0 = meter.wait_seconds
    t0 = time.perf_counter()
    settings.workflow(plan.round_timeout_s)(meter, context)
    record.train_wall_seconds = time.perf_counter() - t0
    record.aggregate_seconds = max(0.0, record.train_wall_seconds - (meter.wait_seconds - wait0))
    _fill_secagg_record(record, plan, replies)
    new_vector = _aggregate_of(context, before, plan.num_params)
    unknown = sorted(set(replies.collected) - set(plan.sites))
    if new_vector is None or unknown or len(record.participants) < plan.min_sites:
        why = (
            f"replies from sites outside the study: {unknown}"
            if unknown
            else f"SecAgg+ aggregated {len(record.participants)} sites, "
            f"at least {plan.min_sites} needed"
        )
        raise RoundFailedError(why, record)
    update = codec.encode(new_vector, weight=1.0, info=strategy.round_info(round_number))
    model = GlobalModel(round_number, tuple(update.to_bytes_list()), 1.0, update.digest)
    record.aggregate_digest = update.digest
    record.total_weight = float(sum(record.sample_counts.values()))
    record.status = "aggregated"
    eval_nodes = [replies.collected[s].node for s in record.participants]
    t0 = time.perf_counter()
    eval_replies = meter.send_and_receive(
        [
            meter.create_message(
                content=strategy.content(round_number, model),
                message_type="evaluate",
                dst_node_id=node,
                group_id=f"{plan.study_id}/{round_number}",
                ttl=plan.round_timeout_s + 30.0,
            )
            for node in eval_nodes
        ],
        timeout=plan.round_timeout_s,
    )
    record.evaluate_wall_seconds = time.perf_counter() - t0
    record.evaluation = strategy.aggregate_evaluate(eval_replies)
    return model, new_vector


def _fill_secagg_record(record: RoundRecord, plan: RunPlan, replies: _Replies) -> None:
    mine = {s: r for s, r in replies.collected.items() if s in plan.sites}
    record.participants = sorted(mine)
    record.sample_counts = {s: mine[s].num_examples for s in record.participants}
    record.epsilon = {s: mine[s].epsilon for s in record.participants}
    record.site_train_seconds = {s: mine[s].train_seconds for s in record.participants}
    record.site_encrypt_seconds = {s: mine[s].mask_seconds for s in record.participants}
    rejected = list(replies.errors)
    clipped = {s: mine[s].clipped for s in record.participants if mine[s].clipped}
    if clipped:
        rejected.append(
            RejectedReply(
                site_id=",".join(sorted(clipped))[:128],
                reason="secaggplus_clipped",
                detail=f"values outside the clipping range: {clipped}"[:2000],
            )
        )
    record.rejected = rejected
    replied = set(mine) | {e.site_id for e in replies.errors}
    record.missing_sites = sorted(set(plan.sites) - replied)
