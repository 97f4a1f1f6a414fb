"""Benchmark: CKKS-encrypted model updates at the default study parameters, per scheme.

For each encryption scheme (``ckks``: TenSEAL vectors; ``ckks_seeded``: seeded, bit-packed
ciphertexts, two values per slot) and model size: bytes per parameter of one site's upload
and of the aggregate the server sends back (vs float32's 4), encrypt, blind aggregation
(3 sites, public context only) and decrypt throughput in parameters per second, peak RSS of
the process, and the max absolute error of the decrypted FedAvg against plaintext FedAvg.

    .venv/bin/python benchmarks/he_updates.py --quick    # 0.1M parameters
    .venv/bin/python benchmarks/he_updates.py            # 0.1M and 1M
    .venv/bin/python benchmarks/he_updates.py --full     # adds 7M (GBs of RAM, minutes)
    .venv/bin/python benchmarks/he_updates.py --tags     # with the integrity tags a study uses

Byte counts are those of the wire format (header and chunks), not estimates. Peak RSS is the
high-water mark of the whole process so far (it only grows across rows).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass
from typing import get_args

import numpy as np
from rich.console import Console
from rich.table import Table

from concord_protocol.wire.format import CKKS_TAG_SLOTS, EncryptedScheme
from consortium_server.federation.blind_sum import blind_sum
from site_node.crypto import (
    CkksCodec,
    CkksParams,
    RoundInfo,
    expected_chunks,
    generate_study_context,
    public_context,
)
from site_node.crypto.codecs import ListedSum

SITES = 3


@dataclass
class Row:
    scheme: str
    params: int
    bytes_per_param: float
    aggregate_bytes_per_param: float
    encrypt_per_s: float
    aggregate_per_s: float
    decrypt_per_s: float
    peak_rss_mb: float
    max_error: float


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(
    num_params: int, secret: bytes, public: bytes, *, scheme: EncryptedScheme, tags: bool
) -> Row:
    rng = np.random.default_rng(0)
    tag_slots = CKKS_TAG_SLOTS if tags else 0
    codec = CkksCodec(secret, tag_slots=tag_slots, scheme=scheme)
    info = RoundInfo("bench", "0" * 64, 1, num_params, tag_slots)
    sites = [f"site-{i}" for i in range(SITES)]
    weights = [float(w) for w in rng.integers(100, 5000, SITES)]
    vectors = [rng.normal(0, 0.05, num_params).astype(np.float32) for _ in range(SITES)]

    start = time.perf_counter()
    replies = {
        site: codec.encode(v, weight=w, info=info, site_id=site).to_bytes_list()
        for site, v, w in zip(sites, vectors, weights, strict=True)
    }
    encrypt_s = (time.perf_counter() - start) / SITES
    wire_bytes = sum(len(b) for b in replies["site-0"])

    start = time.perf_counter()
    result = blind_sum(
        public,
        replies,
        expected=info,
        expected_chunks=expected_chunks(info.num_values(codec.chunk_size), codec.chunk_size),
        max_chunk_bytes=max(len(c) for c in replies["site-0"][1:]) + 1024,
        scheme=scheme,
    )
    aggregate_s = time.perf_counter() - start
    aggregate_bytes = sum(len(b) for b in result.to_bytes_list())
    del replies

    start = time.perf_counter()
    got = codec.decrypt_aggregate(
        result.chunks,
        num_params=num_params,
        total_weight=sum(weights),
        listed=ListedSum(info, tuple(sites)) if tags else None,
    )
    decrypt_s = time.perf_counter() - start
    expected = sum(w * v.astype(np.float64) for v, w in zip(vectors, weights, strict=True))
    error = float(np.max(np.abs(got - expected / sum(weights))))
    return Row(
        scheme=scheme,
        params=num_params,
        bytes_per_param=wire_bytes / num_params,
        aggregate_bytes_per_param=aggregate_bytes / num_params,
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
    parser.add_argument(
        "--scheme",
        choices=get_args(EncryptedScheme),
        action="append",
        help="encryption scheme(s) to measure (default: both)",
    )
    parser.add_argument(
        "--tags", action="store_true", help=f"{CKKS_TAG_SLOTS} integrity tags per chunk"
    )
    args = parser.parse_args(argv)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    if args.full:
        sizes.append(7_000_000)
    schemes: list[EncryptedScheme] = args.scheme or list(get_args(EncryptedScheme))

    params = CkksParams()
    secret = generate_study_context(params)
    public = public_context(secret)
    console = Console(width=max(Console().width, 170))
    table = Table(
        title=(
            f"CKKS updates: N={params.poly_modulus_degree}, "
            f"primes {list(params.coeff_mod_bit_sizes)}, scale 2^{params.global_scale_bits}, "
            f"{params.encryption_type}, {SITES} sites, "
            f"{'with' if args.tags else 'no'} integrity tags"
        )
    )
    for column in (
        "scheme",
        "params",
        "upload B/param",
        "x float32",
        "aggregate B/param",
        "MB/site (float32 MB)",
        "encrypt params/s",
        "aggregate params/s",
        "decrypt params/s",
        "peak RSS MB",
        "max |err| vs FedAvg",
    ):
        table.add_column(column, justify="right")
    for scheme in schemes:
        for n in sizes:
            row = measure(n, secret, public, scheme=scheme, tags=args.tags)
            table.add_row(
                row.scheme,
                f"{n / 1e6:g}M",
                f"{row.bytes_per_param:.2f}",
                f"{row.bytes_per_param / 4:.2f}",
                f"{row.aggregate_bytes_per_param:.2f}",
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
        "aggregate = validate + sum 3 replies with the public context (ckks_seeded: numpy, "
        "no SEAL); throughputs per core"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
