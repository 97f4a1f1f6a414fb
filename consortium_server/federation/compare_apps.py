"""Comparison ServerApp: one study, three ways to aggregate, every message metered.

For ``benchmarks/demo_compare.py``: the same study (model, rounds, DP, sites) run with

* ``ckks``: Concord's own round loop and strategy
  (:func:`~consortium_server.federation.serverapp.run_study_rounds`), encrypted updates
  and a blind sum, unchanged;
* ``fedavg``: the same loop for a contract with ``encryption.enabled: false``: the sites
  send ``n_i * w_i`` as float64 (``PlainCodec``), the server sums them and the sites divide
  by the total weight (weighted FedAvg; the server reads every update);
* ``secagg+``: Flower 1.41's ``SecAggPlusWorkflow`` (the legacy ``FedAvg`` it wraps) for
  the train phase of every round (four message waves: setup, share keys, collect masked
  vectors, unmask), then Concord's evaluate phase with the unmasked model in Concord's
  plaintext wire format. The sites run ``secaggplus_mod`` (see
  :mod:`site_node.federation.compare`).

The method is the run config's ``aggregation`` value. That key exists only in the
comparison bundle (:func:`write_compare_app`), so Concord's own bundle can never select
SecAgg+, and a site runs the comparison bundle only if it allowed its hash
(``ApprovalStore.allow_fab``).

Bytes are metered by :class:`MeteredGrid` around the ServerApp's grid: every message each
way, as Flower 1.41 ships it (the deflated sizes of the message's objects: ``Message``,
``RecordDict``, records, array chunks; no gRPC/TLS framing), per site and round, train and
evaluate apart, the way ``benchmarks/aggregation_compare.py`` measures them. The ServerApp
writes the usual round records and outcome (``read_outcome`` reads them) plus
``traffic.json`` to the plan's records dir.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli
import tomli_w
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from concord_protocol.rounds import RoundRecord
from concord_protocol.wire.messages import REC_METRICS
from consortium_server.federation.grids import ForwardingGrid, wire_bytes
from consortium_server.federation.serverapp import (
    FINAL_MODEL_FILE,
    OUTCOME_FILE,
    run_study_rounds,
    site_of,
    wait_for_nodes,
    write_blobs,
    write_json,
)
from consortium_server.federation.strategy import (
    BlindAggregationStrategy,
    GlobalModel,
    RoundFailedError,
    RunPlan,
    StudyOutcome,
    finish_record,
    new_record,
)

__all__ = [
    "AGGREGATION_KEY",
    "CKKS",
    "FEDAVG",
    "METHODS",
    "SECAGGPLUS",
    "TRAFFIC_FILE",
    "MeteredGrid",
    "RoundTraffic",
    "SecAggPlusSettings",
    "Traffic",
    "app",
    "compare_run_config",
    "read_traffic",
    "run_compare",
    "run_secaggplus_rounds",
    "write_compare_app",
]

log = logging.getLogger("concord.federation.compare")

#: The run-config key naming the method (the site's ClientApp reads the same key).
AGGREGATION_KEY = "aggregation"
CKKS, FEDAVG, SECAGGPLUS = "ckks", "fedavg", "secagg+"
METHODS = (FEDAVG, CKKS, SECAGGPLUS)
TRAFFIC_FILE = "traffic.json"
#: The comparison ServerApp, as the bundle's ``serverapp`` component names it.
SERVERAPP_REF = "consortium_server.federation.compare_apps:app"
#: Flower's reason for a node that went away (the node is missing, not misbehaving).
_UNAVAILABLE = "unavailable"


# --- metering ------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes each way and messages (site's view: ``sent`` is site -> server, ``received``
    and ``messages`` server -> site)."""

    sent: int = 0
    received: int = 0
    messages: int = 0

    def add(self, other: Traffic) -> None:
        """Add ``other`` into this one."""
        self.sent += other.sent
        self.received += other.received
        self.messages += other.messages


@dataclass
class RoundTraffic:
    """What one round put on the wire, per site (or ``node-<id>``) and message type."""

    round_number: int
    per_site: dict[str, dict[str, Traffic]] = field(default_factory=dict)
    waves: int = 0  # send_and_receive calls (server -> sites -> server exchanges)
    wait_seconds: float = 0.0  # inside send_and_receive (sites working, transport)
    metering_seconds: float = 0.0  # spent measuring (included in the round's wall time)

    def site_total(self, site: str) -> Traffic:
        """One site's traffic over every message type."""
        total = Traffic()
        for traffic in self.per_site.get(site, {}).values():
            total.add(traffic)
        return total

    def as_record(self) -> dict[str, Any]:
        """JSON-ready form (``per_site[site][type] = {sent, received, messages}``)."""
        return {
            "round_number": self.round_number,
            "waves": self.waves,
            "wait_seconds": self.wait_seconds,
            "metering_seconds": self.metering_seconds,
            "per_site": {
                site: {kind: vars(t).copy() for kind, t in sorted(kinds.items())}
                for site, kinds in sorted(self.per_site.items())
            },
        }

    @classmethod
    def from_record(cls, body: dict[str, Any]) -> RoundTraffic:
        """Inverse of :meth:`as_record`."""
        return cls(
            round_number=int(body["round_number"]),
            per_site={
                site: {kind: Traffic(**t) for kind, t in kinds.items()}
                for site, kinds in body["per_site"].items()
            },
            waves=int(body["waves"]),
            wait_seconds=float(body["wait_seconds"]),
            metering_seconds=float(body["metering_seconds"]),
        )


class MeteredGrid(ForwardingGrid):
    """A Flower ``Grid`` that forwards to ``grid`` and meters every ``send_and_receive``.

    Each message's bytes are counted for its destination node (``received``), each reply's
    for the node that sent it (``sent``), after the exchange (nothing is measured while
    messages are in flight). Nodes are named by the ``site`` record of their replies once
    known. ``observer``, if set, sees every reply. :meth:`take` hands over a round's figures
    and starts the next. Direct ``push_messages``/``pull_messages`` calls are forwarded
    unmetered (the round loops here use ``send_and_receive`` only).
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.node_sites: dict[int, str] = {}
        self.observer: Callable[[Message], None] | None = None
        self._per_node: dict[int, dict[str, Traffic]] = {}
        self._waves = 0
        self._wait_s = 0.0
        self._metering_s = 0.0

    # -- metered ----------------------------------------------------------------------------

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward the exchange, then count every message and reply."""
        outgoing = list(messages)
        t0 = time.perf_counter()
        replies = list(self.inner.send_and_receive(outgoing, timeout=timeout))
        t1 = time.perf_counter()
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing}
        by_id.pop("", None)
        for msg in outgoing:
            traffic = self._traffic(msg.metadata.dst_node_id, msg.metadata.message_type)
            traffic.received += wire_bytes(msg)
            traffic.messages += 1
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            self._traffic(node, reply.metadata.message_type).sent += wire_bytes(reply)
            site = site_of(reply)
            if site is not None:
                self.node_sites[node] = site
            if self.observer is not None:
                self.observer(reply)
        self._waves += 1
        self._wait_s += t1 - t0
        self._metering_s += time.perf_counter() - t1
        return replies

    def _traffic(self, node: int, kind: str) -> Traffic:
        return self._per_node.setdefault(node, {}).setdefault(kind, Traffic())

    @property
    def wait_seconds(self) -> float:
        """Seconds spent inside ``send_and_receive`` since the last :meth:`take`."""
        return self._wait_s

    def take(self, round_number: int) -> RoundTraffic:
        """The figures since the last call, named by site where known; then reset."""
        per_site: dict[str, dict[str, Traffic]] = {}
        for node, kinds in self._per_node.items():
            label = self.node_sites.get(node, f"node-{node}")
            target = per_site.setdefault(label, {})
            for kind, traffic in kinds.items():
                target.setdefault(kind, Traffic()).add(traffic)
        out = RoundTraffic(round_number, per_site, self._waves, self._wait_s, self._metering_s)
        self._per_node, self._waves, self._wait_s, self._metering_s = {}, 0, 0.0, 0.0
        return out


# --- Flower SecAgg+ rounds ---------------------------------------------------------------


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
        self.errors: list[dict[str, Any]] = []
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
                {
                    "site_id": label,
                    "reason": "error_reply",
                    "detail": f"code {msg.error.code}: {reason[:300]}",
                    "digest": None,
                }
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
    settings: SecAggPlusSettings | None = None,
    hook: Callable[[RoundRecord], None] | None = None,
) -> StudyOutcome:
    """The study's rounds with Flower SecAgg+ as the train phase; same records as Concord's.

    Per round: wait for ``plan.min_sites`` nodes; run ``SecAggPlusWorkflow`` (legacy FedAvg
    over every connected node, round timeout per wave); the unmasked weighted average is
    the new global model, sent in Concord's plaintext wire format (``PlainCodec``, total
    weight 1) with Concord's evaluate content. The round fails, as Concord's does, when
    the workflow halts or fewer than ``plan.min_sites`` study sites contributed. The
    record's ``aggregate_seconds`` is the server's own protocol time (the train phase minus
    the time spent waiting for the sites), ``site_encrypt_seconds`` the sites' masking.
    """
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

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
    for round_number in range(1, plan.rounds + 1):
        started = time.perf_counter()
        record = new_record(plan, round_number)
        replies = _Replies(meter)
        meter.observer = replies
        try:
            nodes = wait_for_nodes(meter, plan.min_sites, plan.node_wait_s)
            record.nodes_contacted = len(nodes)
            if len(nodes) < plan.min_sites:
                record.missing_sites = list(plan.sites)
                raise RoundFailedError(
                    f"{len(nodes)} SuperNodes connected, at least {plan.min_sites} needed",
                    record,
                )
            context = _legacy_context(meter, plan, nodes, round_number, vector)
            before = context.state.array_records[MAIN_PARAMS_RECORD]
            wait0 = meter.wait_seconds
            t0 = time.perf_counter()
            settings.workflow(plan.round_timeout_s)(meter, context)
            record.train_wall_seconds = time.perf_counter() - t0
            record.aggregate_seconds = max(
                0.0, record.train_wall_seconds - (meter.wait_seconds - wait0)
            )
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
            vector = new_vector
            update = codec.encode(vector, weight=1.0, info=strategy.round_info(round_number))
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
        except RoundFailedError as exc:
            exc.record.status = "failed"
            exc.record.failure = str(exc)
            finish_record(exc.record, started)
            outcome.rounds.append(exc.record)
            outcome.status = "failed"
            outcome.failure = f"round {round_number}: {exc}"
            log.warning("SecAgg+ round %d failed: %s", round_number, exc)
            if hook is not None:
                hook(exc.record)
            break
        finally:
            meter.observer = None
        finish_record(record, started)
        outcome.rounds.append(record)
        if hook is not None:
            hook(record)
    else:
        outcome.status = "completed"
    outcome.final_model = model
    return outcome


def _fill_secagg_record(record: RoundRecord, plan: RunPlan, replies: _Replies) -> None:
    mine = {s: r for s, r in replies.collected.items() if s in plan.sites}
    record.participants = sorted(mine)
    record.sample_counts = {s: mine[s].num_examples for s in record.participants}
    record.epsilon = {s: mine[s].epsilon for s in record.participants}
    record.site_train_seconds = {s: mine[s].train_seconds for s in record.participants}
    record.site_encrypt_seconds = {s: mine[s].mask_seconds for s in record.participants}
    record.rejected = list(replies.errors)
    clipped = {s: mine[s].clipped for s in record.participants if mine[s].clipped}
    if clipped:
        record.rejected.append(
            {
                "site_id": ",".join(sorted(clipped)),
                "reason": "secaggplus_clipped",
                "detail": f"values outside the clipping range: {clipped}",
                "digest": None,
            }
        )
    replied = set(mine) | {e["site_id"] for e in replies.errors}
    record.missing_sites = sorted(set(plan.sites) - replied)


# --- the ServerApp -----------------------------------------------------------------------

#: Called with each round's record and what that round put on the wire.
CompareHook = Callable[[RoundRecord, RoundTraffic], None]


def check_method(plan: RunPlan, method: str) -> None:
    """Raise ``ValueError`` unless ``method`` fits the plan's contract."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; one of {', '.join(METHODS)}")
    encrypted = plan.contract.encryption.enabled
    if method == CKKS and not encrypted:
        raise ValueError("ckks needs a contract with encryption enabled")
    if method != CKKS and encrypted:
        raise ValueError(f"{method} needs a contract with encryption disabled")


def run_compare(
    grid: MeteredGrid,
    plan: RunPlan,
    method: str,
    *,
    hook: CompareHook | None = None,
    settings: SecAggPlusSettings | None = None,
) -> StudyOutcome:
    """Run the study's rounds with ``method`` on the metered ``grid``.

    A method that does not fit the contract gives a failed outcome without rounds.
    """
    try:
        check_method(plan, method)
    except ValueError as exc:
        return StudyOutcome(plan.study_id, plan.contract_hash, "failed", failure=str(exc))

    def round_hook(record: RoundRecord) -> None:
        traffic = grid.take(record.round_number)
        if hook is not None:
            hook(record, traffic)

    grid.take(0)  # anything before round 1 is not a round's
    if method == SECAGGPLUS:
        return run_secaggplus_rounds(grid, plan, settings=settings, hook=round_hook)
    return run_study_rounds(grid, plan, hook=round_hook)


def read_traffic(records_dir: Path) -> list[RoundTraffic]:
    """The per-round traffic the comparison ServerApp wrote (empty if none)."""
    path = records_dir / TRAFFIC_FILE
    if not path.is_file():
        return []
    body = json.loads(path.read_text())
    return [RoundTraffic.from_record(r) for r in body["rounds"]]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by Flower for a comparison run."""
    plan = RunPlan.from_run_config(context.run_config)
    method = str(context.run_config.get(AGGREGATION_KEY, CKKS))
    records_dir = plan.records_dir
    rounds: list[dict[str, Any]] = []

    def hook(record: RoundRecord, traffic: RoundTraffic) -> None:
        rounds.append(traffic.as_record())
        if records_dir is not None:
            write_json(records_dir / f"round-{record.round_number:04d}.json", record.as_record())
            write_json(records_dir / TRAFFIC_FILE, {"method": method, "rounds": rounds})

    log.info("comparison %s: %s, %d rounds", plan.study_id, method, plan.rounds)
    outcome = run_compare(MeteredGrid(grid), plan, method, hook=hook)
    if records_dir is not None:
        if outcome.final_model is not None:
            write_blobs(records_dir / FINAL_MODEL_FILE, outcome.final_model.blobs)
        write_json(records_dir / OUTCOME_FILE, outcome.as_record())
    log.info("comparison %s (%s) %s", plan.study_id, method, outcome.status)


# --- the bundle ----------------------------------------------------------------------------


def write_compare_app(dest: Path, *, source: Path | None = None) -> Path:
    """Write the comparison bundle's ``pyproject.toml`` into ``dest``; return ``dest``.

    It is Concord's bundle (``source``, default ``concord_protocol/app``) with this
    module's ServerApp, the same ClientApp, and one more run-config key, ``aggregation``
    (default ``ckks``). Configuration only, like Concord's: the site's guarded runner
    accepts it if the site allowed its hash (``bundle_hash(dest)``) and it names the
    site's ClientApp.
    """
    from concord_protocol.bundle import APP_DIR

    body = tomli.loads(((source or APP_DIR) / "pyproject.toml").read_text())
    body["project"]["name"] = "concord-compare"
    body["project"]["description"] = "Concord aggregation comparison (CKKS, FedAvg, SecAgg+)"
    flwr_app = body["tool"]["flwr"]["app"]
    flwr_app["components"]["serverapp"] = SERVERAPP_REF
    flwr_app["config"][AGGREGATION_KEY] = CKKS
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(body))
    return dest


def compare_run_config(plan: RunPlan, method: str) -> dict[str, str | int | float | bool]:
    """The run config of a comparison run: the plan's plus ``aggregation``."""
    check_method(plan, method)
    return {**plan.to_run_config(), AGGREGATION_KEY: method}
