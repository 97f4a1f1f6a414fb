"""A site's signed report of what its privacy accountant has spent in a study.

Each train reply carries one, whatever becomes of the reply's update: the site has trained
(and spent) once it answers, so the consortium's ledger charges the report even when the
update is rejected or the round fails. The report is signed with the site's Ed25519 key,
so nobody but the site can make the ledger charge (or not charge) the site's datasets:
a rogue node or a forged reply cannot drain a hospital's budget, and the server cannot
claim a site reported less than it did.

The report states the accountant's history as the plan fixes it (noise multiplier, the
sample rate Opacus accounts each step at, steps taken, and the evaluation releases with
their noise) and the training count it was planned for, so the ledger can recompute the
epsilon with an accountant of its own (``consortium_server.budgets.accountant``) and flag a
site whose figure disagrees.
Epsilon is **cumulative** for the study at this site, at the contract's delta.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import ConcordError
from concord_protocol.fields import Sha256Hex, Slug
from concord_protocol.sealed_key import B64Bytes
from concord_protocol.site_keys import verify_ed25519

__all__ = [
    "SPEND_REPORT_VERSION",
    "SignedSpendReport",
    "SpendReport",
    "SpendReportError",
    "sign_spend_report",
]

SPEND_REPORT_VERSION: Literal[1] = 1
_LABEL = b"concord/spend-report/v1\x00"


class SpendReportError(ConcordError):
    """A spend report that does not parse (``spend.malformed``)."""

    code = "spend.malformed"


class SpendReport(BaseModel):
    """What a site's accountant has spent in a study after one round it trained."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = SPEND_REPORT_VERSION
    study_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    contract_hash: Sha256Hex
    attempt: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    round_number: int = Field(ge=1)
    site_id: Slug
    #: Cumulative epsilon at ``delta`` (the ledger refuses a negative one, with an audit entry).
    epsilon: float
    delta: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    num_samples: int = Field(ge=1, le=1_000_000_000)
    #: Evaluation releases the accountant holds (one per round trained, charged when the
    #: round is trained, before the release), each a Gaussian mechanism of this noise.
    evaluations: int = Field(default=0, ge=0, le=100_000)
    evaluation_noise_multiplier: float | None = Field(default=None, gt=0)

    def signed_bytes(self) -> bytes:
        """The bytes the site's signature covers."""
        return _LABEL + canonical_json(self.model_dump(mode="json"))


class SignedSpendReport(BaseModel):
    """A :class:`SpendReport` and the site's signature over it (base64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: SpendReport
    signature: B64Bytes

    def verify(self, signing_public_key: str) -> None:
        """Check the signature with the site's key; raises ``SignatureError``."""
        r = self.report
        verify_ed25519(
            signing_public_key,
            self.signature,
            r.signed_bytes(),
            what=f"spend report of {r.site_id} for round {r.round_number} of {r.study_id}",
        )

    def to_json(self) -> str:
        """Canonical JSON (what a train reply's ``site`` record carries)."""
        return canonical_json(self.model_dump(mode="json")).decode()

    @classmethod
    def from_json(cls, text: str) -> SignedSpendReport:
        """Parse :meth:`to_json`'s output; :class:`SpendReportError` if it is not one."""
        try:
            return cls.model_validate_json(text)
        except (ValidationError, ValueError):
            raise SpendReportError("a spend report that does not parse") from None


def sign_spend_report(report: SpendReport, signing_key: Ed25519PrivateKey) -> SignedSpendReport:
    """Sign ``report`` with the site's key (a non-finite epsilon cannot be signed)."""
    if not math.isfinite(report.epsilon):  # pragma: no cover - allow_inf_nan forbids it
        raise SpendReportError("epsilon must be finite")
    return SignedSpendReport(report=report, signature=signing_key.sign(report.signed_bytes()))
