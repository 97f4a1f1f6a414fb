"""Tampering directly in the database is caught by verification and by the witnesses.

The attacker has database superuser rights (drops the append-only triggers) and, for the
witness checks, even the server's signing key: the sites' older cosigned heads still
expose every rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.merkle import (
    InvalidProofError,
    MerkleAccumulator,
    consistency_proof,
    leaf_hash,
    root_hash,
    verify_inclusion,
)
from concord_protocol.audit.verify import ProblemKind, VerificationReport
from consortium_server.audit.log import AuditLog, load_leaf_hashes
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.audit.verify import verify_live
from consortium_server.errors import DomainError
from site_node.agent.cosigner import WitnessRefusedError

from .conftest import (
    SiteWitness,
    append_only_triggers_disabled,
    build_witnessed_log,
    make_entry,
    rebuild_nodes,
)


@dataclass
class Scene:
    engine: Engine
    factory: sessionmaker[Session]
    log: AuditLog
    signer: TreeHeadSigner
    sites: list[SiteWitness]

    def verify(self) -> VerificationReport:
        with self.factory() as session:
            return verify_live(
                session,
                server_public_key=self.signer.public_key_b64,
                site_keys={s.site_id: s.public_key_b64 for s in self.sites},
                quorum=2,
            )

    def sql(self, statement: str, **params: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)


@pytest.fixture
def scene(
    db_engine: Engine,
    session_factory: sessionmaker[Session],
    audit_log: AuditLog,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
) -> Scene:
    """16 entries; heads at 10 and 16, each cosigned by two sites."""
    sites = [make_site("site-a"), make_site("site-b")]
    with session_factory() as session:
        build_witnessed_log(session, audit_log, signer, sites, (10, 16))
    s = Scene(db_engine, session_factory, audit_log, signer, sites)
    clean = s.verify()
    assert clean.ok, clean.problems
    assert (clean.entries, clean.heads, clean.cosignatures, clean.witnessed_size) == (16, 2, 4, 16)
    return s


def _set_leaf(scene: Scene, index: int, data: bytes, *, rehash: bool = True) -> None:
    scene.sql(
        'UPDATE audit_leaves SET entry = :e, leaf_hash = :h WHERE "index" = :i',
        e=data,
        h=leaf_hash(data) if rehash else leaf_hash(make_entry(index).canonical_bytes()),
        i=index,
    )


def modify(scene: Scene) -> None:
    forged = make_entry(3, subject="mallory").canonical_bytes()
    _set_leaf(scene, 3, forged)
    scene.sql('UPDATE audit_leaves SET actor_subject = :s WHERE "index" = 3', s="mallory")


def modify_bytes_only(scene: Scene) -> None:
    _set_leaf(scene, 3, make_entry(3, subject="mallory").canonical_bytes(), rehash=False)


def delete_and_renumber(scene: Scene) -> None:
    scene.sql('DELETE FROM audit_leaves WHERE "index" = 3')
    for index in range(4, 16):
        scene.sql(
            'UPDATE audit_leaves SET "index" = :new WHERE "index" = :old', new=index - 1, old=index
        )


def delete_leaving_gap(scene: Scene) -> None:
    scene.sql('DELETE FROM audit_leaves WHERE "index" = 3')


def reorder(scene: Scene) -> None:
    a, b = make_entry(2).canonical_bytes(), make_entry(5).canonical_bytes()
    _set_leaf(scene, 2, b)
    _set_leaf(scene, 5, a)


def truncate_tail(scene: Scene) -> None:
    scene.sql('DELETE FROM audit_leaves WHERE "index" >= 12')


def insert_forged(scene: Scene) -> None:
    for index in range(15, 2, -1):
        scene.sql(
            'UPDATE audit_leaves SET "index" = :new WHERE "index" = :old', new=index + 1, old=index
        )
    forged = make_entry(99, action="study.released").canonical_bytes()
    scene.sql(
        'INSERT INTO audit_leaves ("index", entry, leaf_hash, action, actor_subject, at, '
        "created_at) VALUES (3, :e, :h, 'study.released', 'alice', :t, :t)",
        e=forged,
        h=leaf_hash(forged),
        t=make_entry(3).at.replace(tzinfo=None),
    )


TAMPERING = {
    "modify": (modify, {ProblemKind.HEAD_ROOT_MISMATCH, ProblemKind.COSIGNATURE_ROOT_MISMATCH}),
    "modify_bytes_only": (
        modify_bytes_only,
        {
            ProblemKind.LEAF_HASH_MISMATCH,
            ProblemKind.HEAD_ROOT_MISMATCH,
            ProblemKind.COLUMN_MISMATCH,
        },
    ),
    "delete": (
        delete_and_renumber,
        {ProblemKind.HEAD_ROOT_MISMATCH, ProblemKind.COSIGNATURE_ROOT_MISMATCH},
    ),
    "delete_gap": (delete_leaving_gap, {ProblemKind.INDEX_GAP, ProblemKind.HEAD_ROOT_MISMATCH}),
    "reorder": (reorder, {ProblemKind.HEAD_ROOT_MISMATCH, ProblemKind.COSIGNATURE_ROOT_MISMATCH}),
    "truncate": (
        truncate_tail,
        {ProblemKind.HEAD_BEYOND_LOG, ProblemKind.COSIGNATURE_BEYOND_LOG},
    ),
    "insert_forged": (
        insert_forged,
        {ProblemKind.HEAD_ROOT_MISMATCH, ProblemKind.COSIGNATURE_ROOT_MISMATCH},
    ),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampering_is_detected_by_verify_server_and_witnesses(scene: Scene, name: str) -> None:
    tamper, expected = TAMPERING[name]
    with append_only_triggers_disabled(scene.engine):
        tamper(scene)
        rebuild_nodes(scene.engine)  # and make the stored tree agree with the leaves

    # 1. Verification lists the damage (and never stops at the first problem).
    report = scene.verify()
    assert not report.ok
    assert expected <= report.kinds(), report.problems
    assert report.witnessed_size != 16

    if name == "modify_bytes_only":
        # The tree of leaf hashes is intact (so witnesses have nothing to object to), but
        # the entry no longer matches its leaf: the server will not serve it, and a
        # client's inclusion check from the entry bytes fails against the cosigned root.
        with scene.factory() as session:
            with pytest.raises(DomainError) as served:
                scene.log.get_entry(3, session=session)
            assert served.value.code == "audit.log_corrupt"
            inclusion = scene.log.prove_inclusion(3, session=session, tree_size=16)
            witnessed_root = scene.sites[0].witness().last_head
            assert witnessed_root is not None
            assert inclusion.root == witnessed_root.root
            forged_leaf = leaf_hash(make_entry(3, subject="mallory").canonical_bytes())
            with pytest.raises(InvalidProofError):
                verify_inclusion(forged_leaf, 3, 16, inclusion.path, witnessed_root.root)
        return

    # 2. The honest server refuses to sign a new head over the damaged log.
    with scene.factory() as session, pytest.raises(DomainError) as info:
        scene.signer.sign_latest(session)
    assert info.value.code == "audit.log_corrupt"

    # 3. An attacker with the server key grows the log past the witnesses' head and signs
    #    it; every witness refuses (a log with holes cannot even produce a proof).
    with scene.factory() as session:
        for n in range(3):
            scene.log.append(make_entry(100 + n), session=session)
        session.commit()
        if name == "delete_gap":
            with pytest.raises(DomainError) as holes:
                load_leaf_hashes(session)
            assert holes.value.code == "audit.log_corrupt"
            return
        leaves = load_leaf_hashes(session)
    head = scene.signer.sign(len(leaves), root_hash(leaves))
    for site in scene.sites:
        witness = site.witness()
        last = witness.last_head
        assert last is not None
        assert last.tree_size == 16
        proof = consistency_proof(leaves, last.tree_size) if len(leaves) >= 16 else []
        with pytest.raises(WitnessRefusedError) as refusal:
            witness.cosign(head, proof)
        expected_code = "audit.tree_shrunk" if len(leaves) < 16 else "audit.tree_inconsistent"
        assert refusal.value.code == expected_code
        assert site.witness().last_head == last


def test_truncation_is_refused_by_witnesses_as_a_smaller_tree(scene: Scene) -> None:
    with append_only_triggers_disabled(scene.engine):
        truncate_tail(scene)
    with scene.factory() as session:
        leaves = load_leaf_hashes(session)
    head = scene.signer.sign(len(leaves), root_hash(leaves))
    for site in scene.sites:
        with pytest.raises(WitnessRefusedError) as refusal:
            site.witness().cosign(head, [])
        assert refusal.value.code == "audit.tree_shrunk"


def test_rewritten_and_resigned_heads_are_still_caught_by_cosignatures(scene: Scene) -> None:
    """The attacker rewrites an entry and re-signs matching heads with the server key:
    the server-signed heads now agree, but the sites' cosignatures pin the old roots."""
    with append_only_triggers_disabled(scene.engine):
        modify(scene)
        with scene.factory() as session:
            leaves = load_leaf_hashes(session)
        for size in (10, 16):
            forged = scene.signer.sign(size, root_hash(leaves[:size]))
            scene.sql(
                "UPDATE audit_tree_heads SET root_hash = :r, timestamp = :t, signature = :s "
                "WHERE tree_size = :n",
                r=forged.root_hash,
                t=forged.timestamp.replace(tzinfo=None),
                s=forged.signature,
                n=size,
            )
    report = scene.verify()
    assert ProblemKind.HEAD_ROOT_MISMATCH not in report.kinds()
    assert ProblemKind.HEAD_SIGNATURE_INVALID not in report.kinds()
    mismatches = [p for p in report.problems if p.kind is ProblemKind.COSIGNATURE_ROOT_MISMATCH]
    assert {(p.site_id, p.tree_size) for p in mismatches} == {
        (site, size) for site in ("site-a", "site-b") for size in (10, 16)
    }
    assert report.witnessed_size is None


def test_damaged_entries_under_an_intact_stored_tree_never_change_what_is_signed(
    scene: Scene,
) -> None:
    """Rewriting entries without the stored tree: the server goes on signing the tree the
    witnesses saw (heads are built from the checked frontier, never a rescan), and
    verification names the damage."""
    with append_only_triggers_disabled(scene.engine):
        modify(scene)
    assert ProblemKind.HEAD_ROOT_MISMATCH in scene.verify().kinds()
    with scene.factory() as session:
        for n in range(2):
            scene.log.append(make_entry(200 + n), session=session)
        session.commit()
        head = scene.signer.sign_latest(session)
        proof = scene.log.prove_consistency(16, head.tree_size, session=session)
        session.commit()
    for site in scene.sites:
        site.witness().cosign(head, proof.path)  # extends what the witness cosigned


def test_a_damaged_stored_subtree_is_never_signed_and_its_proofs_fail(scene: Scene) -> None:
    # Below the signed frontier (leaves 0-3 of the head of 16): heads never read it, so
    # what is signed stays honest, and every proof through it fails against signed roots.
    with append_only_triggers_disabled(scene.engine):
        scene.sql("UPDATE audit_nodes SET hash = :h WHERE level = 2 AND idx = 0", h=b"\x11" * 32)
    witnessed = scene.sites[0].witness().last_head
    assert witnessed is not None
    with scene.factory() as session:
        inclusion = scene.log.prove_inclusion(5, session=session, tree_size=16)
        with pytest.raises(InvalidProofError):
            verify_inclusion(inclusion.leaf_hash, 5, 16, inclusion.path, witnessed.root)
        scene.log.append(make_entry(300), session=session)
        session.commit()
        head = scene.signer.sign_latest(session)
        session.commit()
    honest = MerkleAccumulator.from_frontier(16, [witnessed.root])
    honest.append(leaf_hash(make_entry(300).canonical_bytes()))
    assert (head.tree_size, head.root) == (17, honest.root())
    # On the frontier of the signed head: the server refuses to sign anything.
    with append_only_triggers_disabled(scene.engine):  # (SQLite's are gone for good)
        scene.sql("UPDATE audit_nodes SET hash = :h WHERE level = 4 AND idx = 0", h=b"\x22" * 32)
    with scene.factory() as session:
        scene.log.append(make_entry(301), session=session)
        session.commit()
        with pytest.raises(DomainError) as info:
            scene.signer.sign_latest(session)
        assert info.value.code == "audit.log_corrupt"
