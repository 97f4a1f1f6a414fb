"""How long the consortium server takes to start, and whether it loads torch on the way.

Starts ``consortium server`` (embedded defaults: SQLite, local issuer) ``--runs`` times on a
fresh data directory and reports, per run, the seconds until ``/readyz`` answers 200, and
the seconds to import the API (``consortium_server.main``) in a fresh interpreter; then
whether torch, MONAI or Opacus were imported by a server that created its app and ran its
start-up (``create_app`` and its lifespan).

``--tree DIR`` measures another checkout of the project (for example the commit before
the server stopped importing torch: ``git worktree add /tmp/before <commit>``) with this
virtual environment: the tree is put first on ``PYTHONPATH``. ``--drop-caches`` empties the
page cache before each run (root only), which is what "cold" means below; without it the
files the server reads are in memory after the first run.

    .venv/bin/python benchmarks/server_startup.py --runs 5
    .venv/bin/python benchmarks/server_startup.py --runs 5 --tree /tmp/before --drop-caches
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "opacus")

PROBE = """
import sys, time
t0 = time.perf_counter()
import consortium_server.main as main
imported = time.perf_counter() - t0
from fastapi.testclient import TestClient
from consortium_server.settings import ServerSettings
with TestClient(main.create_app(ServerSettings(data_dir=sys.argv[1]))) as client:
    assert client.get("/readyz").status_code == 200
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(f"{imported:.3f}", ",".join(heavy) or "-")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _env(tree: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(tree),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def time_to_ready(tree: Path, work: Path) -> float:
    """Seconds from starting ``consortium server`` to ``/readyz`` answering 200."""
    port = _free_port()
    env = {
        **_env(tree, work),
        "CONCORD_DATA_DIR": str(work / "data"),
        "CONCORD_API__PORT": str(port),
        "CONCORD_POLICY__DIRECTORY": str(tree / "policies"),
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from consortium_server.cli import main; main()", "server"],
        env=env,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server exited with {proc.returncode}")
    finally:
        proc.terminate()
        proc.wait(30)


def import_and_heavy(tree: Path, work: Path) -> tuple[float, str]:
    """Seconds to import the API module; the heavy modules a started app has loaded."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(work / "probe"), ",".join(HEAVY)],
        env=_env(tree, work),
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seconds, heavy = result.stdout.split()[-2:]
    return float(seconds), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout to measure")
    parser.add_argument("--drop-caches", action="store_true", help="cold page cache (root)")
    args = parser.parse_args()
    console = Console()
    ready: list[float] = []
    imports: list[float] = []
    heavy = "-"
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="concord-startup-") as tmp:
            work = Path(tmp)
            if args.drop_caches:
                _drop_caches()
            ready.append(time_to_ready(args.tree.resolve(), work))
            if args.drop_caches:
                _drop_caches()
            seconds, heavy = import_and_heavy(args.tree.resolve(), work)
            imports.append(seconds)
        console.print(f"run {run + 1}: ready {ready[-1]:.2f} s, import {imports[-1]:.2f} s")
    table = Table(title=f"consortium server start-up ({args.tree.resolve()})")
    for column in ("", "median", "min", "max"):
        table.add_column(column, justify="right")
    for name, values in (("to /readyz (s)", ready), ("import consortium_server.main (s)", imports)):
        table.add_row(
            name, f"{statistics.median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"
        )
    console.print(table)
    cache = "cold (page cache dropped)" if args.drop_caches else "warm page cache"
    console.print(f"{cache}; heavy modules loaded by a started server: {heavy}")


if __name__ == "__main__":
    main()
