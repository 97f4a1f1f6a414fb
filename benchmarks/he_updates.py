"""Benchmark: CKKS-encrypted model updates at the default study parameters.

For each model size: bytes per parameter on the wire (vs float32), encrypt, blind
aggregation (3 sites, public context only) and decrypt throughput in parameters per
second, peak RSS of the process, and the max absolute error of the decrypted FedAvg
against plaintext FedAvg.

    .venv/bin/python benchmarks/he_updates.py --quick    # 0.1M parameters
    .venv/bin/python benchmarks/he_updates.py            # 0.1M and 1M
    .venv/bin/python benchmarks/he_updates.py --full     # adds 7M (GBs of RAM, minutes)

Peak RSS is the high-water mark of the whole process so far (it only grows across rows).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from consortium_server.federation.blind_sum import blind_sum
from site_node.crypto import (
    CkksCodec,
    CkksParams,
    RoundInfo,
    expected_chunks,
    generate_study_context,
    public_context,
)

SITES = 3


@dataclass
class Row:
    params: int
    bytes_per_param: float
    encrypt_per_s: float
    aggregate_per_s: float
    decrypt_per_s: float
    peak_rss_mb: float
    max_error: float


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(num_params: int, secret: bytes, public: bytes) -> Row:
    rng = np.random.default_rng(0)
    codec = CkksCodec(secret)
    info = RoundInfo("bench", "0" * 64, 1, num_params)
    weights = [float(w) for w in rng.integers(100, 5000, SITES)]
    vectors = [rng.normal(0, 0.05, num_params).astype(np.float32) for _ in range(SITES)]

    start = time.perf_counter()
    replies = {
        f"site-{i}": codec.encode(v, weight=w, info=info).to_bytes_list()
        for i, (v, w) in enumerate(zip(vectors, weights, strict=True))
    }
    encrypt_s = (time.perf_counter() - start) / SITES
    wire_bytes = sum(len(b) for b in replies["site-0"])

    start = time.perf_counter()
    result = blind_sum(
        public,
        replies,
        expected=info,
        expected_chunks=expected_chunks(num_params, codec.chunk_size),
        max_chunk_bytes=max(len(c) for c in replies["site-0"][1:]) + 1024,
    )
    aggregate_s = time.perf_counter() - start
    del replies

    start = time.perf_counter()
    got = codec.decrypt_aggregate(result.chunks, num_params=num_params, total_weight=sum(weights))
    decrypt_s = time.perf_counter() - start
    expected = sum(w * v.astype(np.float64) for v, w in zip(vectors, weights, strict=True))
    error = float(np.max(np.abs(got - expected / sum(weights))))
    return Row(
        params=num_params,
        bytes_per_param=wire_bytes / num_params,
        encrypt_per_s=num_params / encrypt_s,
        aggregate_per_s=num_params / aggregate_s,
        decrypt_per_s=num_params / decrypt_s,
        peak_rss_mb=_peak_rss_mb(),
        max_error=error,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="0.1M parameters only")
    size.add_argument("--full", action="store_true", help="add 7M parameters")
    args = parser.parse_args(argv)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    if args.full:
        sizes.append(7_000_000)

    params = CkksParams()
    secret = generate_study_context(params)
    public = public_context(secret)
    console = Console(width=max(Console().width, 150))
    table = Table(
        title=(
            f"CKKS updates: N={params.poly_modulus_degree}, "
            f"primes {list(params.coeff_mod_bit_sizes)}, scale 2^{params.global_scale_bits}, "
            f"{params.encryption_type}, {SITES} sites"
        )
    )
    for column in (
        "params",
        "B/param",
        "x float32",
        "MB/site (float32 MB)",
        "encrypt params/s",
        "aggregate params/s",
        "decrypt params/s",
        "peak RSS MB",
        "max |err| vs FedAvg",
    ):
        table.add_column(column, justify="right")
    for n in sizes:
        row = measure(n, secret, public)
        table.add_row(
            f"{n / 1e6:g}M",
            f"{row.bytes_per_param:.1f}",
            f"{row.bytes_per_param / 4:.1f}",
            f"{row.bytes_per_param * n / 1e6:.1f} ({4 * n / 1e6:.1f})",
            f"{row.encrypt_per_s:,.0f}",
            f"{row.aggregate_per_s:,.0f}",
            f"{row.decrypt_per_s:,.0f}",
            f"{row.peak_rss_mb:,.0f}",
            f"{row.max_error:.1e}",
        )
    console.print(table)
    console.print(
        f"secret context {len(secret):,} B, public context {len(public):,} B; "
        "aggregate = validate + sum 3 replies with the public context"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
