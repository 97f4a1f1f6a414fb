"""Benchmark: one study with 10, 50 and 100 simulated sites on Flower's simulation engine.

The whole of Concord's round runs, unchanged, on Flower 1.41's simulation engine
(``flwr.simulation.run_simulation``, Ray backend): a ``ServerApp`` whose main runs the real
round loop ``run_study_rounds`` with the real ``BlindAggregationStrategy``, gated by the
benchmarks' :class:`~benchmarks.apps.records.RecordingGate` (no consortium server here: it
writes each round record to disk and lets the next round start), then writes the outcome
and the final model next to the records; and ``N`` virtual SuperNodes that run the real
site ``ClientApp`` (``site_node.federation.clientapp:app``: contract guard, Opacus DP-SGD,
CKKS encryption of the weighted update, decryption of the aggregate for evaluation).

    .venv/bin/python benchmarks/scale.py                   # 10, 50 and 100 sites, 1 round
    .venv/bin/python benchmarks/scale.py --quick           # 10 sites, 1 round
    .venv/bin/python benchmarks/scale.py --sites 20 --rounds 2 --json scale.json

Needs ``flwr[simulation]`` (Ray): ``pip install -e '.[scale]'``, and the benchmarks package
(``pip install -e ./benchmarks``, which ``make install`` does).

A simulated site is a virtual SuperNode with everything a real site keeps on disk: its own
state dir (the steward's approval of the contract, its copy of the study key, its DP
accountant state) and its own data, a CSV file (``kind: csv``) of 200 records drawn with
replacement from scikit-learn's breast-cancer set (569 real patients, 30 features) with a
per-site seed. Flower 1.41 gives each virtual node only ``partition-id`` and
``num-partitions`` as node config (``flwr.server.superlink.fleet.vce``), so a thin wrapper
ClientApp maps the partition id to that site's node config (``site-id``, ``state-dir``,
``datasets-file``) and hands the message to the real ClientApp; it also supplies the run
config (the plan's ``to_run_config()``), which ``run_simulation`` leaves empty. The
virtual sites share ``--actors`` Ray worker processes (default: one per core), so sites
train one after another on each actor, not in parallel as real hospitals would.

Each number of sites runs in a fresh child process that imports neither torch nor
scikit-learn, so the driver's peak memory (``VmHWM``; ``ru_maxrss`` too, in the JSON) is
that run's own server side. Measured per round: the RoundRecord's wall time and
``aggregate_seconds`` (the blind sum), the server step (screening every reply plus the
blind sum: from the last train reply to the first evaluate message), the bytes sent and
received (Flower's deflated objects, as ``aggregation_compare.py`` counts them), the train
replies the server holds at once; per run: the driver's peak RSS and the Ray worker
processes' peak RSS (``/proc``, sampled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before Flower and torch are imported; Ray's workers inherit the environment.
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # One torch thread per Ray actor: the actors are the parallelism.
    "OMP_NUM_THREADS": "1",
    # Ray: no accelerators here; keep its future-behaviour tip quiet.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # No idle pre-started Ray workers: only the ClientApp actors do work, and an idle
    # worker that exits mid-run aborts noisily (a Ray 2.55 mutex check on exit).
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402

from benchmarks.apps.grids import ForwardingGrid, wire_bytes  # noqa: E402
from benchmarks.apps.records import (  # noqa: E402
    RecordingGate,
    open_final_model,
    read_outcome,
    write_outcome,
)
from benchmarks.apps.rosters import keyed_roster  # noqa: E402
from concord_protocol.contract import (  # noqa: E402
    EncryptionSpec,
    FederationSpec,
    ModelSpec,
    PrivacySpec,
    Purpose,
    RosterMember,
    StudyContract,
    TrainingSpec,
)
from concord_protocol.rounds import RoundRecord  # noqa: E402
from consortium_server.federation.plan import RunPlan  # noqa: E402
from consortium_server.federation.records import StudyOutcome  # noqa: E402
from consortium_server.federation.serverapp import run_study_rounds  # noqa: E402
from site_node.crypto import generate_study_context, public_context  # noqa: E402
from site_node.federation.approvals import ApprovalStore  # noqa: E402

console = Console()

SCRIPT = Path(__file__).resolve()
STUDY_ID = "scale-benchmark"
RECORDS_PER_SITE = 200
#: Class names of scikit-learn's breast-cancer targets (0, 1); the CSV's label column holds them.
CLASSES = ("malignant", "benign")
#: The contract allows at most 100 datasets, one per site here.
MAX_SITES = 100


# --- the simulated sites on disk ----------------------------------------------------------


def site_id(index: int) -> str:
    """The consortium id of simulated site ``index`` (= its virtual node's partition id)."""
    return f"site-{index:03d}"


def dataset_id(index: int) -> str:
    """The catalogue id of simulated site ``index``'s dataset."""
    return f"bc-{index:03d}"


@dataclass(frozen=True)
class SiteDirs:
    """Where the simulated sites live: ``root/site-NNN/{state/, datasets.yaml, data.csv}``.

    Picklable (Ray sends it to its workers with the wrapper ClientApp).
    """

    root: str

    def site_dir(self, index: int) -> Path:
        """Site ``index``'s folder."""
        return Path(self.root) / site_id(index)

    def state_dir(self, index: int) -> Path:
        """Site ``index``'s state dir (approvals, study key, DP accountant state)."""
        return self.site_dir(index) / "state"

    def datasets_file(self, index: int) -> Path:
        """Site ``index``'s datasets file (one ``kind: csv`` entry)."""
        return self.site_dir(index) / "datasets.yaml"

    def node_config(self, index: int) -> dict[str, str]:
        """The node config a real SuperNode of site ``index`` would get (``--node-config``)."""
        return {
            "site-id": site_id(index),
            "state-dir": str(self.state_dir(index)),
            "datasets-file": str(self.datasets_file(index)),
        }


def write_site_data(dirs: SiteDirs, index: int, *, records: int, seed: int) -> None:
    """Write site ``index``'s CSV (``records`` rows resampled from the breast-cancer set)."""
    from sklearn.datasets import load_breast_cancer

    from site_node.data.reference import WDBC_FEATURE_RANGES

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    rows = rng.integers(0, len(y), size=records)
    folder = dirs.site_dir(index)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.csv"
    header = ",".join([*(f"f{j:02d}" for j in range(x.shape[1])), "label"])
    lines = [header]
    for i in rows:
        lines.append(",".join([*(repr(float(v)) for v in x[i]), CLASSES[int(y[i])]]))
    path.write_text("\n".join(lines) + "\n")
    config = {
        "id": dataset_id(index),
        "kind": "csv",
        "path": str(path),
        "label_column": "label",
        "classes": list(CLASSES),
        "feature_ranges": {
            f"f{j:02d}": list(WDBC_FEATURE_RANGES[str(name)])
            for j, name in enumerate(load_breast_cancer().feature_names)
        },
        "test_fraction": 0.2,
        "seed": 7,
        "description": "breast-cancer records resampled with replacement (scale benchmark)",
    }
    dirs.datasets_file(index).write_text(yaml.safe_dump([config], sort_keys=False))


def make_contract(
    n_sites: int, rounds: int, round_timeout_s: int, roster: list[RosterMember]
) -> StudyContract:
    """The benchmark's study: the demo's tabular MLP, DP-SGD, CKKS; every site must reply."""
    return StudyContract(
        roster=roster,
        key_generator=roster[0].site_id,
        title=f"Scale benchmark, {n_sites} simulated sites",
        purpose=Purpose.METHOD_DEVELOPMENT,
        ethics_reference="IRB-2026-0001",
        datasets=[dataset_id(i) for i in range(n_sites)],
        model=ModelSpec(name="tabular-mlp", version="1", hyperparameters={}),
        training=TrainingSpec(
            rounds=rounds, local_epochs=1, batch_size=32, learning_rate=0.1, optimizer="sgd"
        ),
        privacy=PrivacySpec(epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
        federation=FederationSpec(min_sites=n_sites, round_timeout_s=round_timeout_s),
        encryption=EncryptionSpec(enabled=True),
    )


def set_up_sites(
    dirs: SiteDirs,
    contract: StudyContract,
    n_sites: int,
    *,
    records: int,
    seed: int,
    progress: Progress,
) -> bytes:
    """Give every site its data, the steward's approval and the study key; the public
    context."""
    secret = generate_study_context()
    contract_hash = contract.contract_hash()
    task = progress.add_task(f"set up {n_sites} sites (data, approval, key)", total=n_sites)
    for i in range(n_sites):
        write_site_data(dirs, i, records=records, seed=seed)
        store = ApprovalStore(dirs.state_dir(i))
        store.approve(STUDY_ID, contract, contract_hash)
        store.save_study_key(STUDY_ID, secret, sender_id=site_id(0))
        progress.advance(task)
    return public_context(secret)


# --- the virtual nodes' ClientApp ---------------------------------------------------------


def simulated_site_context(dirs: SiteDirs, run_config: dict[str, Any], context: Context) -> Context:
    """The context site ``partition-id`` would have on its own SuperNode."""
    index = int(str(context.node_config["partition-id"]))
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=dict(dirs.node_config(index)),
        state=context.state,
        run_config=dict(run_config),
    )


def simulated_sites_app(dirs: SiteDirs, run_config: dict[str, Any]) -> ClientApp:
    """A ClientApp that runs the real site ClientApp with the site's own node config."""
    app = ClientApp()

    def forward(msg: Message, context: Context) -> Message:
        import logging

        from site_node.federation.clientapp import app as site_app

        # Flower's INFO/WARNING lines from the actors (e.g. each actor's "Manually
        # terminating ClientAppActor" at the end) would reach the driver's console.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        return site_app(msg, simulated_site_context(dirs, run_config, context))

    app.train()(forward)
    app.evaluate()(forward)
    return app


# --- the server side: a metered grid around Flower's in-memory grid -----------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries that across ``execve`` from the forked parent, so in
    a child of a process that imported torch it starts at the parent's size (see
    :func:`ru_maxrss_bytes`). ``VmHWM`` belongs to this program's own address space.
    """
    peak = _proc_status(os.getpid()).get("VmHWM")
    return 1024 * peak if peak is not None else ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (kB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class PhaseStats:
    """One train or evaluate wave of one round, as the server saw it."""

    messages: int = 0
    replies: int = 0
    error_replies: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    first_reply_s: float | None = None
    last_reply_s: float | None = None
    done_at: float = 0.0


@dataclass
class RoundStats:
    """What the metered grid saw of one round."""

    train: PhaseStats = field(default_factory=PhaseStats)
    evaluate: PhaseStats = field(default_factory=PhaseStats)
    server_step_seconds: float | None = None
    driver_peak_rss_bytes: int = 0


class MeteredGrid(ForwardingGrid):
    """Flower's grid, unchanged, plus byte counts, the server step's time and progress.

    ``send_and_receive`` is Flower's own loop (push, then pull every 0.1 s until every
    reply is in or the timeout passes), so that progress can show replies as they arrive.
    """

    def __init__(self, inner: Grid, progress: Progress) -> None:
        super().__init__(inner)
        self.progress = progress
        self.rounds: dict[int, RoundStats] = {}
        self.pull_interval = 0.1

    def _stats(self, group_id: str) -> RoundStats:
        round_number = int(group_id.rsplit("/", 1)[-1])
        return self.rounds.setdefault(round_number, RoundStats())

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """As Flower's; the first evaluate message of a round ends its server step."""
        stats = self._stats(group_id)
        if message_type == "evaluate" and stats.server_step_seconds is None:
            stats.server_step_seconds = time.perf_counter() - stats.train.done_at
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, pull replies until all are in or ``timeout`` passes."""
        started = time.perf_counter()
        batch = list(messages)
        if not batch:
            return []
        kind = batch[0].metadata.message_type
        stats = self._stats(batch[0].metadata.group_id)
        phase = stats.train if kind == "train" else stats.evaluate
        phase.messages += len(batch)
        phase.bytes_sent += sum(wire_bytes(m) for m in batch)
        round_number = batch[0].metadata.group_id.rsplit("/", 1)[-1]
        task = self.progress.add_task(f"round {round_number}: {kind}", total=len(batch))
        pending = set(self.inner.push_messages(batch))
        del batch
        deadline = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < deadline:
            new = list(self.inner.pull_messages(pending))
            if new:
                phase.last_reply_s = time.perf_counter() - started
                if phase.first_reply_s is None:
                    phase.first_reply_s = phase.last_reply_s
            for reply in new:
                phase.bytes_received += wire_bytes(reply)
                phase.error_replies += int(reply.has_error())
            replies.extend(new)
            pending.difference_update(m.metadata.reply_to_message_id for m in new)
            self.progress.update(task, completed=len(replies))
            if not pending:
                break
            time.sleep(self.pull_interval)
        phase.replies = len(replies)
        phase.seconds = time.perf_counter() - started
        phase.done_at = time.perf_counter()
        stats.driver_peak_rss_bytes = peak_rss_bytes()
        return replies


# --- memory of the Ray processes ----------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "PPid"):
            out[key] = int(value.split()[0])
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _proc_status(int(entry.name)).get("PPid")
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


class RaySampler:
    """Samples the RSS of this process's descendants (Ray's GCS, raylet, workers) from
    ``/proc`` every ``interval_s``; the ClientApp actors are those named ``ClientAppActor``."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.actor_peak_kb: dict[int, int] = {}
        self.all_peak_sum_kb = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-sampler", daemon=True)

    def _sample(self) -> None:
        total = 0
        pids = _descendants(os.getpid())
        self.processes = max(self.processes, len(pids))
        for pid in pids:
            status = _proc_status(pid)
            total += status.get("VmRSS", 0)
            if "ClientAppActor" in _cmdline(pid):
                peak = max(status.get("VmHWM", 0), status.get("VmRSS", 0))
                self.actor_peak_kb[pid] = max(self.actor_peak_kb.get(pid, 0), peak)
        self.all_peak_sum_kb = max(self.all_peak_sum_kb, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # noqa: S112 - a process vanished mid-read; next sample
                continue

    @contextmanager
    def running(self) -> Iterator[RaySampler]:
        """Sample while the block runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)

    def as_record(self) -> dict[str, Any]:
        """JSON-ready figures (bytes)."""
        peaks = sorted(self.actor_peak_kb.values())
        return {
            "actor_processes": len(peaks),
            "actor_peak_rss_bytes_max": 1024 * max(peaks, default=0),
            "actor_peak_rss_bytes_each": [1024 * p for p in peaks],
            "descendant_processes": self.processes,
            "descendants_rss_sum_peak_bytes": 1024 * self.all_peak_sum_kb,
        }


# --- one run (in the child process) -------------------------------------------------------


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def decrypt_check(dirs: SiteDirs, records_dir: Path, plan: RunPlan) -> dict[str, Any]:
    """Decrypt the final aggregate as site 0 would (its own key, the tags checked): finite
    values?"""
    outcome = read_outcome(records_dir)
    if outcome is None or outcome.final_model is None:
        return {"decrypts": False, "finite": False, "max_abs": None}
    key = ApprovalStore(dirs.state_dir(0)).study_key(STUDY_ID)
    assert key is not None
    values = open_final_model(plan, outcome.final_model, key.secret_context)
    return {
        "decrypts": True,
        "finite": bool(np.isfinite(values).all()),
        "max_abs": float(np.abs(values).max()),
        "digest": outcome.final_model.digest,
    }


def prepare(
    workdir: Path, n_sites: int, rounds: int, *, records: int, seed: int, round_timeout_s: int
) -> RunPlan:
    """Set up ``n_sites`` sites under ``workdir`` and write the run's plan (``plan.json``,
    the run config the ServerApp reads)."""
    from site_node.training import build_model, num_parameters

    dirs = SiteDirs(str(workdir / "sites"))
    contract = make_contract(
        n_sites,
        rounds,
        round_timeout_s,
        keyed_roster(
            ((site_id(i), dirs.state_dir(i)) for i in range(n_sites)), max_examples=records
        ),
    )
    num_params = num_parameters(
        build_model(contract.model, input_shape=(30,), num_classes=len(CLASSES))
    )
    with Progress(*_columns(), console=console) as progress:
        public = set_up_sites(
            dirs, contract, n_sites, records=records, seed=seed, progress=progress
        )
    plan = RunPlan(
        study_id=STUDY_ID,
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=num_params,
        sites=tuple(site_id(i) for i in range(n_sites)),
        public_context=public,
        node_wait_s=300.0,
    )
    (workdir / "plan.json").write_text(json.dumps(plan.to_run_config()))
    return plan


def _columns() -> tuple[Any, ...]:
    return (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


def run_one(workdir: Path, *, actors: int) -> dict[str, Any]:
    """Run the study prepared in ``workdir`` on the simulation engine; the figures.

    This process imports neither torch nor scikit-learn (the ClientApps run in Ray's
    workers), so its memory is the server side's: the ServerApp, Flower's in-memory
    SuperLink state that holds the messages, and Ray's driver.
    """
    from flwr.simulation import run_simulation

    _quiet()
    load_before = os.getloadavg()
    plan = RunPlan.from_run_config(json.loads((workdir / "plan.json").read_text()))
    records_dir = workdir / "records"
    n_sites = len(plan.sites)
    dirs = SiteDirs(str(workdir / "sites"))
    outcome_box: list[StudyOutcome] = []
    metered: list[MeteredGrid] = []
    with Progress(*_columns(), console=console) as progress:
        server = ServerApp()

        @server.main()
        def _main(grid: Grid, context: Context) -> None:
            meter = MeteredGrid(grid, progress)
            metered.append(meter)
            outcome = run_study_rounds(meter, plan, gate=RecordingGate(records_dir))
            write_outcome(records_dir, outcome)
            outcome_box.append(outcome)

        start_task: TaskID = progress.add_task(
            f"simulation: {n_sites} virtual SuperNodes on {actors} Ray actors", total=None
        )
        baseline_rss = peak_rss_bytes()
        sampler = RaySampler()
        t0 = time.perf_counter()
        with sampler.running():
            run_simulation(
                server_app=server,
                client_app=simulated_sites_app(dirs, plan.to_run_config()),
                num_supernodes=n_sites,
                backend_config={
                    "init_args": {"num_cpus": actors, "include_dashboard": False},
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                },
            )
        simulation_s = time.perf_counter() - t0
        progress.update(start_task, total=1, completed=1)
    if not outcome_box:
        raise RuntimeError("the ServerApp returned no outcome")
    outcome, meter = outcome_box[0], metered[0]
    return {
        "sites": n_sites,
        "rounds_asked": plan.rounds,
        "status": outcome.status,
        "failure": outcome.failure,
        "params": plan.num_params,
        "actors": actors,
        "simulation_seconds": simulation_s,
        "rounds": [_round_row(r, meter.rounds.get(r.round_number)) for r in outcome.rounds],
        "driver_baseline_rss_bytes": baseline_rss,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "driver_ru_maxrss_bytes": ru_maxrss_bytes(),
        "ray": sampler.as_record(),
        "final_model": decrypt_check(dirs, records_dir, plan),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }


def _round_row(record: RoundRecord, stats: RoundStats | None) -> dict[str, Any]:
    stats = stats or RoundStats()
    step = stats.server_step_seconds
    train_s = [record.site_train_seconds[s] for s in record.participants]
    enc_s = [record.site_encrypt_seconds[s] for s in record.participants]
    eps = [e for e in record.epsilon.values() if e is not None]
    return {
        "round": record.round_number,
        "status": record.status,
        "failure": record.failure,
        "participants": len(record.participants),
        "rejected": len(record.rejected),
        "missing": len(record.missing_sites),
        "wall_seconds": record.wall_seconds,
        "train_wall_seconds": record.train_wall_seconds,
        "evaluate_wall_seconds": record.evaluate_wall_seconds,
        "aggregate_seconds": record.aggregate_seconds,
        "server_step_seconds": step,
        "screening_seconds": None if step is None else max(0.0, step - record.aggregate_seconds),
        "first_train_reply_seconds": stats.train.first_reply_s,
        "last_train_reply_seconds": stats.train.last_reply_s,
        "site_train_seconds_mean": float(np.mean(train_s)) if train_s else None,
        "site_train_seconds_median": float(np.median(train_s)) if train_s else None,
        "site_train_seconds_max": max(train_s, default=None),
        "site_encrypt_seconds_mean": float(np.mean(enc_s)) if enc_s else None,
        "epsilon_max": max(eps, default=None),
        "total_weight": record.total_weight,
        "evaluation": record.evaluation,
        "messages_sent": stats.train.messages + stats.evaluate.messages,
        "bytes_sent": stats.train.bytes_sent + stats.evaluate.bytes_sent,
        "bytes_received": stats.train.bytes_received + stats.evaluate.bytes_received,
        "train_replies_held_bytes": stats.train.bytes_received,
        "error_replies": stats.train.error_replies + stats.evaluate.error_replies,
        "driver_peak_rss_bytes": stats.driver_peak_rss_bytes,
    }


# --- the parent: one child process per number of sites ------------------------------------


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(runs: Sequence[dict[str, Any]]) -> None:
    """The summary table (one row per run and round), then a line per run."""
    table = Table(
        title="One Concord study on Flower's simulation engine (tabular-mlp, DP-SGD + CKKS)"
    )
    for column in (
        "sites",
        "round",
        "status",
        "participants",
        "round wall s",
        "train wave s",
        "first / last train reply s",
        "screen + sum ms",
        "of which blind sum ms",
        "sent MB",
        "received MB",
        "train replies held MB",
        "driver peak RSS MB",
        "accuracy",
    ):
        table.add_column(column, justify="right")
    for run in runs:
        for row in run["rounds"]:
            step = row["server_step_seconds"]
            table.add_row(
                str(run["sites"]),
                str(row["round"]),
                row["status"],
                str(row["participants"]),
                _s(row["wall_seconds"], 1),
                _s(row["train_wall_seconds"], 1),
                f"{_s(row['first_train_reply_seconds'], 1)} / "
                f"{_s(row['last_train_reply_seconds'], 1)}",
                _s(None if step is None else step * 1e3, 0),
                _s(row["aggregate_seconds"] * 1e3, 0),
                _mb(row["bytes_sent"]),
                _mb(row["bytes_received"]),
                _mb(row["train_replies_held_bytes"]),
                _mb(row["driver_peak_rss_bytes"]),
                _s(row["evaluation"].get("accuracy"), 3),
            )
    Console(width=max(console.width, 200)).print(table)
    for run in runs:
        ray, final = run["ray"], run["final_model"]
        each = ", ".join(_mb(b) for b in ray["actor_peak_rss_bytes_each"])
        console.print(
            f"{run['sites']} sites: {run['status']}; set-up {run['setup_seconds']:.1f} s, "
            f"simulation {run['simulation_seconds']:.1f} s. Driver RSS "
            f"{_mb(run['driver_baseline_rss_bytes'])} MB before the simulation, peak "
            f"{_mb(run['driver_peak_rss_bytes'])} MB. {ray['actor_processes']} Ray actors "
            f"(peak RSS {each} MB); all Ray processes together "
            f"{_mb(ray['descendants_rss_sum_peak_bytes'])} MB at peak. Final aggregate "
            f"decrypts to finite values at site-000: {final['decrypts'] and final['finite']}. "
            f"Load average {run['load_before'][0]:.1f} before, {run['load_after'][0]:.1f} after."
        )


def main(argv: list[str] | None = None) -> int:
    """Run the study for each number of sites (a child process each) and print a table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10 sites, 1 round")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the sites and records here (default: a temp dir)"
    )
    parser.add_argument(
        "--actors", type=int, default=os.cpu_count() or 1, help="Ray actors (default: cores)"
    )
    parser.add_argument("--records-per-site", type=int, default=RECORDS_PER_SITE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sites' resampling")
    parser.add_argument("--round-timeout", type=int, default=3600, help="seconds per round")
    parser.add_argument("--single", type=Path, help=argparse.SUPPRESS)  # child: its workdir
    args = parser.parse_args(argv)

    if args.single is not None:  # the child: the prepared study in that folder
        row = run_one(args.single, actors=args.actors)
        (args.single / "result.json").write_text(json.dumps(row, indent=1))
        return 0 if row["status"] == "completed" else 1

    sites: list[int] = [10] if args.quick else args.sites
    rounds: int = 1 if args.quick else args.rounds
    if any(not 3 <= n <= MAX_SITES for n in sites):
        parser.error(f"--sites must be within 3..{MAX_SITES} (policy floor, contract limit)")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="concord-scale-"))
    runs: list[dict[str, Any]] = []
    failed = False
    try:
        for n in sites:
            workdir = root / f"{n}-sites"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            console.rule(f"{n} simulated sites, {rounds} round(s), {args.actors} Ray actors")
            t0 = time.perf_counter()
            prepare(
                workdir,
                n,
                rounds,
                records=args.records_per_site,
                seed=args.seed,
                round_timeout_s=args.round_timeout,
            )
            setup_s = time.perf_counter() - t0
            command = [sys.executable, str(SCRIPT), "--single", str(workdir)]
            command += ["--actors", str(args.actors)]
            code = subprocess.run(command, check=False).returncode
            out = workdir / "result.json"
            if not out.is_file():
                console.print(f"[red]{n} sites: the run failed (exit {code})")
                failed = True
                continue
            row = json.loads(out.read_text())
            row.update(
                setup_seconds=setup_s,
                records_per_site=args.records_per_site,
                workdir=str(workdir) if args.workdir else None,
            )
            runs.append(row)
            failed |= code != 0
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(runs)
    if args.json is not None:
        body = {
            "benchmark": "scale",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "runs": runs,
        }
        args.json.write_text(json.dumps(body, indent=1))
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    raise SystemExit(main())
