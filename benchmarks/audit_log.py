"""The audit log at 10^3, 10^5 and 10^6 entries: heads, proofs, entries and export pages.

    .venv/bin/python benchmarks/audit_log.py --quick        # 10^3, 10^4, 10^5 (a minute)
    .venv/bin/python benchmarks/audit_log.py                # 10^3, 10^5, 10^6 (minutes)
    .venv/bin/python benchmarks/audit_log.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres

For each size a fresh, migrated database is filled in bulk (entries, their stored subtree
hashes and one signed head, as appends would leave them), then each operation runs in
process through the server's own services (:class:`consortium_server.audit.log.AuditLog`,
:class:`consortium_server.audit.signer.TreeHeadSigner`, the export builder) and the table
shows the fastest of ``--repeat`` runs in milliseconds. The last column is what a root
cost before the stored subtrees: read every leaf hash and hash the tree (the old path of
every head and proof), for comparison.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import Actor, AuditEntry, AuditObject, Outcome
from concord_protocol.audit.merkle import MerkleAccumulator, leaf_hash, root_hash
from consortium_server.audit.export import build_export
from consortium_server.audit.log import AuditLog, load_leaf_hashes
from consortium_server.audit.models import AuditLeaf, AuditNode, AuditTreeHead
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.audit.tree import SubtreeBuilder
from consortium_server.db.migrate import upgrade_to_head
from consortium_server.db.session import make_engine

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_BATCH = 10_000


def _entry(n: int) -> AuditEntry:
    return AuditEntry(
        actor=Actor(subject=f"user-{n % 97}", organisation="Hospital A", roles=("data_steward",)),
        action="study.approved",
        object=AuditObject(type="study", id=f"study-{n}"),
        outcome=Outcome.SUCCESS,
        at=_T0 + timedelta(milliseconds=n),
        request_id=f"req-{n}",
        source="consortium-server/api",
        details={"n": n},
    )


def fill(engine: Engine, size: int, signer: TreeHeadSigner, progress: Progress) -> None:
    """``size`` entries, their subtrees and a head of all of them, inserted in bulk."""
    task = progress.add_task(f"filling {size:,} entries", total=size)
    accumulator = MerkleAccumulator()
    builder = SubtreeBuilder()
    with engine.begin() as conn:
        leaves: list[dict[str, object]] = []
        nodes: list[dict[str, object]] = []
        for n in range(size):
            entry = _entry(n)
            data = entry.canonical_bytes()
            digest = leaf_hash(data)
            accumulator.append(digest)
            leaves.append(
                {
                    "index": n,
                    "entry": data,
                    "leaf_hash": digest,
                    "action": entry.action,
                    "actor_subject": entry.actor.subject,
                    "at": entry.at,
                    "created_at": entry.at,
                }
            )
            nodes.extend({"level": lv, "idx": i, "hash": h} for lv, i, h in builder.add(digest))
            if len(leaves) >= _BATCH:
                conn.execute(insert(AuditLeaf), leaves)
                if nodes:
                    conn.execute(insert(AuditNode), nodes)
                progress.advance(task, len(leaves))
                leaves, nodes = [], []
        if leaves:
            conn.execute(insert(AuditLeaf), leaves)
        if nodes:
            conn.execute(insert(AuditNode), nodes)
        head = signer.sign(size, accumulator.root())
        conn.execute(
            insert(AuditTreeHead),
            [
                {
                    "tree_size": head.tree_size,
                    "root_hash": head.root_hash,
                    "timestamp": head.timestamp,
                    "key_id": head.key_id,
                    "signature": head.signature,
                    "created_at": head.timestamp,
                }
            ],
        )
    progress.remove_task(task)


def _best(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def measure(engine: Engine, size: int, signer: TreeHeadSigner, repeat: int) -> dict[str, float]:
    """Milliseconds per operation on a filled log of ``size`` entries."""
    log = AuditLog()
    rng = random.Random(size)
    out: dict[str, float] = {}
    with Session(engine) as session:
        out["latest head (nothing new)"] = _best(repeat, lambda: signer.sign_latest(session))

        def append_and_sign() -> None:
            log.append(_entry(size + rng.randrange(10**9)), session=session)
            signer.sign_latest(session)
            session.commit()

        out["append + sign a new head"] = _best(repeat, append_and_sign)
        current = log.size(session=session)
        out["inclusion proof"] = _best(
            repeat,
            lambda: log.prove_inclusion(rng.randrange(current), session=session, tree_size=current),
        )
        out["consistency proof"] = _best(
            repeat, lambda: log.prove_consistency(current // 3, current, session=session)
        )
        out["entry by index"] = _best(
            repeat, lambda: log.get_entry(rng.randrange(current), session=session)
        )
        key = signer.public_key_b64
        out["export page (10,000)"] = _best(
            max(1, repeat // 3),
            lambda: build_export(
                session, server_public_key=key, site_keys={}, start=0, limit=10_000
            ),
        )
        session.rollback()
        out["root, reading every leaf (before)"] = _best(
            max(1, repeat // 3), lambda: root_hash(load_leaf_hashes(session))
        )
        session.rollback()
    return out


def _engine(base: str | None, directory: Path, size: int) -> Engine:
    if base is None:
        return make_engine(f"sqlite:///{directory / f'audit-{size}.db'}")
    engine = make_engine(base)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^3, 10^4 and 10^5 entries")
    parser.add_argument("--sizes", type=int, nargs="*", help="entry counts to measure")
    parser.add_argument("--repeat", type=int, default=9, help="runs per operation (best kept)")
    parser.add_argument("--postgres", help="PostgreSQL URL (its public schema is replaced)")
    args = parser.parse_args()
    sizes = args.sizes or ([1_000, 10_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000])
    console = Console()
    signer = TreeHeadSigner.generate()
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as bar:
        for size in sizes:
            engine = _engine(args.postgres, Path(tmp), size)
            upgrade_to_head(engine)
            fill(engine, size, signer, bar)
            results[size] = measure(engine, size, signer, args.repeat)
            engine.dispose()
    backend = "PostgreSQL" if args.postgres else "SQLite"
    table = Table(title=f"Audit log operations, {backend}, best of {args.repeat} (ms)")
    table.add_column("operation")
    for size in sizes:
        table.add_column(f"{size:,} entries", justify="right")
    for operation in next(iter(results.values())):
        table.add_row(operation, *(f"{results[s][operation]:.2f}" for s in sizes))
    console.print(table)


if __name__ == "__main__":
    main()
