"""The agent's release step: sign off the final model of each completed study.

For every study of this site that is ``completed`` and that this site has not signed off
yet, the agent fetches the final encrypted aggregate, decrypts it with the study key,
signs the model's SHA-256 with the site's Ed25519 key (:func:`site_node.release.sign_off`),
and the site with the smallest id among the study's sites also uploads the decrypted model
with its parameter layout, from which the server writes the model file researchers load
(differential privacy is what protects patients in a released model); it tries the upload
again on every step until the server holds a model. The sign-off only
attests which model the site decrypted; releasing it is the owner's decision, under the
release policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.client import ConsortiumClient
from site_node.crypto.sealing import SiteKeyPair
from site_node.federation.approvals import ApprovalStore
from site_node.release import sign_off

__all__ = ["ReleaseResult", "sign_off_completed"]


@dataclass
class ReleaseResult:
    """What one release step did."""

    signed: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts for the log."""
        return {"signed": len(self.signed), "uploaded": len(self.uploaded)}


def sign_off_completed(
    api: ConsortiumClient,
    *,
    site_id: str,
    site_keys: SiteKeyPair,
    store: ApprovalStore,
    witnessed: SignedTreeHead | None,
) -> ReleaseResult:
    """Sign off (and, for one site, upload) the final model of each completed study whose
    final aggregate is on record in the log as of ``witnessed`` (the last cosigned head)."""
    result = ReleaseResult()
    for study in api.list_studies(state="completed"):
        status: dict[str, Any] = api.request("GET", f"/api/v1/studies/{study['id']}/release")
        pending = site_id in status["pending_sites"]
        # The uploader is the smallest site id; it uploads until the server holds a model,
        # so an upload that failed after the sign-off is tried again on the next step.
        upload = site_id == min(status["sites"]) and status["model_sha256"] is None
        if not pending and not upload:
            continue
        signed = sign_off(
            api,
            study["id"],
            site_id=site_id,
            keys=site_keys,
            store=store,
            upload=upload,
            witnessed=witnessed,
            sign=pending,
        )
        if pending:
            result.signed.append(signed.study_id)
        if signed.uploaded:
            result.uploaded.append(signed.study_id)
    return result
