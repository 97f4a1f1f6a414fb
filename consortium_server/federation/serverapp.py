"""The Flower ServerApp of a study run: rounds of blind aggregation.

``app`` is what the app bundle's ``[tool.flwr.app.components] serverapp`` names. It reads the
:class:`~consortium_server.federation.strategy.RunPlan` from the run config (written by
:mod:`consortium_server.federation.processes` when the consortium server starts the run),
runs :func:`run_study_rounds`, and writes every :class:`RoundRecord` and the final outcome
to the plan's ``records_dir`` (the consortium server reads them back; see
:func:`read_outcome`). Logs carry counts, site ids and digests only.

Checkpoints: after each aggregated round, before its record, the encrypted aggregate is
written to ``records_dir`` (``model-NNNN.blobs`` and ``.json``; the server cannot read it
any more than the live one). A round record on disk therefore always has its checkpoint,
and a run that was killed is resumed by a new run with ``start_round`` after the last
aggregated round: :func:`load_checkpoint` gives it the model to send, and the earlier
rounds' records are read back so that the outcome covers the whole study.

One round (see ``docs/architecture.md``): wait until at least ``min_sites`` SuperNodes are
connected; send ``train`` with the previous encrypted aggregate to every node; wait for
replies up to the contract's round timeout; drop bad replies with a record; blind-sum the
rest (at least ``min_sites``, else the round and the study fail cleanly); send ``evaluate``
with the new aggregate to the accepted sites' nodes; weigh their metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from concord_protocol.rounds import RoundRecord
from consortium_server.federation.strategy import (
    BlindAggregationStrategy,
    GlobalModel,
    RoundFailedError,
    RoundHook,
    RunPlan,
    StudyOutcome,
    finish_record,
    new_record,
)

__all__ = [
    "HEARTBEAT_FILE",
    "OUTCOME_FILE",
    "CheckpointError",
    "app",
    "heartbeat",
    "heartbeat_alive",
    "last_checkpoint",
    "load_checkpoint",
    "read_outcome",
    "read_round_records",
    "run_recorded",
    "run_study_rounds",
    "site_of",
    "wait_for_nodes",
    "write_blobs",
    "write_checkpoint",
    "write_json",
]

log = logging.getLogger("concord.federation.server")

OUTCOME_FILE = "outcome.json"
FINAL_MODEL_FILE = "final-model.blobs"
#: Rewritten every :data:`HEARTBEAT_INTERVAL_S` while the ServerApp runs: a restarted
#: consortium server tells a live run from one the SuperLink still lists but lost.
HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_INTERVAL_S = 2.0


def wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    """The connected node ids once there are ``minimum`` (or whatever is there after
    ``wait_s``)."""
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
    hook: RoundHook | None = None,
    checkpoint: Callable[[GlobalModel], None] | None = None,
    initial_model: GlobalModel | None = None,
    prior_rounds: Sequence[RoundRecord] = (),
) -> StudyOutcome:
    """Run the study's rounds on ``grid``; call ``hook`` with each round's record.

    Rounds run from ``plan.start_round``; a resumed run passes the last aggregated round's
    model as ``initial_model`` and that round's and the earlier records as ``prior_rounds``
    (they head the outcome; they are not delivered to ``hook`` again). ``checkpoint`` gets
    each new aggregate before ``hook`` gets its round's record.

    Never raises for a failed round: the outcome says ``failed`` with the reason, and the
    failed round's record (participants, rejected replies) is delivered like any other.
    """
    if plan.start_round > 1 and (
        initial_model is None or initial_model.round_number != plan.start_round - 1
    ):
        raise ValueError(
            f"round {plan.start_round} needs the model of round {plan.start_round - 1}"
        )
    strategy = BlindAggregationStrategy(plan)
    outcome = StudyOutcome(
        plan.study_id, plan.contract_hash, status="running", rounds=list(prior_rounds)
    )
    model: GlobalModel | None = initial_model
    for round_number in range(plan.start_round, plan.rounds + 1):
        started = time.perf_counter()
        record = new_record(plan, round_number)
        nodes = wait_for_nodes(grid, plan.min_sites, plan.node_wait_s)
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
                m.metadata.src_node_id for m in replies if site_of(m) in record.participants
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
        if checkpoint is not None and model is not None:
            checkpoint(model)
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


def write_json(path: Path, body: object) -> None:
    """Write ``body`` as JSON to ``path`` atomically (a reader never sees half a file)."""
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
        write_json(records_dir / f"round-{record.round_number:04d}.json", record.as_record())

    return write


@contextmanager
def heartbeat(path: Path, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Rewrite ``path`` every ``interval_s`` (a counter and the time) while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while True:
            count += 1
            try:
                write_json(path, {"beat": count, "at": time.time(), "pid": os.getpid()})
            except OSError as exc:  # a full or vanished volume must not stop the rounds
                log.warning("heartbeat not written: %s", exc)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name="concord-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s * 2)


def heartbeat_alive(path: Path, *, within_s: float = 3 * HEARTBEAT_INTERVAL_S) -> bool:
    """Whether something rewrites ``path`` within ``within_s`` (waits up to that long)."""

    def read() -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    first = read()
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        time.sleep(min(0.25, within_s / 4))
        now = read()
        if now is not None and now != first:
            return True
    return False


class CheckpointError(Exception):
    """A checkpoint a resumed run needs is missing or unreadable."""


def _checkpoint_paths(records_dir: Path, round_number: int) -> tuple[Path, Path]:
    stem = f"model-{round_number:04d}"
    return records_dir / f"{stem}.blobs", records_dir / f"{stem}.json"


def write_checkpoint(records_dir: Path, model: GlobalModel, *, keep: int = 2) -> None:
    """Keep ``model`` (the encrypted aggregate of its round) for a resumed run.

    The blobs are written first and the JSON that names their digest last (atomically), so
    a checkpoint whose JSON exists is complete. Only the newest ``keep`` are kept.
    """
    blobs_path, meta_path = _checkpoint_paths(records_dir, model.round_number)
    tmp = blobs_path.with_name(f".{blobs_path.name}.tmp")
    write_blobs(tmp, model.blobs)
    os.replace(tmp, blobs_path)
    write_json(
        meta_path,
        {
            "round_number": model.round_number,
            "total_weight": model.total_weight,
            "digest": model.digest,
            "blob_sha256": _blobs_sha256(model.blobs),
        },
    )
    for old in sorted(records_dir.glob("model-*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".blobs").unlink(missing_ok=True)


def _blobs_sha256(blobs: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(struct.pack(">Q", len(blob)))
        digest.update(blob)
    return digest.hexdigest()


def last_checkpoint(records_dir: Path) -> int:
    """The newest round with a complete checkpoint in ``records_dir`` (0 if none)."""
    rounds = [int(p.stem.removeprefix("model-")) for p in records_dir.glob("model-*.json")]
    return max(rounds, default=0)


def load_checkpoint(records_dir: Path, round_number: int) -> GlobalModel:
    """The aggregate of ``round_number`` as :func:`write_checkpoint` kept it.

    Raises :class:`CheckpointError` if it is missing or its blobs do not match its digest.
    """
    blobs_path, meta_path = _checkpoint_paths(records_dir, round_number)
    try:
        meta = json.loads(meta_path.read_text())
        blobs = read_blobs(blobs_path)
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"no readable checkpoint of round {round_number}: {exc}") from None
    if meta.get("blob_sha256") != _blobs_sha256(blobs):
        raise CheckpointError(f"the checkpoint of round {round_number} is corrupt")
    return GlobalModel(
        round_number=int(meta["round_number"]),
        blobs=tuple(blobs),
        total_weight=float(meta["total_weight"]),
        digest=str(meta["digest"]),
    )


def read_round_records(records_dir: Path) -> list[RoundRecord]:
    """Every round record in ``records_dir``, by round."""
    return [
        RoundRecord(**json.loads(path.read_text()))
        for path in sorted(records_dir.glob("round-*.json"))
    ]


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
    run_recorded(grid, RunPlan.from_run_config(context.run_config))


def run_recorded(grid: Grid, plan: RunPlan) -> StudyOutcome:
    """What the ServerApp does with a plan: resume from the checkpoint before
    ``plan.start_round`` (if any), run the rounds with checkpoints and records in the plan's
    ``records_dir``, and write the outcome and the final model there."""
    records = plan.records_dir
    log.info(
        "study %s: rounds %d..%d, min %d sites",
        plan.study_id,
        plan.start_round,
        plan.rounds,
        plan.min_sites,
    )
    if records is None:
        outcome = run_study_rounds(grid, plan)
        log.info("study %s %s", plan.study_id, outcome.status)
        return outcome
    initial: GlobalModel | None = None
    prior: list[RoundRecord] = []
    if plan.start_round > 1:
        initial = load_checkpoint(records, plan.start_round - 1)
        prior = [r for r in read_round_records(records) if r.round_number < plan.start_round]
    with heartbeat(records / HEARTBEAT_FILE):
        outcome = run_study_rounds(
            grid,
            plan,
            hook=_record_writer(records),
            checkpoint=lambda model: write_checkpoint(records, model),
            initial_model=initial,
            prior_rounds=prior,
        )
    if outcome.final_model is not None:
        write_blobs(records / FINAL_MODEL_FILE, outcome.final_model.blobs)
    write_json(records / OUTCOME_FILE, outcome.as_record())
    log.info("study %s %s", plan.study_id, outcome.status)
    return outcome
