"""Benchmark: what round integrity costs (signed contributions, manifests, integrity tags).

For each model size, with the default CKKS parameters and three sites (``--sites``):

* **bytes**: one site's encrypted update with and without the tag slots (4 per ciphertext
  of 4096 slots), its signed contribution, and the aggregate's manifest;
* **time at a site**: encrypting with tags vs without; signing the contribution; checking
  the manifest (each site's signature with the pinned key); decrypting the aggregate and
  checking its tags vs decrypting it unchecked;
* **time at the server**: verifying each reply's signature.

    .venv/bin/python benchmarks/round_integrity.py --quick   # 0.1M parameters
    .venv/bin/python benchmarks/round_integrity.py           # 0.1M and 1M
    .venv/bin/python benchmarks/round_integrity.py --params 7000000

Figures are the median of ``--repeat`` runs (default 3); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from concord_protocol.contributions import AggregateManifest, Contribution, sign_contribution
from concord_protocol.wire.format import CKKS_TAG_SLOTS, RoundInfo
from consortium_server.federation.blind_sum import blind_sum
from site_node.crypto import CkksCodec, expected_chunks, generate_study_context, public_context
from site_node.crypto.codecs import ListedSum
from site_node.crypto.sealing import SiteKeyPair

STUDY, HASH, ATTEMPT = "bench", "0" * 64, "0" * 32


@dataclass
class Row:
    params: int
    update_bytes: int
    tagged_bytes: int
    contribution_bytes: int
    manifest_bytes: int
    encrypt_s: float
    encrypt_tagged_s: float
    sign_ms: float
    verify_manifest_ms: float
    decrypt_s: float
    decrypt_checked_s: float


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def measure(num_params: int, sites: int, repeat: int, secret: bytes, public: bytes) -> Row:
    rng = np.random.default_rng(0)
    plain_codec = CkksCodec(secret)
    tagged_codec = CkksCodec(secret, tag_slots=CKKS_TAG_SLOTS)
    ids = [f"site-{i:02d}" for i in range(sites)]
    keys = {s: SiteKeyPair.generate() for s in ids}
    vectors = {s: rng.normal(0, 0.05, num_params) for s in ids}
    info0 = RoundInfo(STUDY, HASH, 1, num_params)
    info = RoundInfo(STUDY, HASH, 1, num_params, CKKS_TAG_SLOTS)

    encrypt_s, plain = _median(
        lambda: plain_codec.encode(vectors[ids[0]], weight=100.0, info=info0), repeat
    )
    encrypt_tagged_s, _ = _median(
        lambda: tagged_codec.encode(vectors[ids[0]], weight=100.0, info=info, site_id=ids[0]),
        repeat,
    )
    updates = {s: tagged_codec.encode(vectors[s], weight=100.0, info=info, site_id=s) for s in ids}
    untagged = {s: plain_codec.encode(vectors[s], weight=100.0, info=info0) for s in ids}

    def sign(site: str) -> Any:
        contribution = Contribution(
            study_id=STUDY,
            contract_hash=HASH,
            attempt=ATTEMPT,
            round_number=1,
            site_id=site,
            update_digest=updates[site].digest,
            weight=100,
        )
        return sign_contribution(contribution, keys[site].signing_key)

    sign_s, _ = _median(lambda: sign(ids[0]), max(repeat, 20))
    signed = [sign(s) for s in ids]
    manifest = AggregateManifest.of(signed, study_id=STUDY, contract_hash=HASH, round_number=1)
    pinned = {s: keys[s].signing_public_b64 for s in ids}
    verify_s, _ = _median(
        lambda: manifest.verify(
            study_id=STUDY,
            contract_hash=HASH,
            round_number=1,
            keys=pinned,
            min_sites=min(3, sites),
            total_weight=100.0 * sites,
        ),
        max(repeat, 20),
    )

    chunk_size = tagged_codec.chunk_size
    tagged_sum = blind_sum(
        public,
        {s: u.to_bytes_list() for s, u in updates.items()},
        expected=info,
        expected_chunks=expected_chunks(info.num_values(chunk_size), chunk_size),
        max_chunk_bytes=1 << 22,
        min_sites=min(3, sites),
    ).aggregate
    plain_sum = blind_sum(
        public,
        {s: u.to_bytes_list() for s, u in untagged.items()},
        expected=info0,
        expected_chunks=expected_chunks(num_params, chunk_size),
        max_chunk_bytes=1 << 22,
        min_sites=min(3, sites),
    ).aggregate
    decrypt_s, _ = _median(
        lambda: plain_codec.decrypt_aggregate(
            plain_sum.chunks, num_params=num_params, total_weight=100.0 * sites
        ),
        repeat,
    )
    decrypt_checked_s, out = _median(
        lambda: tagged_codec.decrypt_aggregate(
            tagged_sum.chunks,
            num_params=num_params,
            total_weight=100.0 * sites,
            listed=ListedSum(info, tuple(ids)),
        ),
        repeat,
    )
    expected = np.mean([vectors[s] for s in ids], axis=0)
    assert float(np.max(np.abs(out - expected))) < 1e-6, "the checked aggregate is wrong"
    return Row(
        params=num_params,
        update_bytes=plain.nbytes,
        tagged_bytes=updates[ids[0]].nbytes,
        contribution_bytes=len(signed[0].to_json()),
        manifest_bytes=len(manifest.to_json()),
        encrypt_s=encrypt_s,
        encrypt_tagged_s=encrypt_tagged_s,
        sign_ms=sign_s * 1e3,
        verify_manifest_ms=verify_s * 1e3,
        decrypt_s=decrypt_s,
        decrypt_checked_s=decrypt_checked_s,
    )


def _pct(new: float, old: float) -> str:
    return f"+{100 * (new - old) / old:.2f}%" if old else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.1M parameters only")
    parser.add_argument("--params", type=int, nargs="+", help="model sizes to measure")
    parser.add_argument("--sites", type=int, default=3, help="sites in the aggregate")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args(argv)
    sizes = args.params or ([100_000] if args.quick else [100_000, 1_000_000])
    console = Console()
    secret = generate_study_context()
    public = public_context(secret)
    rows = []
    for size in sizes:
        with console.status(f"measuring {size:,} parameters, {args.sites} sites"):
            rows.append(measure(size, args.sites, args.repeat, secret, public))
    sizes_table = Table(title=f"Round integrity: bytes per round ({args.sites} sites)")
    for col in ("parameters", "update", "with tags", "extra", "contribution", "manifest"):
        sizes_table.add_column(col, justify="right")
    for r in rows:
        sizes_table.add_row(
            f"{r.params:,}",
            f"{r.update_bytes / 1e6:.2f} MB",
            f"{r.tagged_bytes / 1e6:.2f} MB",
            _pct(r.tagged_bytes, r.update_bytes),
            f"{r.contribution_bytes} B",
            f"{r.manifest_bytes} B",
        )
    console.print(sizes_table)
    times = Table(title="Round integrity: time per round and site")
    for col in (
        "parameters",
        "encrypt",
        "with tags",
        "sign",
        "check manifest",
        "decrypt",
        "decrypt + check tags",
    ):
        times.add_column(col, justify="right")
    for r in rows:
        times.add_row(
            f"{r.params:,}",
            f"{r.encrypt_s:.2f} s",
            f"{r.encrypt_tagged_s:.2f} s ({_pct(r.encrypt_tagged_s, r.encrypt_s)})",
            f"{r.sign_ms:.2f} ms",
            f"{r.verify_manifest_ms:.2f} ms",
            f"{r.decrypt_s:.2f} s",
            f"{r.decrypt_checked_s:.2f} s ({_pct(r.decrypt_checked_s, r.decrypt_s)})",
        )
    console.print(times)


if __name__ == "__main__":
    main()
