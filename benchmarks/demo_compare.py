"""Benchmark: the demo's study with Concord CKKS vs plaintext FedAvg vs Flower SecAgg+.

The demo's breast-cancer study (tabular MLP, three hospitals with non-IID shares, DP-SGD at
epsilon 6, the demo's training settings) run once per aggregation method on real Flower
processes: a SuperLink (TLS, SuperNode authentication) and three SuperNodes on loopback,
each with the site's guarded ClientApp runner. Same model, same rounds, same data, same DP.

* ``fedavg``: Concord's encryption-off path (``encryption.enabled: false``): each site sends
  ``n_i * w_i`` in float64, the server sums, the sites divide (weighted FedAvg).
* ``ckks``: Concord's real path: CKKS-encrypted updates, blind sum at the server.
* ``secagg+``: Flower 1.41's ``SecAggPlusWorkflow`` at the server and ``secaggplus_mod`` at
  the sites (four message waves per train phase), the unmasked model then evaluated as in
  Concord's loop.

The three runs use the comparison bundle
(``benchmarks.apps.compare_server.write_compare_app``): Concord's bundle with the
comparison ServerApp and ClientApp and the run-config keys ``aggregation`` and
``records-dir``; every site allows its hash with the comparison ClientApp, as a site's
operator would for a benchmark. Bytes are measured on the wire by the comparison ServerApp
(``MeteredGrid``: each message's deflated Flower objects, as ``aggregation_compare.py``
does; no gRPC/TLS framing), per site and round, train and evaluate messages together.
Times come from the round records (the ServerApp's clock). Accuracy and AUC are those of
the final global model (decrypted here with the study key where encrypted) on the 114
held-out patients, and the sites' weighted local test metrics of the last round.

    .venv/bin/python benchmarks/demo_compare.py                  # 3 rounds (~10 min, 2 cores)
    .venv/bin/python benchmarks/demo_compare.py --quick --json out/compare.json

A script that prints figures (and writes JSON plus a bar chart next to it), not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml
from rich.console import Console
from rich.table import Table

from benchmarks.apps.compare_server import (
    CKKS,
    CLIENTAPP_REF,
    FEDAVG,
    METHODS,
    SECAGGPLUS,
    SERVERAPP_REF,
    compare_run_config,
    read_traffic,
    write_compare_app,
)
from benchmarks.apps.metering import RoundTraffic
from benchmarks.apps.records import open_final_model
from benchmarks.apps.rosters import keyed_roster
from benchmarks.apps.runs import start_compare_run, wait_for_outcome
from concord_demo.stack import free_port, start_registered_supernode
from concord_protocol.bundle import bundle_hash
from concord_protocol.contract import RosterMember, StudyContract
from concord_protocol.processes import FlowerProcessError, ManagedProcess
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.processes import start_superlink
from consortium_server.federation.records import StudyOutcome
from consortium_server.federation.tls import make_dev_tls
from site_node.crypto import generate_study_context
from site_node.crypto import public_context as make_public_context
from site_node.data.demo import breast_cancer_holdout
from site_node.federation.approvals import ApprovalStore
from site_node.training import build_model, evaluate, num_parameters, unflatten_into

LABELS = {FEDAVG: "plaintext FedAvg", CKKS: "Concord CKKS", SECAGGPLUS: "Flower SecAgg+"}
N_SITES = 3


def demo_contract(
    method: str, rounds: int, roster: list[RosterMember], repeat: int = 0
) -> StudyContract:
    """The demo's study contract (``concord_demo.story``), encryption on for CKKS.

    The title names the method (and the repeat) so each run has its own contract hash (a
    site approves a hash for one study).
    """
    tag = LABELS[method] + (f", run {repeat + 1}" if repeat else "")
    return StudyContract.model_validate(
        {
            "roster": [m.model_dump(mode="json") for m in roster],
            "key_generator": roster[0].site_id,
            "title": f"Malignancy from fine-needle aspirate features ({tag})",
            "description": "Federated classifier across three hospitals: aggregation benchmark.",
            "purpose": "diagnostic_research",
            "ethics_reference": "IRB-2026-0142",
            "datasets": [f"bc-hospital-{'abc'[i]}" for i in range(N_SITES)],
            "model": {"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
            "training": {
                "rounds": rounds,
                "optimizer": "sgd",
                "local_epochs": 2,
                "batch_size": 32,
                "learning_rate": 0.5,
            },
            "privacy": {"epsilon": 6.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "federation": {"min_sites": 3, "round_timeout_s": 300},
            "encryption": {"enabled": method == CKKS},
        }
    )


@dataclass
class Site:
    """One hospital on disk and its SuperNode."""

    site_id: str
    index: int
    state_dir: Path
    datasets_file: Path
    process: ManagedProcess | None = None


@dataclass
class MethodRun:
    """One method's run: plan, where its ServerApp writes, outcome, traffic, held-out
    scores."""

    method: str
    plan: RunPlan
    records_dir: Path
    repeat: int = 0
    outcome: StudyOutcome | None = None
    traffic: list[RoundTraffic] = field(default_factory=list)
    run_wall_s: float = 0.0
    holdout: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _make_sites(root: Path) -> list[Site]:
    sites = []
    for i in range(N_SITES):
        site_id = f"hospital-{'abc'[i]}"
        state = root / site_id
        state.mkdir(parents=True, exist_ok=True)
        datasets = state / "datasets.yaml"
        entry = {
            "id": f"bc-{site_id}",
            "kind": "demo_breast_cancer",
            "site_index": i,
            "n_sites": N_SITES,
        }
        datasets.write_text(yaml.safe_dump([entry]))
        sites.append(Site(site_id, i, state, datasets))
    return sites


def _final_vector(run: MethodRun, secret: bytes) -> Any:
    outcome = run.outcome
    if outcome is None or outcome.final_model is None:
        return None
    return open_final_model(run.plan, outcome.final_model, secret if run.method == CKKS else None)


def _score_holdout(run: MethodRun, secret: bytes) -> dict[str, float]:
    vector = _final_vector(run, secret)
    if vector is None:
        return {}
    holdout = breast_cancer_holdout()
    model = build_model(run.plan.contract.model, input_shape=holdout.input_shape, num_classes=2)
    unflatten_into(model, vector)
    result = evaluate(model, holdout)
    return {
        "accuracy": float(result.accuracy),
        "auc": float(result.auc),
        "patients": float(result.num_samples),
    }


def run_order(methods: list[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, method)`` in run order: each repeat starts one method later, so that no
    method always runs first (load on a shared machine drifts)."""
    return [
        (k, methods[(k + i) % len(methods)]) for k in range(repeats) for i in range(len(methods))
    ]


def run_benchmark(
    methods: list[str], rounds: int, work: Path, console: Console, *, repeats: int = 1
) -> tuple[list[MethodRun], dict[str, float]]:
    """Start the federation once, run every method on it (``repeats`` times, in
    :func:`run_order`), stop it; the runs and set-up times."""
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    tls = make_dev_tls(work / "tls")
    # The SuperLink runs no ServerApp but Concord's unless told: allow the comparison's.
    compare_hash = bundle_hash(write_compare_app(work / "compare-app"))
    link = start_superlink(
        work / "superlink",
        port=free_port(),
        tls=tls,
        serverapp_bundles={compare_hash: SERVERAPP_REF},
    )
    sites = _make_sites(work / "sites")
    roster = keyed_roster(((s.site_id, s.state_dir) for s in sites), max_examples=1000)
    try:
        app_dir = write_compare_app(work / "compare-app")
        fab_hash = bundle_hash(app_dir)
        secret = generate_study_context()
        n_params = num_parameters(
            build_model(demo_contract(CKKS, rounds, roster).model, input_shape=(30,), num_classes=2)
        )
        runs: list[MethodRun] = []
        for repeat, method in run_order(methods, repeats):
            contract = demo_contract(method, rounds, roster, repeat)
            study_id = f"compare-{method.replace('+', 'plus')}-{repeat + 1}"
            runs.append(
                MethodRun(
                    method,
                    RunPlan(
                        study_id=study_id,
                        contract=contract,
                        contract_hash=contract.contract_hash(),
                        num_params=n_params,
                        sites=tuple(s.site_id for s in sites),
                        public_context=make_public_context(secret) if method == CKKS else None,
                    ),
                    work / "records" / study_id,
                    repeat,
                )
            )
        for site in sites:
            store = ApprovalStore(site.state_dir)
            # The site's operator allows the comparison bundle, with its ClientApp.
            store.allow_fab(fab_hash, clientapp=CLIENTAPP_REF)
            for run in runs:
                store.approve(run.plan.study_id, run.plan.contract, run.plan.contract_hash)
                if run.method == CKKS:
                    store.save_study_key(run.plan.study_id, secret, sender_id=sites[0].site_id)
            site.process = start_registered_supernode(
                link,
                tls.ca_cert,
                site_id=site.site_id,
                state_dir=site.state_dir,
                datasets_file=site.datasets_file,
            )
        setup["federation start-up s"] = time.perf_counter() - t0
        for run in runs:
            console.print(
                f"[bold]{LABELS[run.method]}[/] (run {run.repeat + 1}): {rounds} round(s)…"
            )
            limit = rounds * (2 * run.plan.round_timeout_s + 60) + run.plan.node_wait_s
            t1 = time.perf_counter()
            try:
                start_compare_run(
                    link,
                    app_dir,
                    compare_run_config(run.plan, run.method, records_dir=run.records_dir),
                )
                run.outcome = wait_for_outcome(run.records_dir, timeout=limit, link=link)
            except FlowerProcessError as exc:
                run.error = str(exc)
            run.run_wall_s = time.perf_counter() - t1
            run.traffic = read_traffic(run.records_dir)
            run.holdout = _score_holdout(run, secret)
            status = run.outcome.status if run.outcome else f"error: {run.error}"
            console.print(f"  {status} in {run.run_wall_s:.1f} s")
        return runs, setup
    finally:
        for site in sites:
            if site.process is not None:
                site.process.stop()
        link.stop()


# --- figures -----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def _round_rows(run: MethodRun) -> list[dict[str, Any]]:
    records = run.outcome.rounds if run.outcome else []
    traffic = {t.round_number: t for t in run.traffic}
    rows: list[dict[str, Any]] = []
    for r in records:
        t = traffic.get(r.round_number)
        per_site: dict[str, dict[str, Any]] = {}
        if t is not None:
            for site in sorted(t.per_site):
                total = t.site_total(site)
                per_site[site] = {
                    "sent": total.sent,
                    "received": total.received,
                    "messages": total.messages,
                    "by_type": {k: vars(v).copy() for k, v in t.per_site[site].items()},
                }
        slowest_train = max(r.site_train_seconds.values(), default=0.0)
        rows.append(
            {
                "repeat": run.repeat + 1,
                "study_id": run.plan.study_id,
                "round": r.round_number,
                "status": r.status,
                "participants": list(r.participants),
                "wall_s": r.wall_seconds,
                "train_phase_s": r.train_wall_seconds,
                "evaluate_phase_s": r.evaluate_wall_seconds,
                "server_aggregate_s": r.aggregate_seconds,
                "slowest_site_train_s": slowest_train,
                "slowest_site_crypto_s": max(r.site_encrypt_seconds.values(), default=0.0),
                "wall_minus_training_s": max(0.0, r.wall_seconds - slowest_train),
                "epsilon_max": max((e for e in r.epsilon.values() if e is not None), default=None),
                "local_test": dict(r.evaluation),
                "rejected": [x.as_record() for x in r.rejected],
                "waves": t.waves if t else 0,
                "metering_s": t.metering_seconds if t else 0.0,
                "per_site": per_site,
            }
        )
    return rows


def summarise(runs: list[MethodRun]) -> dict[str, Any]:
    """One method's per-round details (every repeat) and its summary (JSON-ready).

    Times are medians over the aggregated rounds of every repeat; bytes and messages are
    means over sites and rounds; held-out scores are means over repeats.
    """
    method = runs[0].method
    rounds = [row for run in runs for row in _round_rows(run)]
    done = [row for row in rounds if row["status"] == "aggregated"]
    sites = [s for row in rounds for s in row["per_site"].values()]
    holdouts = [run.holdout for run in runs if run.holdout]
    last_local = [
        rows[-1]["local_test"]
        for rows in (_round_rows(run) for run in runs)
        if rows and rows[-1]["status"] == "aggregated"
    ]
    completed = all(run.outcome is not None and run.outcome.status == "completed" for run in runs)
    failures = [run.outcome.failure if run.outcome else run.error for run in runs]
    walls = [row["wall_s"] for row in done]
    summary: dict[str, Any] = {
        "status": "completed" if completed else "failed",
        "failure": "; ".join(f for f in failures if f) or None,
        "repeats": len(runs),
        "rounds_completed": len(done),
        "participants_per_round": [len(row["participants"]) for row in rounds],
        "wall_median_s": _median(walls),
        "wall_min_s": min(walls, default=0.0),
        "wall_max_s": max(walls, default=0.0),
        "wall_total_s": _median([sum(r["wall_s"] for r in _round_rows(run)) for run in runs]),
        "run_wall_s": _median([run.run_wall_s for run in runs]),
        "train_phase_median_s": _median([row["train_phase_s"] for row in done]),
        "evaluate_phase_median_s": _median([row["evaluate_phase_s"] for row in done]),
        "site_training_median_s": _median([row["slowest_site_train_s"] for row in done]),
        "wall_minus_training_median_s": _median([row["wall_minus_training_s"] for row in done]),
        "site_crypto_median_s": _median([row["slowest_site_crypto_s"] for row in done]),
        "server_aggregate_median_s": _median([row["server_aggregate_s"] for row in done]),
        "sent_per_site_round": _mean([s["sent"] for s in sites]),
        "received_per_site_round": _mean([s["received"] for s in sites]),
        "messages_per_site_round": _mean([s["messages"] for s in sites]),
        "waves_per_round": _mean([row["waves"] for row in rounds]),
        "bytes_per_param_sent": _mean([s["sent"] for s in sites]) / runs[0].plan.num_params,
        "holdout": {k: _mean([h[k] for h in holdouts]) for k in ("accuracy", "auc", "patients")}
        if holdouts
        else {},
        "holdout_per_repeat": holdouts,
        "local_test_last_round": {
            k: _mean([m[k] for m in last_local if k in m]) for k in ("accuracy", "auc", "loss")
        }
        if last_local
        else {},
        "epsilon_max": max((row["epsilon_max"] or 0.0 for row in rounds), default=0.0),
    }
    summary["bytes_per_site_round"] = (
        summary["sent_per_site_round"] + summary["received_per_site_round"]
    )
    return {"method": method, "label": LABELS[method], "summary": summary, "rounds": rounds}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``ratios`` against plaintext FedAvg (when it ran) for times and bytes."""
    base = next((r["summary"] for r in results if r["method"] == FEDAVG), None)
    keys = (
        "wall_median_s",
        "wall_total_s",
        "wall_minus_training_median_s",
        "sent_per_site_round",
        "received_per_site_round",
        "bytes_per_site_round",
    )
    for result in results:
        s = result["summary"]
        result["ratios_vs_fedavg"] = {
            k: (s[k] / base[k] if base and base[k] else None) for k in keys
        }


def _size(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def _participants(counts: list[int]) -> str:
    """``3`` when every round had 3 participants, else each round's count."""
    if counts and len(set(counts)) == 1:
        return str(counts[0])
    return ",".join(str(c) for c in counts) or "-"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(console: Console, results: list[dict[str, Any]], rounds: int) -> None:
    """The comparison as a rich table."""
    table = Table(title=f"The demo study, {rounds} round(s), real Flower processes, 3 sites")
    table.caption = "per site and round: msgs, sent, received"
    columns = (
        "method",
        "rounds",
        "sites",
        "wall/round",
        "total",
        "time x",
        "train phase",
        "wall - training",
        "msgs",
        "sent",
        "received",
        "bytes x",
        "held-out acc/AUC",
        "local acc/AUC",
        "max ε",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for result in results:
        s, ratios = result["summary"], result["ratios_vs_fedavg"]
        hold, local = s["holdout"], s["local_test_last_round"]
        table.add_row(
            result["label"],
            f"{s['rounds_completed']}/{rounds * s['repeats']}",
            _participants(s["participants_per_round"]),
            f"{s['wall_median_s']:.1f} s",
            f"{s['wall_total_s']:.1f} s",
            _x(ratios["wall_median_s"]),
            f"{s['train_phase_median_s']:.1f} s",
            f"{s['wall_minus_training_median_s']:.1f} s",
            f"{s['messages_per_site_round']:.0f}",
            _size(s["sent_per_site_round"]),
            _size(s["received_per_site_round"]),
            _x(ratios["bytes_per_site_round"]),
            f"{hold['accuracy']:.3f} / {hold['auc']:.3f}" if hold else "-",
            f"{local.get('accuracy', 0):.3f} / {local.get('auc', 0):.3f}" if local else "-",
            f"{s['epsilon_max']:.2f}",
        )
    console.print(table)
    console.print(
        "rounds: aggregated/asked (all repeats); sites: participants in every round; times: "
        "medians over rounds (and repeats); wall - training: the round minus its slowest "
        "site's local training; x: against plaintext FedAvg.\n"
        "msgs, sent, received: per site and round (mean), every message each way (train and "
        "evaluate, all SecAgg+ stages) as Flower 1.41 ships it (deflated objects, no "
        "gRPC/TLS framing), measured by the ServerApp.\n"
        "Times: the ServerApp's round records. held-out: the final model on the 114 held-out "
        "patients; local: the sites' weighted test metrics in the last round."
    )


def write_chart(results: list[dict[str, Any]], path: Path) -> None:
    """Bars: median wall time per round (whiskers: fastest and slowest round), and bytes
    per site per round (sent and received stacked), each labelled with its ratio to FedAvg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from consortium_server.reports.charts import PALETTE

    labels = [r["label"] for r in results]
    figure = Figure(figsize=(9.0, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax_time, ax_bytes = figure.subplots(1, 2)
    walls = [r["summary"]["wall_median_s"] for r in results]
    lows = [w - r["summary"]["wall_min_s"] for w, r in zip(walls, results, strict=True)]
    highs = [r["summary"]["wall_max_s"] - w for w, r in zip(walls, results, strict=True)]
    bars = ax_time.bar(
        labels, walls, color=PALETTE[: len(labels)], yerr=[lows, highs], capsize=4, ecolor="#444"
    )
    for bar, result in zip(bars, results, strict=True):
        ratio = result["ratios_vs_fedavg"]["wall_median_s"]
        ax_time.annotate(
            _x(ratio),
            (bar.get_x() + bar.get_width() / 2, max(result["summary"]["wall_max_s"], 0.0)),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    tallest = max((r["summary"]["wall_max_s"] for r in results), default=1.0)
    ax_time.set_ylim(top=tallest * 1.15 or 1.0)
    ax_time.set_ylabel("seconds")
    ax_time.set_title("Wall time per round (median, min-max)", fontsize=10)
    sent = [r["summary"]["sent_per_site_round"] / 1e3 for r in results]
    received = [r["summary"]["received_per_site_round"] / 1e3 for r in results]
    ax_bytes.bar(labels, sent, color=PALETTE[0], label="sent (site → server)")
    stacked = ax_bytes.bar(
        labels, received, bottom=sent, color=PALETTE[5], label="received (server → site)"
    )
    for bar, result in zip(stacked, results, strict=True):
        ratio = result["ratios_vs_fedavg"]["bytes_per_site_round"]
        top = bar.get_y() + bar.get_height()
        ax_bytes.annotate(
            _x(ratio),
            (bar.get_x() + bar.get_width() / 2, top),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    tops = [a + b for a, b in zip(sent, received, strict=True)]
    ax_bytes.set_ylim(top=max(tops, default=1.0) * 1.25 or 1.0)
    ax_bytes.set_ylabel("kB per site per round")
    ax_bytes.set_title("Bytes on the wire per site per round", fontsize=10)
    ax_bytes.legend(fontsize=7, frameon=False, loc="upper left")
    for axes in (ax_time, ax_bytes):
        axes.tick_params(axis="x", labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1_5_15": list(load),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print the table, write JSON and the chart if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per method (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round per method")
    parser.add_argument("--json", type=Path, help="write the results here (chart next to it)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all three"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per method, order rotated (default 1)"
    )
    parser.add_argument("--keep", type=Path, help="keep the work directory (logs) here")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if rounds < 1 or args.repeat < 1:
        parser.error("--rounds and --repeat must be at least 1")
    console = Console(width=max(Console().width, 180))
    started = datetime.now(UTC).isoformat()
    load_before = machine()["load_average_1_5_15"]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        runs, setup = run_benchmark(
            args.methods, rounds, args.keep.resolve(), console, repeats=args.repeat
        )
    else:
        with tempfile.TemporaryDirectory(prefix="concord-compare-") as tmp:
            runs, setup = run_benchmark(
                args.methods, rounds, Path(tmp), console, repeats=args.repeat
            )
    results = [summarise([r for r in runs if r.method == m]) for m in args.methods]
    add_ratios(results)
    print_table(console, results, rounds)
    console.print(f"federation start-up: {setup['federation start-up s']:.1f} s")
    if args.json:
        body = {
            "benchmark": "demo_compare",
            "started_at": started,
            "rounds": rounds,
            "repeats": args.repeat,
            "run_order": [f"{r.method} (run {r.repeat + 1})" for r in runs],
            "sites": N_SITES,
            "num_params": runs[0].plan.num_params if runs else 0,
            "machine": {**machine(), "load_average_before": load_before},
            "setup": setup,
            "bytes_measured": "ServerApp MeteredGrid: deflated Flower objects of every "
            "message each way (train + evaluate), no gRPC/TLS framing",
            "methods": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(body, indent=1, sort_keys=True))
        chart = args.json.with_suffix(".png")
        write_chart(results, chart)
        console.print(f"wrote {args.json} and {chart}")
    return 0 if all(r["summary"]["status"] == "completed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
