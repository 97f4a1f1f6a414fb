"""Benchmark: server-side aggregation of one round with 10, 50 and 100 sites.

Each simulated site encrypts a weighted update of the demo's model (tabular-mlp) with the
study key; the server screens every reply and sums them blindly, as the ServerApp's
strategy does (``BlindAggregationStrategy``), with the public context only. Prints the
aggregation time and the memory the replies and the sum take, per number of sites.

    .venv/bin/python benchmarks/scale.py            # 10, 50, 100 sites
    .venv/bin/python benchmarks/scale.py --sites 10 20

The sites here are in-process encoders, not Flower's simulation engine: ``flwr[simulation]``
(Ray) is not installed here, and the engine adds no aggregation work; what grows with the
number of sites is the server's screening and summing, measured below.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from consortium_server.federation.strategy import BlindAggregationStrategy, RunPlan
from consortium_server.studies.contract import ModelSpec, StudyContract
from site_node.crypto import CkksCodec, generate_study_context, public_context
from site_node.training import build_model, num_parameters

console = Console()


def _plan(n_sites: int, secret: bytes) -> RunPlan:
    contract = StudyContract.model_validate(
        {
            "title": "Scale benchmark",
            "purpose": "method_development",
            "ethics_reference": "IRB-2026-0001",
            "datasets": [f"d{i}" for i in range(n_sites)],
            "model": {"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
            "training": {"rounds": 1},
            "privacy": {"epsilon": 3.0, "delta": 1e-5},
        }
    )
    n = num_parameters(
        build_model(ModelSpec(name="tabular-mlp", version="1"), input_shape=(30,), num_classes=2)
    )
    return RunPlan(
        study_id="scale",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=n,
        sites=tuple(f"site-{i:03d}" for i in range(n_sites)),
        public_context=public_context(secret),
    )


def measure(n_sites: int, secret: bytes) -> dict[str, float]:
    """Encrypt ``n_sites`` updates, then time and size the server's blind aggregation."""
    plan = _plan(n_sites, secret)
    strategy = BlindAggregationStrategy(plan)
    codec = CkksCodec(secret, max_sites=max(32, n_sites))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    updates = {
        site: codec.encode(
            rng.normal(scale=0.1, size=plan.num_params),
            weight=float(rng.integers(50, 200)),
            info=strategy.round_info(1),
        ).to_bytes_list()
        for site in plan.sites
    }
    encrypt_s = time.perf_counter() - started
    reply_bytes = sum(len(b) for blobs in updates.values() for b in blobs)
    started = time.perf_counter()
    result = strategy._sum(1, updates)
    aggregate_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    assert sorted(result.accepted) == sorted(plan.sites), result.rejected
    return {
        "sites": n_sites,
        "params": plan.num_params,
        "encrypt_per_site_ms": encrypt_s / n_sites * 1000,
        "aggregate_ms": aggregate_s * 1000,
        "reply_mb": reply_bytes / 1e6,
        "peak_mb": peak / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    args = parser.parse_args()
    secret = generate_study_context()
    table = Table(title="One round's blind aggregation at the server (tabular-mlp, CKKS)")
    for column in (
        "sites",
        "parameters",
        "encrypt / site ms",
        "aggregate ms",
        "replies MB",
        "process peak RSS MB",
    ):
        table.add_column(column, justify="right")
    for n in args.sites:
        row = measure(n, secret)
        table.add_row(
            str(n),
            str(int(row["params"])),
            f"{row['encrypt_per_site_ms']:.1f}",
            f"{row['aggregate_ms']:.0f}",
            f"{row['reply_mb']:.1f}",
            f"{row['peak_mb']:.1f}",
        )
    console.print(table)
    console.print(
        "Replies are held in memory as the ServerApp receives them. Peak RSS is the whole "
        "process's high-water mark so far (it only grows from row to row)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
