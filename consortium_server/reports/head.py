"""The tree head section of the report: the signed head the report describes, checked.

A report is only as trustworthy as the head it names, so its signature is verified again
with the server's key and each cosignature with the enrolled site's key, rather than taken
from storage as valid; the section also says whether the head has its witness quorum and
which is the latest head that has one, so the reader knows how far the log is witnessed.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.audit.cosignatures import verify_cosignature
from concord_protocol.audit.heads import SignedTreeHead, decode_public_key, verify_tree_head
from concord_protocol.errors import AuditVerificationError
from consortium_server.audit.cosignatures import cosignatures_for, is_witnessed
from consortium_server.audit.log import AuditLog
from consortium_server.audit.models import AuditCosignature
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.reports.rows import Cosigner, HeadInfo
from consortium_server.sites.models import Site

__all__ = ["head_info"]


def _latest_witnessed(log: AuditLog, session: Session) -> tuple[int, str] | None:
    """(size, root) of the largest head with a quorum of cosignatures, if any."""
    sizes = session.scalars(
        select(AuditCosignature.tree_size).distinct().order_by(AuditCosignature.tree_size.desc())
    ).all()
    for size in sizes:
        head = log.head_for_size(int(size), session=session)
        if head is not None and is_witnessed(head, log.witness_quorum, session=session):
            return head.tree_size, head.root_hash
    return None


def head_info(
    head: SignedTreeHead, *, log: AuditLog, signer: TreeHeadSigner, session: Session
) -> HeadInfo:
    """Describe ``head``: its signature checked with the server key, its cosigners checked
    with the enrolled sites' keys, whether it is witnessed, and the latest witnessed head."""
    try:
        verify_tree_head(head, signer.public_key)
        signature_valid = True
    except AuditVerificationError:
        signature_valid = False
    site_keys: Mapping[str, str] = {
        site.id: site.signing_public_key for site in session.scalars(select(Site))
    }
    cosigners = []
    for cosignature in cosignatures_for(head, session=session):
        key = site_keys.get(cosignature.site_id)
        try:
            valid = key is not None
            if key is not None:
                verify_cosignature(cosignature, decode_public_key(key))
        except AuditVerificationError:
            valid = False
        cosigners.append(
            Cosigner(site_id=cosignature.site_id, timestamp=cosignature.timestamp, valid=valid)
        )
    witnessed = _latest_witnessed(log, session)
    return HeadInfo(
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp=head.timestamp,
        key_id=head.key_id,
        signature=head.signature,
        server_public_key=signer.public_key_b64,
        signature_valid=signature_valid,
        witnessed=is_witnessed(head, log.witness_quorum, session=session),
        witness_quorum=log.witness_quorum,
        cosigners=cosigners,
        latest_witnessed_size=witnessed[0] if witnessed else None,
        latest_witnessed_root=witnessed[1] if witnessed else None,
    )
