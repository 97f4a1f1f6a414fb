"""Comparison ServerApp: one study, three ways to aggregate, every message metered.

For ``benchmarks/demo_compare.py`` (and ``benchmarks/round_timing.py``): the same study
(model, rounds, DP, sites) run with

* ``ckks``: Concord's own round loop and strategy
  (:func:`~consortium_server.federation.serverapp.run_study_rounds`), encrypted updates
  and a blind sum, unchanged;
* ``fedavg``: the same loop for a contract with ``encryption.enabled: false``: the sites
  send ``n_i * w_i`` as float64 (``PlainCodec``), the server sums them and the sites divide
  by the total weight (weighted FedAvg; the server reads every update);
* ``secagg+``: Flower 1.41's ``SecAggPlusWorkflow`` for the train phase of every round
  (:mod:`benchmarks.apps.secaggplus_rounds`), then Concord's evaluate phase. The sites run
  ``secaggplus_mod`` in the comparison ClientApp (:mod:`benchmarks.apps.compare_client`).

The method is the run config's ``aggregation`` value (:mod:`benchmarks.apps.methods`).
That key exists only in the comparison bundle (:func:`write_compare_app`), which names this
ServerApp and the comparison ClientApp; a site runs it only if its operator allowed the
bundle's hash *with that ClientApp* (``ApprovalStore.allow_fab(hash, clientapp=...)``, see
``site_node.federation.processes``).

There is no consortium server behind these runs: the rounds go through a
:class:`~benchmarks.apps.records.RecordingGate`, which writes each round record to the run
config's ``records-dir`` and lets the next round start unless the round failed. The
ServerApp also writes ``traffic.json`` there (:class:`~benchmarks.apps.metering.MeteredGrid`
around its grid: every message each way, per site and round) and, at the end, the final
model and ``outcome.json`` (:func:`~benchmarks.apps.records.read_outcome` reads it back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import tomli
import tomli_w
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from benchmarks.apps.metering import MeteredGrid, RoundTraffic, read_traffic, write_traffic
from benchmarks.apps.methods import (
    AGGREGATION_KEY,
    CKKS,
    FEDAVG,
    METHODS,
    RECORDS_DIR_KEY,
    SECAGGPLUS,
)
from benchmarks.apps.records import RecordingGate, write_outcome
from benchmarks.apps.secaggplus_rounds import SecAggPlusSettings, run_secaggplus_rounds
from concord_protocol.rounds import RoundRecord
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import StudyOutcome
from consortium_server.federation.serverapp import run_study_rounds

__all__ = [
    "AGGREGATION_KEY",
    "CKKS",
    "CLIENTAPP_REF",
    "FEDAVG",
    "METHODS",
    "RECORDS_DIR_KEY",
    "SECAGGPLUS",
    "SERVERAPP_REF",
    "CompareHook",
    "app",
    "check_method",
    "compare_run_config",
    "read_traffic",
    "run_compare",
    "write_compare_app",
]

log = logging.getLogger("concord.benchmarks.compare")

#: The comparison ServerApp, as the bundle's ``serverapp`` component names it.
SERVERAPP_REF = "benchmarks.apps.compare_server:app"
#: The comparison ClientApp, as the bundle's ``clientapp`` component names it (a site must
#: allow the bundle's hash with exactly this reference).
CLIENTAPP_REF = "benchmarks.apps.compare_client:app"
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
    records_dir: Path | None = None,
    settings: SecAggPlusSettings | None = None,
) -> StudyOutcome:
    """Run the study's rounds with ``method`` on the metered ``grid``.

    Each round's record and traffic go to ``hook`` and, with ``records_dir``, to files
    there, as does the outcome at the end. A method that does not fit the contract gives a
    failed outcome without rounds (written too, so that a waiting script sees it).
    """
    try:
        check_method(plan, method)
    except ValueError as exc:
        outcome = StudyOutcome(plan.study_id, plan.contract_hash, "failed", failure=str(exc))
        if records_dir is not None:
            write_outcome(records_dir, outcome)
        return outcome
    traffic: list[RoundTraffic] = []

    def on_round(record: RoundRecord) -> None:
        taken = grid.take(record.round_number)
        traffic.append(taken)
        if records_dir is not None:
            write_traffic(records_dir, method, traffic)
        if hook is not None:
            hook(record, taken)

    gate = RecordingGate(records_dir, on_round=on_round)
    grid.take(0)  # anything before round 1 is not a round's
    if method == SECAGGPLUS:
        outcome = run_secaggplus_rounds(grid, plan, gate=gate, settings=settings)
    else:
        outcome = run_study_rounds(grid, plan, gate=gate)
    if records_dir is not None:
        write_outcome(records_dir, outcome)
    return outcome


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by Flower for a comparison run."""
    plan = RunPlan.from_run_config(context.run_config)
    method = str(context.run_config.get(AGGREGATION_KEY, CKKS))
    records = str(context.run_config.get(RECORDS_DIR_KEY, ""))
    log.info("comparison %s: %s, %d rounds", plan.study_id, method, plan.rounds)
    outcome = run_compare(
        MeteredGrid(grid), plan, method, records_dir=Path(records) if records else None
    )
    log.info("comparison %s (%s) %s", plan.study_id, method, outcome.status)


# --- the bundle ----------------------------------------------------------------------------


def write_compare_app(dest: Path, *, source: Path | None = None) -> Path:
    """Write the comparison bundle's ``pyproject.toml`` into ``dest``; return ``dest``.

    It is Concord's bundle (``source``, default ``concord_protocol/app``) with this
    module's ServerApp, the comparison ClientApp (:data:`CLIENTAPP_REF`), and the
    comparison's run-config keys, ``aggregation`` (default ``ckks``) and ``records-dir``.
    Configuration only, like Concord's: a site's guarded runner accepts it only if the site
    allowed its hash (``bundle_hash(dest)``) together with :data:`CLIENTAPP_REF`.
    """
    from concord_protocol.bundle import APP_DIR

    body = tomli.loads(((source or APP_DIR) / "pyproject.toml").read_text())
    body["project"]["name"] = "concord-compare"
    body["project"]["description"] = "Concord aggregation comparison (CKKS, FedAvg, SecAgg+)"
    flwr_app = body["tool"]["flwr"]["app"]
    flwr_app["components"]["serverapp"] = SERVERAPP_REF
    flwr_app["components"]["clientapp"] = CLIENTAPP_REF
    config = flwr_app["config"]
    config[AGGREGATION_KEY] = CKKS
    config[RECORDS_DIR_KEY] = ""
    # Every key RunPlan.to_run_config() sends must be declared (Flower refuses others).
    config.setdefault("attempt", "0" * 32)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(body))
    return dest


def compare_run_config(
    plan: RunPlan, method: str, *, records_dir: Path | None = None
) -> dict[str, str | int | float | bool]:
    """The run config of a comparison run: the plan's, ``aggregation`` and ``records-dir``."""
    check_method(plan, method)
    return {
        **plan.to_run_config(),
        AGGREGATION_KEY: method,
        RECORDS_DIR_KEY: str(records_dir) if records_dir is not None else "",
    }
