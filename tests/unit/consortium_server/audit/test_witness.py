"""Site witnesses: cosign only consistent, growing trees, across restarts; server side."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import verify_cosignature
from concord_protocol.audit.merkle import consistency_proof, leaf_hash
from concord_protocol.errors import AuditVerificationError
from consortium_server.audit.cosignatures import cosignatures_for, is_witnessed, record_cosignature
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import DomainError
from site_node.agent.cosigner import WitnessRefusedError

from .conftest import SiteWitness

LEAVES = [leaf_hash(f"e{i}".encode()) for i in range(20)]


def _refusal(call: Callable[[], object]) -> str:
    with pytest.raises(WitnessRefusedError) as info:
        call()
    return info.value.code


def test_witness_cosigns_growing_consistent_trees_and_refuses_others_across_restarts(
    signer: TreeHeadSigner, make_site: Callable[[str], SiteWitness]
) -> None:
    from concord_protocol.audit.merkle import root_hash

    site = make_site("site-a")
    head8 = signer.sign(8, root_hash(LEAVES[:8]))
    cosig = site.witness().cosign(head8, [])  # first head: trusted on first use
    verify_cosignature(cosig, site.key.public_key())
    assert (cosig.tree_size, cosig.root_hash) == (8, head8.root_hash)

    witness = site.witness()  # restart: state comes from the file
    assert witness.last_head == head8
    head5 = signer.sign(5, root_hash(LEAVES[:5]))
    assert _refusal(lambda: witness.cosign(head5, [])) == "audit.tree_shrunk"
    forked8 = signer.sign(8, root_hash(LEAVES[1:9]))
    assert _refusal(lambda: site.witness().cosign(forked8, [])) == "audit.tree_inconsistent"
    head13 = signer.sign(13, root_hash(LEAVES[:13]))
    good_proof = consistency_proof(LEAVES[:13], 8)
    bad_proof = [good_proof[0][::-1], *good_proof[1:]]
    assert _refusal(lambda: site.witness().cosign(head13, bad_proof)) == "audit.tree_inconsistent"
    assert _refusal(lambda: site.witness().cosign(head13, [])) == "audit.tree_inconsistent"
    forged = signer.sign(13, root_hash(LEAVES[:13])).model_copy(update={"tree_size": 14})
    assert _refusal(lambda: site.witness().cosign(forged, [])) == "audit.head_signature_invalid"
    stranger = TreeHeadSigner.generate().sign(13, root_hash(LEAVES[:13]))
    assert _refusal(lambda: site.witness().cosign(stranger, good_proof)) == (
        "audit.head_signature_invalid"
    )
    assert site.witness().last_head == head8  # refusals never move the state

    site.witness().cosign(head13, good_proof)
    restarted = site.witness()
    assert restarted.last_head == head13
    # The older, smaller head is refused after the restart too.
    assert _refusal(lambda: restarted.cosign(head8, [])) == "audit.tree_shrunk"
    # Same size, same root, newer signature: fine; an older timestamp is refused.
    restarted.cosign(signer.sign(13, root_hash(LEAVES[:13])), [])
    assert _refusal(lambda: restarted.cosign(head13, [])) == "audit.head_stale"


def test_damaged_or_foreign_state_file_is_refused(
    signer: TreeHeadSigner, make_site: Callable[[str], SiteWitness]
) -> None:
    site = make_site("site-a")
    site.witness().cosign(signer.sign(1, LEAVES[0]), [])
    state = json.loads(site.state_file.read_text())
    assert state["site_id"] == "site-a"
    state["site_id"] = "site-b"
    site.state_file.write_text(json.dumps(state))
    assert _refusal(site.witness) == "audit.witness_state_invalid"
    site.state_file.write_text("{not json")
    assert _refusal(site.witness) == "audit.witness_state_invalid"


def test_server_records_cosignatures_and_counts_a_quorum(
    audit_log: AuditLog,
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
) -> None:
    append_entries(4)
    head = signer.sign_latest(session)
    a, b = make_site("site-a"), make_site("site-b")
    cosig_a = a.witness().cosign(head, [])
    record_cosignature(session, cosig_a, site_public_key=a.public_key_b64)
    assert not is_witnessed(head, 2, session=session)
    assert is_witnessed(head, 1, session=session)
    # Idempotent for the same head; a signature by another key is refused.
    record_cosignature(session, cosig_a, site_public_key=a.public_key_b64)
    cosig_b = b.witness().cosign(head, [])
    with pytest.raises(AuditVerificationError) as info:
        record_cosignature(session, cosig_b, site_public_key=a.public_key_b64)
    assert info.value.code == "audit.cosignature_invalid"
    record_cosignature(session, cosig_b, site_public_key=b.public_key_b64)
    session.commit()
    assert is_witnessed(head, 2, session=session)
    assert [c.site_id for c in cosignatures_for(head, session=session)] == ["site-a", "site-b"]
    # A head the server never signed cannot be cosigned into the database.
    unknown = a.witness()
    fake = cosig_a.model_copy(update={"root_hash": "00" * 32})
    with pytest.raises(DomainError) as info:
        record_cosignature(session, fake, site_public_key=a.public_key_b64)
    assert info.value.code == "audit.head_not_found"
    assert unknown.last_head == head
