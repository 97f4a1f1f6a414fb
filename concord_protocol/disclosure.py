"""What leaves a site, field by field, and what protects it: the declaration a steward
consents to (at publication, and again when approving a contract, whose card repeats it).

Concord's privacy unit is **one patient record** of one dataset: the accountant assumes two
datasets are neighbours when they differ by adding or removing one record (Opacus'
Poisson-subsampled DP-SGD, and the evaluation histogram's sensitivity of 1). Everything a
site sends is listed here as either

* ``dp``: covered by the study's (epsilon, delta) at this site (the encrypted update, its
  decrypted aggregate and the released model; the evaluation histograms), or
* ``public``: released without DP, because it is the aggregation's contract with the
  consortium or a property of the plan, and the steward declares it public when publishing
  the dataset (``site-node data publish`` prints this list) and approves it with every
  contract.

The site code sends nothing else; ``docs/privacy.md`` explains each entry and what the
guarantee does not cover (:data:`NOT_COVERED`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["DISCLOSURES", "NEIGHBOURING", "NOT_COVERED", "PRIVACY_UNIT", "Disclosure", "public"]

PRIVACY_UNIT = "one patient record of one dataset"
NEIGHBOURING = (
    "add/remove one record: datasets that differ by one record are neighbours "
    "(Poisson-subsampled DP-SGD and the sensitivity-1 evaluation histogram)"
)


@dataclass(frozen=True)
class Disclosure:
    """One field a site releases: where, under what protection, and why that is enough."""

    field: str
    where: str
    protection: Literal["dp", "public"]
    why: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form (the model card's ``privacy.disclosures``)."""
        return asdict(self)


DISCLOSURES: tuple[Disclosure, ...] = (
    Disclosure(
        "model update",
        "train reply",
        "dp",
        "DP-SGD (per-sample clipping, Gaussian noise on every step), then CKKS-encrypted; "
        "the server only ever holds the encrypted sum",
    ),
    Disclosure(
        "released model",
        "release",
        "dp",
        "post-processing of DP-SGD updates: covered by the study's (epsilon, delta)",
    ),
    Disclosure(
        "evaluation histogram",
        "evaluate reply",
        "dp",
        "Gaussian mechanism of sensitivity 1, one release per round trained, composed into "
        "the site's accountant and charged by the ledger",
    ),
    Disclosure(
        "record count",
        "catalogue; roster; train reply (aggregation weight)",
        "public",
        "the weight of the site's update in FedAvg and the size the DP plan is made for; "
        "declared at publication",
    ),
    Disclosure(
        "label counts of the training split",
        "catalogue",
        "public",
        "lets researchers judge a dataset before proposing a study; declared at publication",
    ),
    Disclosure(
        "input shape, feature names, modality, task, class names",
        "catalogue",
        "public",
        "schema, not data: what a contract's model must accept",
    ),
    Disclosure(
        "accountant figures (epsilon, noise multiplier, sample rate, steps)",
        "signed spend report",
        "public",
        "functions of the contract and the published record count only",
    ),
    Disclosure(
        "timings (training and encryption seconds)",
        "train reply",
        "public",
        "depend on the record count, the model and the hardware; not on record values",
    ),
)

NOT_COVERED: tuple[str, ...] = (
    "that a site and its datasets take part in a study, and their published record counts",
    "a patient with several records in a dataset is protected at the group level "
    "(k records: roughly k times epsilon)",
    "studies compose by the sum of their (epsilon, delta) per dataset (basic composition)",
    "noise is drawn with floating-point samplers (NumPy, PyTorch), not discrete ones",
)


def public() -> list[str]:
    """The fields released without DP (what a steward declares public)."""
    return [d.field for d in DISCLOSURES if d.protection == "public"]
