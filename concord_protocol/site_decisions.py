"""A site's decision on a study, signed with the site's key: the approval that counts.

A steward approves (or declines) at the site (``site-node study approve``), after the site
checked the contract's hash, its roster against the keys the site pinned, and the site's
own policy. The site signs a :class:`SiteDecision` with its Ed25519 key, keeps it, and
posts it. The consortium server verifies the signature with the key the roster names
before it records anything, stores the signature and shows it with the study; anyone who
holds the site's public key (every peer pinned it; a third party can take it from the
audit log's key history) can check it with :meth:`SignedDecision.verify`. A server that
claims an approval it cannot show a signature for is not believed: sites train only on
contracts they approved themselves, and peers check each other's signatures.

The signed bytes are the domain label and the canonical JSON of the decision.
"""

from __future__ import annotations

from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, StringConstraints

from concord_protocol.canonical import canonical_json
from concord_protocol.fields import Sha256Hex, Slug
from concord_protocol.sealed_key import B64Bytes
from concord_protocol.site_keys import verify_ed25519

__all__ = ["DECISION_VERSION", "SignedDecision", "SiteDecision", "sign_decision"]

DECISION_VERSION: Literal[1] = 1
_LABEL = b"concord/site-decision/v1\x00"


class SiteDecision(BaseModel):
    """What a site decided about one exact contract of one study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = DECISION_VERSION
    study_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    contract_hash: Sha256Hex
    site_id: Slug
    decision: Literal["approved", "declined"]
    reason: Annotated[str, StringConstraints(max_length=2000)] = ""
    decided_at: Annotated[str, StringConstraints(min_length=1, max_length=40)]

    def signed_bytes(self) -> bytes:
        """The bytes the site's signature covers."""
        return _LABEL + canonical_json(self.model_dump(mode="json"))


class SignedDecision(BaseModel):
    """A :class:`SiteDecision` and the site's Ed25519 signature over it (base64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: SiteDecision
    signature: B64Bytes

    def verify(self, signing_public_key: str) -> None:
        """Check the signature with the site's key (API form); raises
        :class:`~concord_protocol.site_keys.SignatureError`."""
        verify_ed25519(
            signing_public_key,
            self.signature,
            self.decision.signed_bytes(),
            what=f"decision of {self.decision.site_id} on study {self.decision.study_id}",
        )


def sign_decision(decision: SiteDecision, signing_key: Ed25519PrivateKey) -> SignedDecision:
    """Sign ``decision`` with the site's key."""
    return SignedDecision(decision=decision, signature=signing_key.sign(decision.signed_bytes()))
