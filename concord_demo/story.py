"""The demo's story: a whole study across three hospitals, step by step, with timings.

1. the consortium server and a Flower SuperLink (TLS, SuperNode authentication);
2. three hospitals enrol, each with its keys, SuperNode, site agent and site policy;
3. each publishes its share of the breast-cancer data (non-IID) to the catalogue;
4. a researcher dry-runs the study against the policies, then submits it;
5. each site's steward approves the exact contract hash where the site policy allows;
6. the sites exchange the study key; rounds run with DP + HE, printed as they end;
7. the study completes, budgets are charged, the sites witness the final head;
8. the release gate: sites decrypt and sign off the final model; the researcher downloads
   it with its model card;
9. results next to a centralised non-private baseline, the audit verification, reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from concord_protocol.contract import StudyContract

from concord_demo.stack import RESEARCHER_ORG, DemoStack, Hospital
from concord_protocol.client import ConsortiumClient
from concord_protocol.rounds import RoundAuditDetails
from concord_protocol.site_keys import format_fingerprint

__all__ = ["DemoOptions", "DemoResult", "dataset_governance", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    state_dir: Path = Path(".concord/demo")
    rounds: int = 3
    epsilon: float = 6.0
    site_epsilon_caps: tuple[float, ...] = (8.0, 8.0, 8.0)
    keep_running: bool = False
    imaging: bool = False
    image_size: int = 32
    images_per_site: int = 128


@dataclass
class DemoResult:
    """What the demo produced (the e2e test asserts on it)."""

    study_id: str = ""
    state: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    federated: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit_ok: bool = False
    audit_summary: str = ""
    witnessed: bool = False
    released: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class _Steps:
    """Prints numbered steps and records how long each took."""

    def __init__(self, console: Console, timings: dict[str, float]) -> None:
        self.console = console
        self.timings = timings

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.console.rule(f"[bold cyan]{title}")
        started = time.perf_counter()
        with self.console.status(title, spinner="dots"):
            yield
        self.timings[title] = time.perf_counter() - started


def _wait(what: str, check: Callable[[], bool], *, timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def dataset_governance(hospital: Hospital, *, imaging: bool = False) -> dict[str, Any]:
    """The governance fields a demo hospital publishes for its dataset (purposes, budgets,
    GDPR Art. 30 record)."""
    title, description = (
        (
            f"Synthetic MR volumes with lesion masks ({hospital.organisation})",
            "MONAI-generated 3D volumes, every voxel labelled background or lesion.",
        )
        if imaging
        else (
            f"Breast-mass biopsies ({hospital.organisation})",
            "Wisconsin diagnostic features from fine-needle aspirates.",
        )
    )
    return {
        "id": hospital.dataset_id,
        "site_id": hospital.site_id,
        "title": title,
        "description": description,
        "allowed_purposes": ["diagnostic_research", "method_development"],
        "epsilon_budget": 20.0,
        "delta_budget": 1e-4,
        "max_epsilon_per_study": 8.0,
        "requires_encryption": True,
        "controller": f"{hospital.organisation} University Medical Centre",
        "data_categories": ["health data"],
        "legal_basis": "GDPR Art. 9(2)(j)",
        "retention": "10 years",
    }


def _contract(options: DemoOptions, hospitals: list[Hospital]) -> dict[str, Any]:
    task: dict[str, Any] = {}
    if options.imaging:
        title = "Lesion segmentation in MR volumes (synthetic)"
        description = "Federated 3D UNet segmentation across three hospitals, DP-SGD + CKKS."
        task = {"task": {"kind": "segmentation", "loss": "dice"}}
        model = {
            "name": "unet",
            "version": "1",
            "hyperparameters": {"base_channels": 8, "levels": 3, "res_units": 1},
        }
        training = {
            "local_epochs": 2,
            "batch_size": 32,
            "learning_rate": 0.02,
            "optimizer": "adam",
        }
    else:
        title = "Malignancy from fine-needle aspirate features"
        description = "Federated classifier across three hospitals, DP-SGD + CKKS."
        model = {"name": "tabular-mlp", "version": "1", "hyperparameters": {}}
        # Features in [-1, 1] from declared ranges (not z-scores): a larger step suits them.
        training = {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.5, "optimizer": "sgd"}
    return {
        "title": title,
        "description": description,
        "purpose": "diagnostic_research",
        "ethics_reference": "IRB-2026-0142",
        "datasets": [h.dataset_id for h in hospitals],
        **task,
        "model": model,
        "training": {"rounds": options.rounds, **training},
        "privacy": {"epsilon": options.epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "federation": {"min_sites": 3, "round_timeout_s": 300},
        # Seeded, bit-packed CKKS ciphertexts: about 7.6 bytes per parameter (docs/crypto.md).
        "encryption": {"enabled": True, "scheme": "ckks_seeded"},
    }


def run_demo(options: DemoOptions, console: Console, python_bin: Path) -> DemoResult:
    """Run the whole story; returns what happened (raises if a step fails)."""
    result = DemoResult()
    steps = _Steps(console, result.timings)
    stack = DemoStack(options.state_dir.resolve(), python_bin=python_bin)
    stack.prepare()
    hospitals = stack.hospitals
    for hospital in hospitals:
        hospital.dataset_prefix = "mr" if options.imaging else "bc"
    with stack.running():
        _start(stack, steps, console)
        admin = stack.client(
            stack.token("olga-operator", ["consortium_admin"], "Consortium office")
        )
        researcher = stack.client(stack.token("rita-researcher", ["researcher"], RESEARCHER_ORG))
        compliance = stack.client(
            stack.token("carla-compliance", ["compliance_officer"], "Consortium office")
        )
        _enrol(stack, steps, console, admin, options)
        study = _submit(steps, console, researcher, _contract(options, hospitals))
        study["feature_summary"] = researcher.request(
            "GET", f"/api/v1/datasets/{hospitals[0].dataset_id}"
        )["feature_summary"]
        result.study_id = study["id"]
        _approve(stack, steps, console, study)
        _exchange_keys(steps, console, hospitals, study["id"])
        _run_rounds(stack, steps, console, researcher, compliance, study, options, result)
        _witness(steps, console, researcher, result)
        model = _release(stack, steps, console, researcher, study, result)
        _compare(steps, console, study, model, result, options)
        _verify_and_report(stack, steps, console, compliance, hospitals, result)
        if options.keep_running:
            console.print(f"[bold]Still running[/]: API at {stack.api_url}; Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    _print_timings(console, result.timings)
    return result


def _start(stack: DemoStack, steps: _Steps, console: Console) -> None:
    with steps.step("1. Start the SuperLink (TLS, SuperNode authentication) and the server"):
        link = stack.start_superlink()
        stack.start_server()
    console.print(
        f"SuperLink: Fleet API at {link.address} (TLS, authenticated SuperNodes only); "
        f"Control at {link.control_endpoint().address} (mutual TLS: the server only)"
    )
    console.print(f"Consortium API at {stack.api_url} (SQLite, built-in token issuer)")


def _enrol(
    stack: DemoStack,
    steps: _Steps,
    console: Console,
    admin: ConsortiumClient,
    options: DemoOptions,
) -> None:
    with steps.step("2. Enrol three hospitals; each publishes its dataset (metadata only)"):
        head_key = stack.head_key()
        for hospital, cap in zip(stack.hospitals, options.site_epsilon_caps, strict=True):
            dataset: dict[str, Any] = {
                "id": hospital.dataset_id,
                "kind": "demo_synthetic_volumes" if options.imaging else "demo_breast_cancer",
                "site_index": hospital.index,
                "n_sites": len(stack.hospitals),
            }
            if options.imaging:
                dataset.update(image_size=options.image_size, n_samples=options.images_per_site)
            entry = stack.bring_up(
                hospital,
                admin,
                dataset=dataset,
                governance=dataset_governance(hospital, imaging=options.imaging),
                head_key=head_key,
                epsilon_cap=cap,
            )
            labels = entry["feature_summary"]["label_counts_train"]
            console.print(
                f"[green]✓[/] {hospital.organisation}: enrolled, SuperNode and agent up; "
                f"{hospital.dataset_id}: {entry['record_count']} records, training labels {labels}"
            )
    with steps.step(
        "2b. Each hospital's IT pins its peers' keys (fingerprints checked out of band)"
    ):
        fingerprints = stack.pin_peers()
    for site_id, fingerprint in fingerprints.items():
        console.print(
            f"[green]✓[/] {site_id} pinned by its peers: {format_fingerprint(fingerprint)}"
        )


def _submit(
    steps: _Steps, console: Console, researcher: ConsortiumClient, contract: dict[str, Any]
) -> dict[str, Any]:
    with steps.step("3. The researcher dry-runs the study, then submits it"):
        decision = researcher.request("POST", "/api/v1/policy/check", json=contract)
        verdict = "[green]ALLOW[/]" if decision["allowed"] else "[red]DENY[/]"
        console.print(f"Policy dry run: {verdict} (policy set {decision['policy_set_hash'][:12]}…)")
        for reason in decision["reasons"]:
            console.print(f"  - {escape('[' + reason['policy_id'] + ']')} {escape(reason['text'])}")
        study = researcher.submit_study(contract)
        if study["state"] != "awaiting_approvals":
            raise RuntimeError(f"the study was {study['state']}: {study.get('state_reason')}")
    console.print(f"Study {study['id']}  contract hash [bold]{study['contract_hash'][:16]}…[/]")
    return study


def _approve(stack: DemoStack, steps: _Steps, console: Console, study: dict[str, Any]) -> None:
    with steps.step("4. Each site checks the contract and its roster, then signs its approval"):
        for hospital in stack.hospitals:
            decision = stack.approve(
                hospital,
                study,
                reason="Approved automatically: the site policy allows it (demo).",
            )
            site_hash = (decision.site_policy_set_hash or "")[:12]
            console.print(
                f"[green]✓[/] {hospital.site_id}: hash and roster check out against its pins; "
                f"consortium and site policy ({site_hash}…) allow it: approved and signed "
                "automatically, as the demo does"
            )


def _exchange_keys(
    steps: _Steps, console: Console, hospitals: list[Hospital], study_id: str
) -> None:
    from site_node.federation.approvals import ApprovalStore

    with steps.step("5. The site agents exchange the study's CKKS key (sealed, via the server)"):

        def ready() -> bool:
            return all(ApprovalStore(h.state_dir).study_key(study_id) for h in hospitals)

        _wait("every site to hold the study key", ready, timeout=120)
    console.print(
        "[green]✓[/] every site holds the study key; the server relayed sealed bytes only"
    )


#: How the round table and the comparison name each task's metrics.
_METRIC_LABELS = {"accuracy": "accuracy", "auc": "AUC", "dice": "Dice", "hd95": "HD95 (voxels)"}


def _task_metrics(study: dict[str, Any]) -> tuple[str, ...]:
    """The metrics of the study's task (accuracy and AUC, or Dice and HD95)."""
    from concord_protocol.contract import StudyContract

    return StudyContract.model_validate(study["contract"]).task.metrics


def _run_rounds(
    stack: DemoStack,
    steps: _Steps,
    console: Console,
    researcher: ConsortiumClient,
    compliance: ConsortiumClient,
    study: dict[str, Any],
    options: DemoOptions,
    result: DemoResult,
) -> None:
    title = f"6. Federated training: {options.rounds} rounds of DP-SGD with encrypted updates"
    steps.console.rule(f"[bold cyan]{title}")
    started = time.perf_counter()
    update_bytes = _update_bytes(study)
    researcher.request("POST", f"/api/v1/studies/{study['id']}/run")
    seen = 0
    metrics = _task_metrics(study)
    table = Table(title="Rounds")
    for column in (
        "round",
        "sites",
        "samples",
        *(f"{_METRIC_LABELS[m]} (DP)" for m in metrics),
        "ε (max site)",
        "bytes",
        "audit head",
    ):
        table.add_column(column, justify="right")
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("waiting for round 1", total=options.rounds)
        while True:
            current = researcher.get_study(study["id"])
            head = compliance.request("GET", "/api/v1/audit/heads/latest")
            while seen < head["tree_size"]:
                entry = compliance.request("GET", f"/api/v1/audit/entries/{seen}")["entry"]
                seen += 1
                if entry["object"]["id"] != study["id"] or not entry["action"].startswith("round."):
                    continue
                record = RoundAuditDetails.model_validate(entry["details"]).record
                row: dict[str, Any] = {
                    "round": record.round_number,
                    "status": record.status,
                    "participants": record.participants,
                    "samples": sum(record.sample_counts.values()),
                    **{m: record.evaluation.get(m, float("nan")) for m in metrics},
                    "epsilon": max(
                        (e for e in record.epsilon.values() if e is not None), default=0.0
                    ),
                    "bytes": 2 * len(record.participants) * update_bytes,
                    "head": f"{head['tree_size']} {head['root_hash'][:10]}…",
                }
                result.rounds.append(row)
                table.add_row(
                    str(row["round"]),
                    str(len(row["participants"])),
                    str(row["samples"]),
                    *(f"{row[m]:.3f}" for m in metrics),
                    f"{row['epsilon']:.2f}",
                    f"{row['bytes'] / 1e6:.1f} MB",
                    row["head"],
                )
                progress.update(
                    task,
                    completed=len(result.rounds),
                    description=(
                        f"round {row['round']} done: {_METRIC_LABELS[metrics[0]]} "
                        f"{row[metrics[0]]:.3f}"
                    ),
                )
            if current["state"] in ("completed", "failed"):
                result.state = current["state"]
                break
            time.sleep(1.0)
    console.print(table)
    result.timings[title] = time.perf_counter() - started
    if result.state != "completed":
        raise RuntimeError(f"the study {result.state}: {current.get('state_reason')}")
    console.print(f"[green]✓[/] study completed: {current['state_reason']}")
    for dataset in study["contract"]["datasets"]:
        budget = researcher.request("GET", f"/api/v1/budgets/{dataset}")
        result.budgets[dataset] = budget
        console.print(
            f"  {dataset}: ε spent {budget['epsilon_spent']} of {budget['epsilon_cap']} "
            f"(reserved {budget['epsilon_reserved']}, remaining {budget['epsilon_remaining']})"
        )


def _update_bytes(study: dict[str, Any]) -> int:
    """Bytes of one encrypted update of this study's model (what each site sends)."""
    from concord_protocol.contract import StudyContract
    from consortium_server.federation.coordinator import model_size
    from site_node.crypto import CkksCodec, RoundInfo, generate_study_context

    contract = StudyContract.model_validate(study["contract"])
    n = model_size(contract, study["feature_summary"])
    codec = CkksCodec(generate_study_context())
    update = codec.encode(
        np.zeros(n), weight=1.0, info=RoundInfo(study["id"], study["contract_hash"], 1, n)
    )
    return sum(len(blob) for blob in update.to_bytes_list())


def _witness(
    steps: _Steps, console: Console, researcher: ConsortiumClient, result: DemoResult
) -> None:
    with steps.step("7. The sites witness the final audit head"):
        target = researcher.request("GET", "/api/v1/audit/heads/latest")["tree_size"]

        def witnessed() -> bool:
            head = researcher.request("GET", "/api/v1/audit/heads/latest")
            return bool(head["witnessed"]) and head["tree_size"] >= target

        _wait("a quorum of site cosignatures", witnessed, timeout=180)
        head = researcher.request("GET", "/api/v1/audit/heads/latest")
    result.witnessed = True
    sites = ", ".join(c["site_id"] for c in head["cosignatures"])
    console.print(
        f"[green]✓[/] head {head['tree_size']} ({head['root_hash'][:12]}…) signed by the server "
        f"and cosigned by {sites}"
    )


def _release(
    stack: DemoStack,
    steps: _Steps,
    console: Console,
    researcher: ConsortiumClient,
    study: dict[str, Any],
    result: DemoResult,
) -> tuple[bytes, dict[str, Any]]:
    with steps.step("8. Release gate: every site signs off the model it decrypted"):
        url = f"/api/v1/studies/{study['id']}/release"

        def signed_off() -> bool:
            status = researcher.request("GET", url)
            return not status["pending_sites"] and status["model_sha256"] is not None

        # Generous: each agent decrypts the aggregate and cosigns a head on its own pass; a
        # loaded machine (CI with other work) took over 120 s once.
        _wait("every site agent to sign off the final model", signed_off, timeout=300)
        status = researcher.request("GET", url)
        for signoff in status["signoffs"]:
            console.print(
                f"[green]✓[/] {signoff['site_id']}'s agent decrypted the final aggregate and "
                f"signed model {signoff['model_sha256'][:16]}…"
            )
        if not status["hashes_agree"]:
            raise RuntimeError("the sites' model hashes disagree: the model is not released")
        card = researcher.request("POST", f"/api/v1/studies/{study['id']}/release")
        model = researcher.download(f"/api/v1/studies/{study['id']}/release/model.safetensors")
    out = stack.state / "release"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(model)
    (out / "model-card.json").write_text(json.dumps(card, indent=2))
    result.files["model"] = out / "model.safetensors"
    result.files["model card"] = out / "model-card.json"
    result.released = True
    console.print(
        f"[green]✓[/] released; model card: contract {card['contract_hash'][:12]}…, "
        f"sites {', '.join(s['site_id'] for s in card['signoffs'])}"
        if "signoffs" in card
        else "[green]✓[/] released"
    )
    return model, card


def _compare(
    steps: _Steps,
    console: Console,
    study: dict[str, Any],
    released: tuple[bytes, dict[str, Any]],
    result: DemoResult,
    options: DemoOptions,
) -> None:
    from concord_protocol.contract import StudyContract
    from site_node.data.demo import (
        breast_cancer_holdout,
        breast_cancer_site,
        synthetic_volumes_holdout,
        synthetic_volumes_site,
    )
    from site_node.training import evaluate
    from site_node.training.baseline import centralised_baseline
    from site_node.training.released import load_released_model

    with steps.step("9. Results next to a centralised, non-private baseline"):
        contract = StudyContract.model_validate(study["contract"])
        if options.imaging:
            size, n = options.image_size, options.images_per_site
            holdout = synthetic_volumes_holdout(image_size=size)
            pooled = [synthetic_volumes_site(i, n_samples=n, image_size=size)[0] for i in range(3)]
        else:
            holdout = breast_cancer_holdout()
            pooled = [breast_cancer_site(i)[0] for i in range(3)]
        # The researcher's one call: the file checked against its card and the contract
        # submitted, the catalogue network built from it, the signed weights loaded.
        file, card = released
        model = load_released_model(file, card=card, contract=contract)
        federated = evaluate(model, holdout)
        baseline = centralised_baseline(
            pooled, holdout, contract.model, contract.training, task=contract.task
        )
    metrics = contract.task.metrics
    result.federated = federated.metrics(contract.task)
    result.baseline = baseline.metrics.metrics(contract.task)
    unit = "volumes" if options.imaging else "patients"
    table = Table(title=f"Held-out test set ({federated.num_samples} {unit})")
    for column in ("model", "privacy", *(_METRIC_LABELS[m] for m in metrics)):
        table.add_column(column)
    table.add_row(
        "federated (3 hospitals)",
        _dp_cost(contract, result),
        *(f"{result.federated[m]:.3f}" for m in metrics),
    )
    table.add_row(
        "centralised (pooled data)",
        f"none: data leaves the hospitals (lr {baseline.learning_rate:g})",
        *(f"{result.baseline[m]:.3f}" for m in metrics),
    )
    console.print(table)


def _dp_cost(contract: StudyContract, result: DemoResult) -> str:
    """The federated row's privacy column: what the ledger charged (the largest site's
    cumulative epsilon), against the target, and what of it the evaluation releases took."""
    charged = max((float(r["epsilon"]) for r in result.rounds), default=0.0)
    noise = contract.evaluation_noise()
    if noise is None:
        releases = "no evaluation released"
    elif contract.evaluation.noise_multiplier is None:
        releases = (
            f"incl. {contract.training.rounds} noisy evaluation release(s) (noise {noise:.3g}, "
            f"alone ≤ ε {contract.evaluation.epsilon_share * contract.privacy.epsilon:.2g})"
        )
    else:
        releases = (
            f"incl. {contract.training.rounds} noisy evaluation release(s) (noise {noise:.3g})"
        )
    return (
        f"DP ε={charged:.2f} charged of {contract.privacy.epsilon:g}, "
        f"δ={contract.privacy.delta:g}, {releases}; CKKS"
    )


def _verify_and_report(
    stack: DemoStack,
    steps: _Steps,
    console: Console,
    compliance: ConsortiumClient,
    hospitals: list[Hospital],
    result: DemoResult,
) -> None:
    from concord_protocol.audit.verify import verify_export
    from consortium_server.audit.signer import TreeHeadSigner

    with steps.step("10. Audit verification and the compliance report"):
        compliance.request("GET", "/api/v1/audit/heads/latest")
        export = compliance.audit_export()
        key = TreeHeadSigner.load_or_create(stack.settings.audit_head_key_file()).public_key_b64
        # The sites' keys as each hospital's IT gives them, not the server's directory.
        sites = {h.site_id: h.keys.signing_public_b64 for h in hospitals if h.keys is not None}
        report = verify_export(export, trusted_server_key=key, trusted_site_keys=sites)
        out = stack.state / "reports"
        out.mkdir(parents=True, exist_ok=True)
        html = compliance.download("/reports/compliance")
        pdf = compliance.download("/reports/compliance", params={"format": "pdf"})
        (out / "compliance.html").write_bytes(html)
        (out / "compliance.pdf").write_bytes(pdf)
    result.audit_ok = report.ok
    result.audit_summary = report.summary()
    result.files["report (HTML)"] = out / "compliance.html"
    result.files["report (PDF)"] = out / "compliance.pdf"
    mark = "[green]✓[/]" if report.ok else "[red]✗[/]"
    console.print(f"{mark} audit log: {report.summary()}")
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def _print_timings(console: Console, timings: dict[str, float]) -> None:
    table = Table(title="Where the time went")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in timings.items():
        table.add_row(step, f"{seconds:.1f}")
    table.add_row("[bold]total", f"[bold]{sum(timings.values()):.1f}")
    console.print(table)
