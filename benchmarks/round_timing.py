"""Per-round wall time of a study on real Flower processes, split into training and overhead.

Starts a SuperLink (TLS, SuperNode auth) and three SuperNodes on loopback, runs a DP+HE
breast-cancer study, and prints per-round figures from the ServerApp's round records. With
no consortium server to report to, the study runs as the comparison bundle's ``ckks``
method (``fedavg`` with ``--plain``): Concord's own round loop and strategy, unchanged, with
the records written to disk (:mod:`benchmarks.apps.compare_server`); every site allows that
bundle with its ClientApp, which serves these methods with Concord's own handlers.

* wall: the whole round (train phase + blind sum + evaluate phase);
* train phase: from sending ``train`` to the last reply;
* site work: the slowest site's training + encryption (reported by the sites);
* orchestration: train phase minus site work (Flower scheduling, a fresh ClientApp process
  per message importing torch, object transfer);
* aggregate: the server's blind sum; evaluate: the evaluate phase.

Usage: ``.venv/bin/python benchmarks/round_timing.py [--rounds 3] [--plain]``. A script that
prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.apps.compare_server import (
    CKKS,
    CLIENTAPP_REF,
    FEDAVG,
    SERVERAPP_REF,
    compare_run_config,
    write_compare_app,
)
from benchmarks.apps.runs import start_compare_run, wait_for_outcome
from concord_demo.stack import start_registered_supernode
from concord_protocol.bundle import bundle_hash
from concord_protocol.processes import ManagedProcess
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.processes import start_superlink
from site_node.federation.approvals import ApprovalStore
from site_node.training import build_model, num_parameters
from tests.support.flower import (
    approve_everywhere,
    breast_cancer_contract,
    free_port,
    make_site,
    make_tls,
)


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="encryption off")
    args = parser.parse_args()
    contract = breast_cancer_contract(rounds=args.rounds, encryption=not args.plain)
    with tempfile.TemporaryDirectory(prefix="concord-bench-") as tmp:
        root = Path(tmp)
        tls = make_tls(root / "tls")
        t0 = time.perf_counter()
        # The SuperLink runs no ServerApp but Concord's unless told: allow the comparison's.
        compare_hash = bundle_hash(write_compare_app(root / "compare-app"))
        link = start_superlink(
            root / "superlink",
            port=free_port(),
            tls=tls,
            serverapp_bundles={compare_hash: SERVERAPP_REF},
        )
        nodes: list[ManagedProcess] = []
        try:
            sites = [make_site(root / "sites", i) for i in range(3)]
            public = approve_everywhere(sites, "bench", contract)
            app_dir = write_compare_app(root / "compare-app")
            fab_hash = bundle_hash(app_dir)
            for site in sites:
                ApprovalStore(site.state_dir).allow_fab(fab_hash, clientapp=CLIENTAPP_REF)
                nodes.append(
                    start_registered_supernode(
                        link,
                        tls.ca_cert,
                        site_id=site.site_id,
                        state_dir=site.state_dir,
                        datasets_file=site.datasets_file,
                    )
                )
            startup = time.perf_counter() - t0
            n = num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))
            plan = RunPlan(
                study_id="bench",
                contract=contract,
                contract_hash=contract.contract_hash(),
                num_params=n,
                sites=tuple(s.site_id for s in sites),
                public_context=public,
            )
            records = root / "records"
            config = compare_run_config(plan, FEDAVG if args.plain else CKKS, records_dir=records)
            limit = plan.rounds * (2 * plan.round_timeout_s + 60) + plan.node_wait_s
            t0 = time.perf_counter()
            start_compare_run(link, app_dir, config)
            outcome = wait_for_outcome(records, timeout=limit, link=link)
            total = time.perf_counter() - t0
        finally:
            for node in nodes:
                node.stop()
            link.stop()
    print(f"encryption: {'off' if args.plain else 'CKKS'}; params: {n}; status: {outcome.status}")
    print(f"federation start-up (SuperLink + 3 SuperNodes, registration): {startup:.1f} s")
    print(f"study end to end (flwr run .. outcome): {total:.1f} s")
    header = ("round", "wall", "train phase", "site work", "orchestration", "aggregate", "evaluate")
    print("  ".join(f"{h:>13}" for h in header))
    for r in outcome.rounds:
        busiest = r.train_wall_seconds - r.orchestration_seconds
        row = (
            r.round_number,
            r.wall_seconds,
            r.train_wall_seconds,
            busiest,
            r.orchestration_seconds,
            r.aggregate_seconds,
            r.evaluate_wall_seconds,
        )
        print(f"{row[0]:>13}" + "".join(f"  {v:>12.2f}s" for v in row[1:]))
    if outcome.rounds:
        share = statistics.mean(
            r.orchestration_seconds / r.train_wall_seconds
            for r in outcome.rounds
            if r.train_wall_seconds > 0
        )
        print(f"orchestration share of the train phase: {share:.0%}")


if __name__ == "__main__":
    main()
