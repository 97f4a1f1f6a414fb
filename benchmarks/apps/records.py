"""A benchmark run's round records, outcome and final model on disk, and the gate that
writes them.

Why these live here: the product's ServerApp reports every round to the consortium
server's internal API (``consortium_server.federation.gate_client.ApiRoundGate``) and writes
no files. The benchmarks run ServerApps without a consortium server (a bare SuperLink, or
Flower's simulation engine) and read the results back from a directory of their own (for
the comparison bundle: the run config's ``records-dir``)::

    round-NNNN.json      each round's RoundRecord, written as the round ends
    final-model.blobs    the final aggregate: its manifest and blobs (``pack_checkpoint``)
    outcome.json         the StudyOutcome, written last: once it exists, the run is over

:class:`RecordingGate` is the :class:`~consortium_server.federation.gate_client.RoundGate`
of those runs: it keeps and writes every round and answers ``continue`` unless the round
failed. There is no ledger or policy behind it: benchmark runs only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from concord_protocol.contributions import AggregateManifest
from concord_protocol.rounds import RoundRecord
from concord_protocol.wire.format import CKKS_TAG_SLOTS, EncodedUpdate
from consortium_server.federation.checkpoints import (
    GlobalModel,
    pack_checkpoint,
    unpack_checkpoint,
)
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import StudyOutcome
from consortium_server.federation.run_messages import RunVerdict
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto.codecs import CkksCodec, ListedSum, PlainCodec

__all__ = [
    "FINAL_MODEL_FILE",
    "OUTCOME_FILE",
    "RecordingGate",
    "open_final_model",
    "read_outcome",
    "read_round_records",
    "write_json",
    "write_outcome",
    "write_round",
]

OUTCOME_FILE = "outcome.json"
FINAL_MODEL_FILE = "final-model.blobs"


def write_json(path: Path, body: object) -> None:
    """Write ``body`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, sort_keys=True, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _round_path(records_dir: Path, round_number: int) -> Path:
    return records_dir / f"round-{round_number:04d}.json"


def write_round(records_dir: Path, record: RoundRecord) -> None:
    """Write one round's record (replacing an earlier one of the same round)."""
    write_json(_round_path(records_dir, record.round_number), record.as_record())


def write_outcome(records_dir: Path, outcome: StudyOutcome) -> None:
    """Write the final model (if any), then the outcome (its presence ends the run)."""
    records_dir.mkdir(parents=True, exist_ok=True)
    if outcome.final_model is not None:
        path = records_dir / FINAL_MODEL_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(pack_checkpoint(outcome.final_model))
        os.replace(tmp, path)
    write_json(records_dir / OUTCOME_FILE, outcome.as_record())


def read_round_records(records_dir: Path) -> list[RoundRecord]:
    """Every round record in ``records_dir``, by round."""
    return [
        RoundRecord.model_validate_json(path.read_text())
        for path in sorted(records_dir.glob("round-*.json"))
    ]


def read_outcome(records_dir: Path) -> StudyOutcome | None:
    """The outcome written to ``records_dir`` (``None`` while the run is still going)."""
    path = records_dir / OUTCOME_FILE
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    final = None
    if body.get("final_model") is not None:
        fm = body["final_model"]
        manifest, blobs = unpack_checkpoint((records_dir / FINAL_MODEL_FILE).read_bytes())
        final = GlobalModel(
            round_number=int(fm["round_number"]),
            blobs=tuple(blobs),
            total_weight=float(fm["total_weight"]),
            digest=str(fm["digest"]),
            manifest=manifest,
        )
    return StudyOutcome(
        study_id=str(body["study_id"]),
        contract_hash=str(body["contract_hash"]),
        status=str(body["status"]),
        rounds=[RoundRecord.model_validate(r) for r in body["rounds"]],
        final_model=final,
        failure=body.get("failure"),
    )


class RecordingGate:
    """The round gate of a benchmark run: keep, write, go on unless the round failed.

    ``records_dir``: where each round's record goes (none written if ``None``).
    ``on_round``: called with each record after it was written (e.g. to take the round's
    traffic from a meter). The aggregate is not kept: the round loop's outcome holds the
    final one.
    """

    def __init__(
        self,
        records_dir: Path | None = None,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.records_dir = records_dir
        self.on_round = on_round
        self.rounds: list[RoundRecord] = []

    @property
    def stop_requested(self) -> bool:
        """Never: nothing but a failed round stops a benchmark run."""
        return False

    def report(self, record: RoundRecord, model: GlobalModel | None) -> RunVerdict:
        """Keep and write ``record``; ``continue`` unless it failed."""
        self.rounds.append(record)
        if self.records_dir is not None:
            write_round(self.records_dir, record)
        if self.on_round is not None:
            self.on_round(record)
        if record.status == "aggregated":
            return RunVerdict(action="continue", next_round=record.round_number + 1)
        return RunVerdict(action="stop", reason=record.failure or "the round failed")


def open_final_model(plan: RunPlan, model: GlobalModel, secret: bytes | None) -> Any:
    """The final model's averaged parameters, opened as a site opens an aggregate: for an
    encrypted study, decrypted with the study's ``secret`` and its integrity tags checked
    against the sites its manifest lists."""
    chunks = EncodedUpdate.from_bytes_list(list(model.blobs)).chunks
    if secret is None:
        return PlainCodec().decrypt_aggregate(
            chunks, num_params=plan.num_params, total_weight=model.total_weight
        )
    listed = ListedSum(
        BlindAggregationStrategy(plan).round_info(model.round_number),
        AggregateManifest.from_json(model.manifest).sites,
    )
    return CkksCodec(secret, tag_slots=CKKS_TAG_SLOTS).decrypt_aggregate(
        chunks, num_params=plan.num_params, total_weight=model.total_weight, listed=listed
    )
