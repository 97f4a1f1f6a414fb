"""The Flower ServerApp of a study run: rounds of blind aggregation.

``app`` is what the app bundle's ``[tool.flwr.app.components] serverapp`` names. It reads the
:class:`~consortium_server.federation.strategy.RunPlan` from the run config (written by
:mod:`consortium_server.federation.processes` when the consortium server starts the run),
runs :func:`run_study_rounds`, and writes every :class:`RoundRecord` and the final outcome
to the plan's ``records_dir`` (the consortium server reads them back; see
:func:`read_outcome`). Logs carry counts, site ids and digests only.

One round (see ``docs/architecture.md``): wait until at least ``min_sites`` SuperNodes are
connected; send ``train`` with the previous encrypted aggregate to every node; wait for
replies up to the contract's round timeout; drop bad replies with a record; blind-sum the
rest (at least ``min_sites``, else the round and the study fail cleanly); send ``evaluate``
with the new aggregate to the accepted sites' nodes; weigh their metrics.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from consortium_server.federation.strategy import (
    BlindAggregationStrategy,
    GlobalModel,
    RoundFailedError,
    RoundHook,
    RoundRecord,
    RunPlan,
    StudyOutcome,
    finish_record,
    new_record,
)

__all__ = [
    "OUTCOME_FILE",
    "app",
    "read_outcome",
    "run_study_rounds",
    "write_blobs",
]

log = logging.getLogger("concord.federation.server")

OUTCOME_FILE = "outcome.json"
FINAL_MODEL_FILE = "final-model.blobs"


def _wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
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
    return list(grid.send_and_receive(messages, timeout=timeout))


def _site_of(msg: Message) -> str | None:
    if msg.has_error() or "site" not in msg.content.config_records:
        return None
    value = msg.content.config_records["site"].get("site-id")
    return value if isinstance(value, str) else None


def run_study_rounds(grid: Grid, plan: RunPlan, *, hook: RoundHook | None = None) -> StudyOutcome:
    """Run the study's rounds on ``grid``; call ``hook`` with each round's record.

    Never raises for a failed round: the outcome says ``failed`` with the reason, and the
    failed round's record (participants, rejected replies) is delivered like any other.
    """
    strategy = BlindAggregationStrategy(plan)
    outcome = StudyOutcome(plan.study_id, plan.contract_hash, status="running")
    model: GlobalModel | None = None
    for round_number in range(1, plan.rounds + 1):
        started = time.perf_counter()
        record = new_record(plan, round_number)
        nodes = _wait_for_nodes(grid, plan.min_sites, plan.node_wait_s)
        record.nodes_contacted = len(nodes)
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
            model = strategy.aggregate_train(round_number, replies, record)
            accepted_nodes = [
                m.metadata.src_node_id for m in replies if _site_of(m) in record.participants
            ]
            t0 = time.perf_counter()
            eval_replies = _send(grid, strategy, "evaluate", round_number, model, accepted_nodes)
            record.evaluate_wall_seconds = time.perf_counter() - t0
            record.evaluation = strategy.aggregate_evaluate(eval_replies)
        except RoundFailedError as exc:
            finish_record(exc.record, started)
            outcome.rounds.append(exc.record)
            outcome.status = "failed"
            outcome.failure = f"round {round_number}: {exc}"
            log.warning("study %s round %d failed: %s", plan.study_id, round_number, exc)
            if hook is not None:
                hook(exc.record)
            break
        finish_record(record, started)
        outcome.rounds.append(record)
        log.info(
            "study %s round %d aggregated: %d sites, %d rejected, digest %s",
            plan.study_id,
            round_number,
            len(record.participants),
            len(record.rejected),
            record.aggregate_digest,
        )
        if hook is not None:
            hook(record)
    else:
        outcome.status = "completed"
    outcome.final_model = model
    return outcome


# --- records on disk (the ServerApp runs in a process of the SuperLink) ------------------


def _write_json(path: Path, body: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, sort_keys=True, indent=1)
    os.replace(tmp, path)


def write_blobs(path: Path, blobs: Iterable[bytes]) -> None:
    """Length-prefixed (8-byte big-endian) concatenation of ``blobs``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for blob in blobs:
            fh.write(struct.pack(">Q", len(blob)))
            fh.write(blob)


def read_blobs(path: Path) -> list[bytes]:
    """Inverse of :func:`write_blobs`."""
    data = path.read_bytes()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        out.append(data[pos : pos + size])
        pos += size
    return out


def _record_writer(records_dir: Path) -> RoundHook:
    def write(record: RoundRecord) -> None:
        _write_json(records_dir / f"round-{record.round_number:04d}.json", record.as_record())

    return write


def read_outcome(records_dir: Path) -> StudyOutcome | None:
    """The outcome the ServerApp wrote to ``records_dir`` (``None`` while still running)."""
    path = records_dir / OUTCOME_FILE
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    rounds = [RoundRecord(**r) for r in body["rounds"]]
    final = None
    if body.get("final_model") is not None:
        fm = body["final_model"]
        final = GlobalModel(
            round_number=int(fm["round_number"]),
            blobs=tuple(read_blobs(records_dir / FINAL_MODEL_FILE)),
            total_weight=float(fm["total_weight"]),
            digest=str(fm["digest"]),
        )
    return StudyOutcome(
        study_id=body["study_id"],
        contract_hash=body["contract_hash"],
        status=body["status"],
        rounds=rounds,
        final_model=final,
        failure=body.get("failure"),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by Flower for a study run."""
    plan = RunPlan.from_run_config(context.run_config)
    hook = _record_writer(plan.records_dir) if plan.records_dir else None
    log.info("study %s: %d rounds, min %d sites", plan.study_id, plan.rounds, plan.min_sites)
    outcome = run_study_rounds(grid, plan, hook=hook)
    if plan.records_dir is not None:
        if outcome.final_model is not None:
            write_blobs(plan.records_dir / FINAL_MODEL_FILE, outcome.final_model.blobs)
        _write_json(plan.records_dir / OUTCOME_FILE, outcome.as_record())
    log.info("study %s %s", plan.study_id, outcome.status)
