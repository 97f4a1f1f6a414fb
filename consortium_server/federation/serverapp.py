"""The Flower ServerApp of a study run: rounds of blind aggregation, each one gated.

``app`` is what the app bundle's ``[tool.flwr.app.components] serverapp`` names. It reads the
:class:`~consortium_server.federation.plan.RunPlan` from the run config (written by the
consortium server when it starts the run), and runs :func:`run_study_rounds` with an
:class:`~consortium_server.federation.gate_client.ApiRoundGate`: after every round it
uploads the encrypted aggregate and reports the round to the consortium server's internal
API, and it sends the next round only after the server answers ``continue`` (the server has
recorded the round, charged the ledger and checked the next round's policy in that one
answer). A heartbeat thread tells the server the run is alive. A run the server restarts
after a crash starts after the last recorded round, from that round's aggregate, which the
ServerApp fetches from the server. Logs carry counts, site ids and digests only.

One round (see ``docs/architecture.md``): wait until at least ``min_sites`` SuperNodes are
connected; send ``train`` with the previous encrypted aggregate to every node; wait for
replies up to the contract's round timeout; drop bad replies with a record; blind-sum the
rest (at least ``min_sites``, else the round fails and the server ends the study); send
``evaluate`` with the new aggregate to the accepted sites' nodes (when the contract
releases evaluations); sum their noisy histograms into the round's metrics;
report, and wait for the verdict.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import httpx
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.http_grid import HttpGrid

from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.gate_client import ApiRoundGate, RoundGate
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import (
    RoundFailedError,
    StudyOutcome,
    finish_record,
    new_record,
)
from consortium_server.federation.serverapp_settings import ServerAppSettings
from consortium_server.federation.strategy import BlindAggregationStrategy

__all__ = [
    "REPLY_POLL_S",
    "app",
    "collect_replies",
    "exchange",
    "run_gated",
    "run_study_rounds",
    "site_of",
    "wait_for_nodes",
]

log = logging.getLogger("concord.federation.server")


def wait_for_nodes(
    grid: Grid, minimum: int, wait_s: float, *, allowed: Iterable[int] | None = None
) -> list[int]:
    """The connected node ids once there are ``minimum`` (or whatever is there after
    ``wait_s``); with ``allowed`` (the roster's enrolled SuperNodes) only those count: a
    study's messages go to no other node."""
    keep = set(allowed) if allowed is not None else None
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(n for n in grid.get_node_ids() if keep is None or n in keep)
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def _send(
    grid: Grid,
    strategy: BlindAggregationStrategy,
    kind: str,
    round_number: int,
    model: GlobalModel | None,
    nodes: Iterable[int],
) -> list[Message]:
    timeout = strategy.plan.round_timeout_s
    messages = [
        grid.create_message(
            content=strategy.content(round_number, model),
            message_type=kind,
            dst_node_id=node,
            group_id=f"{strategy.plan.study_id}/{round_number}",
            ttl=timeout + 30.0,
        )
        for node in nodes
    ]
    return exchange(grid, messages, timeout=timeout)


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """``grid.send_and_receive``, but on the SuperLink's grid (``HttpGrid``) with
    :func:`collect_replies`' short polling instead of Flower's 3 s between pulls; any other
    grid (in-process, simulation, a test's) answers as it does. ``timeout=None`` waits for
    every reply, as in Flower."""
    if isinstance(grid, HttpGrid):
        return collect_replies(grid, messages, timeout=math.inf if timeout is None else timeout)
    return list(grid.send_and_receive(messages, timeout=timeout))


#: Seconds between two pulls of replies: Flower's ``HttpGrid.send_and_receive`` waits 3 s,
#: which was most of a message wave's orchestration time. One pull is one loopback request
#: (a SQL select at the SuperLink) per running study.
REPLY_POLL_S = 0.1
#: Server errors in a row a pull of replies survives, and the longest wait between them.
PULL_RETRIES = 12
PULL_RETRY_CAP_S = 5.0


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    poll_s: float = REPLY_POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Message]:
    """Push ``messages`` and pull their replies every ``poll_s`` until each has one or
    ``timeout`` seconds have passed (what ``Grid.send_and_receive`` does, polled faster).

    A pull the SuperLink answers with a server error (its SQLite state busy past its lock
    timeout while sites push large updates: ``database is locked``) changed nothing there
    (the transaction was rolled back), so it is retried, with growing waits, up to
    :data:`PULL_RETRIES` times in a row; a round is not lost to a busy SuperLink.
    """
    # Flower answers None for a message it could not push: no reply will come for it.
    waiting = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
    deadline = clock() + timeout
    replies: list[Message] = []
    failures = 0
    while waiting:
        try:
            pulled = list(grid.pull_messages(waiting))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code < 500 or failures >= PULL_RETRIES:
                raise
            failures += 1
            wait = min(PULL_RETRY_CAP_S, poll_s * 2**failures)
            log.warning(
                "the SuperLink answered a pull of replies with %s; again in %.1f s (%d/%d)",
                exc.response.status_code,
                wait,
                failures,
                PULL_RETRIES,
                extra={"event": "serverapp.pull_retry"},
            )
            sleep(wait)
            continue
        failures = 0
        replies.extend(pulled)
        waiting.difference_update(msg.metadata.reply_to_message_id for msg in pulled)
        if not waiting or clock() >= deadline:
            break
        sleep(poll_s)
    return replies


def site_of(msg: Message) -> str | None:
    """The site id a reply names (``None`` for an error reply or one without it)."""
    if msg.has_error() or "site" not in msg.content.config_records:
        return None
    value = msg.content.config_records["site"].get("site-id")
    return value if isinstance(value, str) else None


def run_study_rounds(
    grid: Grid,
    plan: RunPlan,
    *,
    gate: RoundGate,
    initial_model: GlobalModel | None = None,
) -> StudyOutcome:
    """Run the study's rounds on ``grid`` from ``plan.start_round``, each one gated.

    After each round its record (and, for an aggregated round, the new aggregate) goes to
    ``gate``; the next round starts only if the verdict is ``continue``, and no round
    starts once ``gate.stop_requested``. A restarted run passes the last recorded round's
    aggregate as ``initial_model``. Never raises for a failed round: its record is
    reported like any other and the outcome says ``failed``.
    """
    if plan.start_round > 1 and (
        initial_model is None or initial_model.round_number != plan.start_round - 1
    ):
        raise ValueError(
            f"round {plan.start_round} needs the model of round {plan.start_round - 1}"
        )
    strategy = BlindAggregationStrategy(plan)
    outcome = StudyOutcome(plan.study_id, plan.contract_hash, status="running")
    model: GlobalModel | None = initial_model
    for round_number in range(plan.start_round, plan.rounds + 1):
        if gate.stop_requested:
            outcome.status = "stopped"
            outcome.failure = "the consortium server stopped the run"
            break
        started = time.perf_counter()
        record = new_record(plan, round_number)
        nodes = wait_for_nodes(
            grid, plan.min_sites, plan.node_wait_s, allowed=plan.node_sites or None
        )
        record.nodes_contacted = len(nodes)
        aggregate: GlobalModel | None = None
        try:
            if len(nodes) < plan.min_sites:
                record.status = "failed"
                record.failure = (
                    f"{len(nodes)} SuperNodes connected, at least {plan.min_sites} needed"
                )
                record.missing_sites = list(plan.sites)
                raise RoundFailedError(record.failure, record)
            t0 = time.perf_counter()
            replies = _send(grid, strategy, "train", round_number, model, nodes)
            record.train_wall_seconds = time.perf_counter() - t0
            aggregate = strategy.aggregate_train(round_number, replies, record)
            accepted_nodes = [
                m.metadata.src_node_id for m in replies if site_of(m) in record.participants
            ]
            if plan.contract.evaluation.releases:  # else the sites release nothing
                t0 = time.perf_counter()
                evaluated = _send(
                    grid, strategy, "evaluate", round_number, aggregate, accepted_nodes
                )
                record.evaluate_wall_seconds = time.perf_counter() - t0
                record.evaluation = strategy.aggregate_evaluate(evaluated)
                record.evaluation_refusals = strategy.evaluation_refusals(evaluated)
        except RoundFailedError as exc:
            record = exc.record
            aggregate = None
            log.warning("study %s round %d failed: %s", plan.study_id, round_number, exc)
        finish_record(record, started)
        outcome.rounds.append(record)
        if aggregate is not None:
            model = aggregate
            log.info(
                "study %s round %d aggregated: %d sites, %d rejected, digest %s",
                plan.study_id,
                round_number,
                len(record.participants),
                len(record.rejected),
                record.aggregate_digest,
            )
        verdict = gate.report(record, aggregate)
        if outcome.settle(record, verdict.goes_on, verdict.reason, plan.rounds):
            break
    else:
        outcome.status = "completed"
    outcome.final_model = model
    return outcome


def run_gated(grid: Grid, plan: RunPlan, gate: ApiRoundGate) -> StudyOutcome:
    """What the ServerApp does with a plan: heartbeats, the checkpoint to resume from, the
    rounds; an error it cannot handle is reported (the server restarts the run) and
    re-raised."""
    log.info(
        "study %s: rounds %d..%d, min %d sites",
        plan.study_id,
        plan.start_round,
        plan.rounds,
        plan.min_sites,
    )
    with gate.heartbeats():
        try:
            initial = gate.checkpoint(plan.start_round - 1) if plan.start_round > 1 else None
            outcome = run_study_rounds(grid, plan, gate=gate, initial_model=initial)
        except Exception as exc:
            gate.failure(f"{type(exc).__name__}: {exc}")
            raise
    log.info("study %s %s", plan.study_id, outcome.status)
    return outcome


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by Flower for a study run."""
    plan = RunPlan.from_run_config(context.run_config)
    with ApiRoundGate.from_settings(ServerAppSettings(), plan) as gate:
        run_gated(grid, plan, gate)
