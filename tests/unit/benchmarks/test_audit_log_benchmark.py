"""benchmarks/audit_log.py fills a log exactly as appends would, and measures every row.

The bulk fill must leave the same database that :class:`AuditLog` appends build (the same
leaves, subtrees and a valid head), or the figures would describe another tree; the
timings themselves are printed, never asserted.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress
from sqlalchemy import select
from sqlalchemy.orm import Session

from benchmarks.audit_log import fill, measure
from concord_protocol.audit.heads import verify_tree_head
from concord_protocol.audit.merkle import root_hash
from consortium_server.audit.log import AuditLog, load_leaf_hashes
from consortium_server.audit.models import AuditNode
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.audit.tree import completed_subtrees
from consortium_server.db.migrate import upgrade_to_head
from consortium_server.db.session import make_engine


def test_the_bulk_fill_is_the_log_appends_build_and_every_operation_is_measured(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'bench.db'}")
    upgrade_to_head(engine)
    signer = TreeHeadSigner.generate()
    with Progress(transient=True) as bar:
        fill(engine, 300, signer, bar)
    with Session(engine) as session:
        leaves = load_leaf_hashes(session)
        nodes = {(lv, i) for lv, i in session.execute(select(AuditNode.level, AuditNode.idx))}
        head = AuditLog().latest_head(session=session)
    assert len(leaves) == 300
    assert nodes == {n for index in range(300) for n in completed_subtrees(index)}
    assert head is not None
    assert (head.tree_size, head.root) == (300, root_hash(leaves))
    verify_tree_head(head, signer.public_key)
    figures = measure(engine, 300, signer, repeat=1)
    assert len(figures) == 7
    assert all(ms > 0 for ms in figures.values())
    engine.dispose()
