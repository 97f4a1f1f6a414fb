"""Benchmark: peak memory of each encrypted-update stage at real model sizes, and the
server's aggregation throughput.

Each stage runs in a fresh process (so one stage's peak is not another's), with its inputs
prepared and its process's peak RSS reset just before it starts (``/proc/self/clear_refs``):
the figure is what the stage itself adds on top of holding its inputs.

* **site encrypt**: the site's float32 update (N parameters) to its seeded upload;
* **server sum**: ``SITES`` sites' uploads (already held, as the ServerApp holds Flower's
  messages) to the aggregate, with the public context only;
* **site decrypt**: the aggregate to the FedAvg vector (float64), with the study key.

Peaks are shown in MB and as a multiple of one upload's bytes (the "update" a stage
handles). The throughput row sums ``--throughput-sites`` uploads of 1M parameters.

    .venv/bin/python benchmarks/he_memory.py --quick     # 1M parameters (seconds)
    .venv/bin/python benchmarks/he_memory.py             # 7M and 30M (minutes, ~4 GB)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from concord_protocol.wire.format import EncryptedScheme

SITES = 3
SCHEME: EncryptedScheme = "ckks_seeded"


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM) since the last reset, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> float:
    """Reset the peak RSS to the current RSS; returns the current RSS (MB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_mb()


def _save(path: Path, blobs: list[bytes]) -> None:
    """Byte strings, each after its 8-byte length (the stages hand each other chunks)."""
    path.write_bytes(b"".join(struct.pack("<Q", len(b)) + b for b in blobs))


def _load(path: Path) -> list[bytes]:
    data, blobs, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (size,) = struct.unpack_from("<Q", data, pos)
        blobs.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + size
    return blobs


def _codec(secret: bytes) -> Any:
    from site_node.crypto import CkksCodec

    return CkksCodec(secret, tag_slots=0, scheme=SCHEME)


def _info(num_params: int) -> Any:
    from site_node.crypto import RoundInfo

    return RoundInfo("bench", "0" * 64, 1, num_params, 0)


def _stage_encrypt(work: Path, num_params: int, site: int) -> dict[str, float]:
    secret = (work / "secret").read_bytes()
    codec = _codec(secret)
    vector = np.random.default_rng(site).normal(0, 0.05, num_params).astype(np.float32)
    base = _reset_peak()
    start = time.perf_counter()
    blobs = codec.encode(
        vector, weight=100.0 + site, info=_info(num_params), site_id=f"site-{site}"
    ).to_bytes_list()
    seconds = time.perf_counter() - start
    peak = _hwm_mb() - base
    _save(work / f"upload-{site}", blobs)
    return {"peak_mb": peak, "seconds": seconds, "bytes": float(sum(len(b) for b in blobs))}


def _stage_sum(work: Path, num_params: int, sites: int) -> dict[str, float]:
    from consortium_server.federation.blind_sum import blind_sum
    from site_node.crypto import expected_chunks

    public = (work / "public").read_bytes()
    codec = _codec((work / "secret").read_bytes())
    updates = {f"site-{i}": _load(work / f"upload-{i}") for i in range(sites)}
    info = _info(num_params)
    base = _reset_peak()
    start = time.perf_counter()
    result = blind_sum(
        public,
        updates,
        expected=info,
        expected_chunks=expected_chunks(info.num_values(codec.chunk_size), codec.chunk_size),
        max_chunk_bytes=max(len(c) for c in updates["site-0"][1:]) + 1024,
        scheme=SCHEME,
    )
    seconds = time.perf_counter() - start
    peak = _hwm_mb() - base
    if len(result.chunks) == 0:
        raise RuntimeError("empty aggregate")
    if sites == SITES:
        _save(work / "aggregate", list(result.chunks))
    return {"peak_mb": peak, "seconds": seconds, "bytes": float(sum(map(len, result.chunks)))}


def _stage_decrypt(work: Path, num_params: int) -> dict[str, float]:
    codec = _codec((work / "secret").read_bytes())
    chunks = _load(work / "aggregate")
    base = _reset_peak()
    start = time.perf_counter()
    vector = codec.decrypt_aggregate(
        chunks, num_params=num_params, total_weight=float(sum(100 + i for i in range(SITES)))
    )
    seconds = time.perf_counter() - start
    peak = _hwm_mb() - base
    if vector.shape != (num_params,):
        raise RuntimeError("wrong aggregate length")
    return {"peak_mb": peak, "seconds": seconds, "bytes": float(vector.nbytes)}


def _in_fresh_process(target: Callable[..., dict[str, float]], *args: object) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters only")
    parser.add_argument("--sizes", type=float, nargs="*", help="sizes in millions")
    parser.add_argument("--throughput-sites", type=int, default=10)
    args = parser.parse_args(argv)
    sizes = [int(s * 1e6) for s in (args.sizes or ([1] if args.quick else [7, 30]))]

    from site_node.crypto import CkksParams, generate_study_context, public_context

    console = Console(width=max(Console().width, 150))
    table = Table(title=f"Peak memory per stage ({SCHEME}, {SITES} sites, fresh process each)")
    for column in ("params", "stage", "seconds", "params/s", "peak MB", "x one upload"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console) as progress:
        work = Path(tmp)
        secret = generate_study_context(CkksParams())
        (work / "secret").write_bytes(secret)
        (work / "public").write_bytes(public_context(secret))
        task = progress.add_task("stages", total=len(sizes) * (SITES + 2) + 2)
        for n in sizes:
            uploads = []
            for site in range(SITES):
                uploads.append(_in_fresh_process(_stage_encrypt, work, n, site))
                progress.advance(task)
            upload_mb = uploads[0]["bytes"] / 1e6
            rows = [
                ("site encrypt", uploads[0]),
                ("server sum", _in_fresh_process(_stage_sum, work, n, SITES)),
            ]
            progress.advance(task)
            rows.append(("site decrypt", _in_fresh_process(_stage_decrypt, work, n)))
            progress.advance(task)
            for stage, row in rows:
                table.add_row(
                    f"{n / 1e6:g}M",
                    stage,
                    f"{row['seconds']:.2f}",
                    f"{n / row['seconds']:,.0f}",
                    f"{row['peak_mb']:,.0f}",
                    f"{row['peak_mb'] / upload_mb:.2f} ({upload_mb:,.0f} MB)",
                )
        n, sites = 1_000_000, args.throughput_sites
        for site in range(sites):  # every site's own upload (repeated seeds are refused)
            _in_fresh_process(_stage_encrypt, work, n, site)
        progress.advance(task)
        throughput = _in_fresh_process(_stage_sum, work, n, sites)
        progress.advance(task)
    console.print(table)
    console.print(
        f"server aggregation, {sites} sites x 1M parameters: {throughput['seconds']:.2f} s, "
        f"{sites * n / throughput['seconds'] / 1e6:,.1f}M parameters/s summed "
        f"({n / throughput['seconds'] / 1e6:,.1f}M aggregate parameters/s), "
        f"peak {throughput['peak_mb']:,.0f} MB over its inputs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
