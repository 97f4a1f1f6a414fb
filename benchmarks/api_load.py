"""Benchmark: the consortium API under a bounded load on loopback, and audit appends.

Starts ``consortium server`` (a real uvicorn process; SQLite by default, or PostgreSQL with
``--postgres URL``), seeds three hospitals with datasets, then drives each operation from
``--workers`` threads for ``--requests`` requests and prints p50/p99 latency and
throughput. Then measures audit-log appends per second (each committed with its own
transaction) and inclusion-proof generation, in process, on the same database.

    .venv/bin/python benchmarks/api_load.py --quick
    .venv/bin/python benchmarks/api_load.py --requests 400 --workers 8
    .venv/bin/python benchmarks/api_load.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from concord_demo.stack import free_port, spawn_server
from concord_protocol.processes import ManagedProcess, flower_env
from consortium_server.identity.factory import build_local_issuer
from consortium_server.settings import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests.support
from tests.support.world import (
    dataset_body,
    site_enrolment,
    study_contract,
)

console = Console()


def _start_server(data_dir: Path, port: int, database_url: str | None) -> ManagedProcess:
    env = {
        **flower_env(data_dir / "home"),
        "CONCORD_DATA_DIR": str(data_dir),
        "CONCORD_API__PORT": str(port),
        "CONCORD_LOG_LEVEL": "WARNING",
        "CONCORD_POLICY__MEMBER_ORGANISATIONS": '["University of Leiden"]',
    }
    if database_url:
        env["CONCORD_DATABASE__URL"] = database_url
    return spawn_server(
        Path(sys.executable).parent,
        env,
        url=f"http://127.0.0.1:{port}",
        log_path=data_dir / "server.log",
    )


def _headers(issuer: Any, subject: str, roles: list[str], org: str) -> dict[str, str]:
    token = issuer.mint(subject=subject, roles=roles, organisation=org, audience="concord-api")
    return {"Authorization": f"Bearer {token}"}


def _measure(
    name: str, call: Callable[[httpx.Client], httpx.Response], *, requests: int, workers: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    local = threading.local()

    def one(_: int) -> None:
        nonlocal errors
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        started = time.perf_counter()
        response = call(local.client)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            if response.status_code >= 400:
                errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "operation": name,
        "requests": requests,
        "errors": errors,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "throughput": requests / wall,
    }


def _audit_appends(settings: ServerSettings, count: int) -> dict[str, float]:
    from concord_protocol.audit.entries import Actor, AuditEntry, AuditObject, Outcome
    from consortium_server.audit.log import AuditLog
    from consortium_server.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url())
    factory = make_sessionmaker(engine)
    log = AuditLog()
    started = time.perf_counter()
    for i in range(count):
        with factory() as session:
            log.append(
                AuditEntry(
                    actor=Actor(subject="bench"),
                    action="bench.append",
                    object=AuditObject(type="bench", id=str(i)),
                    outcome=Outcome.SUCCESS,
                    source="benchmarks/api_load",
                ),
                session=session,
            )
            session.commit()
    append_s = time.perf_counter() - started
    with factory() as session:
        size = log.size(session=session)
        started = time.perf_counter()
        proofs = min(count, 50)
        for i in range(proofs):
            log.prove_inclusion(size - 1 - i, session=session)
        proof_s = time.perf_counter() - started
    engine.dispose()
    return {"appends_per_s": count / append_s, "proof_ms": proof_s / proofs * 1000, "size": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument(
        "--postgres", help="Run against this PostgreSQL URL (a fresh database is made)."
    )
    parser.add_argument("--quick", action="store_true", help="100 requests, 200 appends.")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.appends = 100, 200

    database_url = None
    drop: Callable[[], None] = lambda: None  # noqa: E731
    if args.postgres:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = f"concord_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        database_url = (
            make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        )

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "server"
        port = free_port()
        settings = ServerSettings(
            data_dir=data_dir,
            api={"port": port},
            database={"url": database_url} if database_url else {},
        )
        server = _start_server(data_dir, port, database_url)
        try:
            base = f"http://127.0.0.1:{port}"
            issuer = build_local_issuer(settings)
            admin_h = _headers(issuer, "olga", ["consortium_admin"], "Consortium office")
            researcher = _headers(issuer, "rita", ["researcher"], "University of Leiden")
            with httpx.Client(base_url=base, timeout=30) as client:
                for x in "abc":
                    client.post(
                        "/api/v1/sites",
                        json=site_enrolment(f"hospital-{x}", f"Hospital {x}"),
                        headers=admin_h,
                    ).raise_for_status()
                    steward = _headers(issuer, f"steward-{x}", ["data_steward"], f"Hospital {x}")
                    body = dataset_body(f"bc-{x}", f"hospital-{x}", epsilon_budget=1000.0)
                    client.post("/api/v1/datasets", json=body, headers=steward).raise_for_status()
                contract = study_contract(["bc-a", "bc-b", "bc-c"])
                study = client.post("/api/v1/studies", json=contract, headers=researcher).json()

            rows = [
                _measure(
                    "GET study status",
                    lambda c: c.get(f"{base}/api/v1/studies/{study['id']}", headers=researcher),
                    requests=args.requests,
                    workers=args.workers,
                ),
                _measure(
                    "POST policy dry run",
                    lambda c: c.post(
                        f"{base}/api/v1/policy/check", json=contract, headers=researcher
                    ),
                    requests=args.requests,
                    workers=args.workers,
                ),
                _measure(
                    "POST study submission",
                    lambda c: c.post(f"{base}/api/v1/studies", json=contract, headers=researcher),
                    requests=args.requests,
                    workers=args.workers,
                ),
            ]
        finally:
            server.stop()
        try:
            audit = _audit_appends(settings, args.appends)
        finally:
            drop()

    backend = "PostgreSQL" if database_url else "SQLite (WAL)"
    table = Table(title=f"API under load: {args.workers} workers, loopback, {backend}")
    for column in ("operation", "requests", "errors", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["operation"],
            str(row["requests"]),
            str(row["errors"]),
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
            f"{row['throughput']:.1f}",
        )
    console.print(table)
    console.print(
        f"Audit log on {backend}: {audit['appends_per_s']:.0f} appends/s (one transaction "
        f"each); inclusion proof in a tree of {audit['size']:.0f} leaves: "
        f"{audit['proof_ms']:.1f} ms"
    )
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
